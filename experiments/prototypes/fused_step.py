"""Prototype (issue 17, goal 2): a Med-NCA prediction whose every NCA step is ONE fused CPU
kernel (`fused_step/nca_step.cc`, an XLA FFI call), against the library's XLA path.

Goals 1-2 have pointed at "a fused per-step kernel" since session 22: XLA CPU writes every
op's output to memory, and a step is perception, batch-norm statistics, MLP and update over a
(B, H, W, 16) state. This measures what such a kernel gives for the forward (predictions and
the 10-sample variance) before any of it enters the package: same keys, same fire masks, the
probabilities compared with the library's, and the timings interleaved in one process.

    python experiments/prototypes/fused_step.py --size 256 --reps 5 --json OUT.json

Needs g++ with AVX-512 (-march=native) and OpenMP; builds into --build (default /tmp).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nca_jax import model  # noqa: E402
from nca_jax.bench import _bench_params, flop_per_cell_step, matmul_gflops, predict_cell_steps  # noqa: E402
from nca_jax.config import ModelConfig  # noqa: E402
from nca_jax.predict import make_predict  # noqa: E402

SRC = Path(__file__).resolve().parent / "fused_step" / "nca_step.cc"
TARGET = "nca_step_fwd"


def build_and_register(build_dir: Path) -> Path:
    """Compiles the kernel (if the source is newer) and registers it as an XLA FFI target."""
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / "libnca_step.so"
    if not so.exists() or so.stat().st_mtime < SRC.stat().st_mtime:
        cmd = ["g++", "-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
        cmd += [f"-I{jax.ffi.include_dir()}", str(SRC), "-o", str(so)]
        subprocess.run(cmd, check=True)
    lib = ctypes.cdll.LoadLibrary(str(so))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NcaStepFwd), platform="cpu")
    return so


def level_args(lp: dict, cfg: ModelConfig) -> tuple[jax.Array, ...]:
    """One level's parameters as the kernel takes them: conv kernels (3, 3, 16, 32), dense_in
    (48, 128), norm scale and bias (128,), dense_out (128, 16) with channel 0 zeroed. The conv
    and dense_in biases cancel in the batch-stats norm."""
    pp = lp["perceive"]
    k = jnp.concatenate([pp["conv0"]["kernel"], pp["conv1"]["kernel"]], -1)
    w2 = lp["dense_out"]["kernel"] * model._update_channels(cfg)
    return k, lp["dense_in"]["kernel"], lp["norm"]["scale"], lp["norm"]["bias"], w2


def fused_step(lp: dict, state: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
    """state (G, B, H, W, C), fire mask (G, B, H, W, 1) -> new state; each of the G groups has
    its own batch-norm statistics (as G separate nca_step calls)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(state.shape, jnp.float32))
    return call(state, mask[..., 0], *level_args(lp, cfg), eps=np.float32(cfg.bn_eps))


def fused_predict(params: dict, image: jax.Array, keys: jax.Array, cfg: ModelConfig) -> jax.Array:
    """image (H, W), keys (G,) -> probabilities (G, H, W): prediction g is
    sigmoid(predict_logits(params, image[None], key=keys[g])) with the same draws."""
    g, size = keys.shape[0], image.shape[0]
    img = model.as_nhwc(image[None])
    rand = jax.vmap(lambda k: model.draw_randomness(k, cfg, 1, size, train=False))(keys)
    m1, m2 = jnp.swapaxes(rand.masks1, 0, 1), jnp.swapaxes(rand.masks2, 0, 1)  # (steps, G, ...)

    def run(lp: dict, s: jax.Array, masks: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda s, m: (fused_step(lp, s, m, cfg), None), s, masks)[0]

    low = model.seed_state(model.downscale(img, cfg.downscale), cfg.channels)
    s = run(params["level1"], jnp.broadcast_to(low[None], (g, *low.shape)), m1)
    up = model.upscale(s.reshape(-1, *s.shape[2:]), cfg.downscale).reshape(g, *img.shape[:3], -1)
    full = jnp.concatenate([jnp.broadcast_to(img[None], (g, *img.shape)), up[..., 1:]], -1)
    s = run(params["level2"], full, m2)
    return jax.nn.sigmoid(s[:, 0, ..., 1])


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--build", type=Path, default=Path("/tmp/nca_fused_build"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    so = build_and_register(a.build)
    cfg = ModelConfig(steps=a.steps)
    params = _bench_params(cfg)
    # a stricter check than the bench's uniform dense_out: random output weights
    k1, k2 = jax.random.split(jax.random.key(7))
    for lv, k in (("level1", k1), ("level2", k2)):
        params[lv]["dense_out"]["kernel"] = 0.05 * jax.random.normal(k, (cfg.hidden, cfg.channels))
    image = jnp.asarray(np.random.default_rng(0).uniform(size=(a.size, a.size)), jnp.float32)
    key = jax.random.key(1)
    keys = model.sample_keys(jax.random.fold_in(key, 0), a.samples)  # make_predict's keys

    one_ref = jax.jit(lambda p, i, k: jax.nn.sigmoid(model.predict_logits(p, i[None], cfg=cfg, key=k))[0])
    one_fused = jax.jit(lambda p, i, k: fused_predict(p, i, k[None], cfg)[0])
    var_ref = make_predict(cfg, a.samples)  # the library's path on CPU: one call per sample
    var_fused = jax.jit(lambda p, i, ks: fused_predict(p, i, ks, cfg))
    index = jnp.zeros((1,), jnp.int32)

    r1, f1 = one_ref(params, image, keys[0]), one_fused(params, image, keys[0])
    rv = var_ref(params, image[None], key, index)[:, 0]
    fv = var_fused(params, image, keys)
    err = {
        "one_max_abs_diff": float(jnp.max(jnp.abs(r1 - f1))),
        "samples_max_abs_diff": float(jnp.max(jnp.abs(rv - fv))),
        "variance_max_abs_diff": float(jnp.max(jnp.abs(rv.var(0) - fv.var(0)))),
        "mask_agreement": float(jnp.mean((rv > 0.5) == (fv > 0.5))),
        "prob_std": float(jnp.std(r1)),
    }
    print(json.dumps(err), flush=True)

    mm = matmul_gflops()
    t = {"one_ref": [], "one_fused": [], "var_ref": [], "var_fused": []}
    for _ in range(a.reps):  # interleaved
        t["one_ref"] += timed(lambda: one_ref(params, image, keys[0]), 1)
        t["one_fused"] += timed(lambda: one_fused(params, image, keys[0]), 1)
        t["var_ref"] += timed(lambda: var_ref(params, image[None], key, index), 1)
        t["var_fused"] += timed(lambda: var_fused(params, image, keys), 1)
    mm = max(mm, matmul_gflops())
    med = {k: float(np.median(v)) for k, v in t.items()}
    flop = predict_cell_steps(cfg, a.size) * flop_per_cell_step(cfg)
    res = {
        "command": " ".join(["python", *sys.argv]),
        "size": a.size,
        "steps": a.steps,
        "samples": a.samples,
        "reps": a.reps,
        "so": str(so),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "matmul_gflops": mm,
        **err,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_all_s": v for k, v in t.items()},
        "predict_speedup": med["one_ref"] / med["one_fused"],
        "variance_speedup": med["var_ref"] / med["var_fused"],
        "predict_fused_fraction_of_matmul": flop / med["one_fused"] / 1e9 / mm,
        "variance_fused_fraction_of_matmul": a.samples * flop / med["var_fused"] / 1e9 / mm,
        "variance_ref_fraction_of_matmul": a.samples * flop / med["var_ref"] / 1e9 / mm,
    }
    for k in ("one_ref", "one_fused", "var_ref", "var_fused"):
        print(f"{k}: {med[k]:.3f} s", flush=True)
    print(
        f"prediction {res['predict_speedup']:.2f}x, variance {res['variance_speedup']:.2f}x; "
        f"variance at {res['variance_fused_fraction_of_matmul']:.0%} of matmul ({mm:.0f} GFLOP/s),"
        f" library {res['variance_ref_fraction_of_matmul']:.0%}",
        flush=True,
    )
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
