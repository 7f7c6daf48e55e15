"""Issue 17, goal 2: a Med-NCA prediction whose every NCA step is ONE fused CPU kernel
(`nca_jax/fused.py`, `nca_jax/csrc/nca_step.cc`, an XLA FFI call), against XLA's ops.

Goals 1-2 have pointed at "a fused per-step kernel" since session 22: XLA CPU writes every
op's output to memory, and a step is perception, batch-norm statistics, MLP and update over a
(B, H, W, 16) state. This measured what such a kernel gives for the forward (predictions and
the 10-sample variance) before it entered the package (session 32, a first version of this
script with its own copy of the wrapper), and now compares the package's two paths: same
keys, same fire masks, the probabilities compared, the timings interleaved in one process.

    python experiments/prototypes/fused_step.py --size 256 --reps 5 --json OUT.json

Needs what `nca_jax.fused` needs (x86-64 with AVX-512, g++ with OpenMP).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nca_jax import fused, model  # noqa: E402
from nca_jax.bench import (  # noqa: E402
    _bench_params,
    flop_per_cell_step,
    matmul_gflops,
    predict_cell_steps,
)
from nca_jax.config import ModelConfig  # noqa: E402
from nca_jax.predict import ALL, make_predict  # noqa: E402


def variants(cfg: ModelConfig) -> dict[str, tuple[ModelConfig, int]]:
    """name -> (config, samples side by side): XLA's steps as the library runs them on CPU
    (one prediction at a time), and the fused kernel one at a time or all side by side (one
    vmap: one kernel call per step for every sample)."""
    off = dataclasses.replace(cfg, fused_forward=0)
    on = dataclasses.replace(cfg, fused_forward=1)
    return {"var_ref": (off, 1), "var_fused_loop": (on, 1), "var_fused": (on, ALL)}


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
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    ok, why = fused.kernel_status()
    if not ok:
        raise SystemExit(f"fused kernel not usable here: {why}")
    cfg = ModelConfig(steps=a.steps)
    params = _bench_params(cfg)
    # a stricter check than the bench's uniform dense_out: random output weights
    k1, k2 = jax.random.split(jax.random.key(7))
    for lv, k in (("level1", k1), ("level2", k2)):
        params[lv]["dense_out"]["kernel"] = 0.05 * jax.random.normal(k, (cfg.hidden, cfg.channels))
    image = jnp.asarray(np.random.default_rng(0).uniform(size=(a.size, a.size)), jnp.float32)
    key = jax.random.key(1)
    keys = model.sample_keys(jax.random.fold_in(key, 0), a.samples)  # make_predict's keys

    def one(c: ModelConfig):
        f = jax.jit(lambda p, i, k: jax.nn.sigmoid(model.predict_logits(p, i[None], cfg=c, key=k)))
        return lambda: f(params, image, keys[0])[0]

    index = jnp.zeros((1,), jnp.int32)
    runs = {"one_ref": one(dataclasses.replace(cfg, fused_forward=0))}
    runs["one_fused"] = one(dataclasses.replace(cfg, fused_forward=1))
    for name, (c, par) in variants(cfg).items():
        f = make_predict(c, a.samples, par)
        runs[name] = lambda f=f: f(params, image[None], key, index)[:, 0]

    r1, f1 = runs["one_ref"](), runs["one_fused"]()
    rv, fv = runs["var_ref"](), runs["var_fused"]()
    fl = runs["var_fused_loop"]()
    err = {
        "one_max_abs_diff": float(jnp.max(jnp.abs(r1 - f1))),
        "samples_max_abs_diff": float(jnp.max(jnp.abs(rv - fv))),
        "variance_max_abs_diff": float(jnp.max(jnp.abs(rv.var(0) - fv.var(0)))),
        "mask_agreement": float(jnp.mean((rv > 0.5) == (fv > 0.5))),
        "loop_vs_vmap_max_abs_diff": float(jnp.max(jnp.abs(fl - fv))),
        "prob_std": float(jnp.std(r1)),
    }
    print(json.dumps(err), flush=True)

    mm = matmul_gflops()
    t: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(a.reps):  # interleaved
        for k, fn in runs.items():
            t[k] += timed(fn, 1)
    mm = max(mm, matmul_gflops())
    med = {k: float(np.median(v)) for k, v in t.items()}
    flop = predict_cell_steps(cfg, a.size) * flop_per_cell_step(cfg)
    res = {
        "command": " ".join(["python", *sys.argv]),
        "size": a.size,
        "steps": a.steps,
        "samples": a.samples,
        "reps": a.reps,
        "fused_status": why,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "matmul_gflops": mm,
        **err,
        **{f"{k}_s": v for k, v in med.items()},
        **{f"{k}_all_s": v for k, v in t.items()},
        "predict_speedup": med["one_ref"] / med["one_fused"],
        "variance_speedup": med["var_ref"] / med["var_fused"],
        "variance_loop_speedup": med["var_ref"] / med["var_fused_loop"],
        "predict_fused_fraction_of_matmul": flop / med["one_fused"] / 1e9 / mm,
        "variance_fused_fraction_of_matmul": a.samples * flop / med["var_fused"] / 1e9 / mm,
        "variance_ref_fraction_of_matmul": a.samples * flop / med["var_ref"] / 1e9 / mm,
    }
    for k in runs:
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
