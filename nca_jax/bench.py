"""Speed benchmark: training steps, predictions and the 10-sample variance, as cell-steps per
second and GFLOP/s, against this machine's float32 matmul rate measured in the same run, and
optionally against the authors' PyTorch code (../shared/peer/torch_mednca_bench.py).

FLOP count per cell and step (forward): two 3x3 convs C->C (2 * 2 * 9 * C * C), dense 3C->hidden
(2 * 3C * hidden), dense hidden->C (2 * hidden * C): 25,600 at the defaults. A training sample is
2 levels x patch^2 x steps cell-steps, x3 for forward + backward; a prediction is
((size/4)^2 + size^2) x steps cell-steps.
Usage: python bench.py [--size 256] [--steps 50] [--batch 4 16] [--peer SRC --peer-python PY]
                       --json OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import fused
from nca_jax.cli import run_cli
from nca_jax.config import (
    FinetuneConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    atomic_write_text,
    config_from_dict,
)
from nca_jax.errors import ConfigError
from nca_jax.model import init_params, predict_logits, sample_keys
from nca_jax.predict import ALL, default_parallel, make_predict
from nca_jax.training import init_state, make_train_step

PEER_SCRIPT = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "peer" / "torch_mednca_bench.py"
)


def flop_per_cell_step(mc: ModelConfig) -> float:
    c, h = mc.channels, mc.hidden
    return 2 * 2 * 9 * c * c + 2 * 3 * c * h + 2 * h * c


def train_flop(mc: ModelConfig, batch: int) -> float:
    return 3 * batch * 2 * mc.patch**2 * mc.steps * flop_per_cell_step(mc)


def predict_cell_steps(mc: ModelConfig, size: int) -> float:
    return ((size // mc.downscale) ** 2 + size**2) * mc.steps


def timeit(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    """(first call incl. compile, median of `reps` later calls) in seconds."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return first, statistics.median(ts)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none): the machine kind
    changes between sessions, and the figures mean little without it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""

    def field(name: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(name)), "")

    name, family, model = field("model name"), field("cpu family"), field("model\t")
    return f"{name} (family {family}, model {model})" if name and family else name


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    _, t = timeit(lambda: f(a, b), reps)
    return 2 * n**3 / t / 1e9


def _matmul_again(res: dict[str, Any]) -> None:
    """Measure the matmul rate again after the JAX timings and take the shares of matmul
    against the higher of the two readings: a shared host's transient slowdown during one
    reading would otherwise inflate every share (session 30 read 195 GFLOP/s once, on a host
    that gave 299-420 in every other run)."""
    start, end = res["matmul_gflops"], matmul_gflops()
    res.update(matmul_gflops_start=start, matmul_gflops_end=end, matmul_gflops=max(start, end))
    for r in [res, *res.get("per_batch", {}).values()]:
        for what in ("train", "variance10"):
            if f"{what}_gflops" in r:
                r[f"{what}_fraction_of_matmul"] = r[f"{what}_gflops"] / res["matmul_gflops"]
    shares = [f"train batch {b} {100 * r['train_fraction_of_matmul']:.0f}%"
              for b, r in res.get("per_batch", {}).items()]  # fmt: skip
    if "variance10_fraction_of_matmul" in res:
        shares.append(f"variance {100 * res['variance10_fraction_of_matmul']:.0f}%")
    print(
        f"float32 matmul again: {end:.1f} GFLOP/s (first {start:.1f}); shares of the higher: "
        + ", ".join(shares),
        flush=True,
    )


def train_runner(
    mc: ModelConfig, size: int, batch: int, level1_loss_weight: float = 0.0
) -> Callable[[], jax.Array]:
    """One training step per call (batch x size x size random images and masks, the state
    carried from call to call): a function of no arguments returning the step's loss. With
    level1_loss_weight > 0 the step adds level 1's whole-image loss (train.level1_loss_weight)."""
    tc = TrainConfig(batch_size=batch, image_size=size, level1_loss_weight=level1_loss_weight)
    cfg = RunConfig(model=mc, train=tc).validate()
    step = make_train_step(cfg)
    rng = np.random.default_rng(0)
    batch_d = {
        "images": jnp.asarray(rng.uniform(size=(batch, size, size)), jnp.float32),
        "masks": jnp.asarray(rng.uniform(size=(batch, size, size)) > 0.5, jnp.float32),
    }
    holder = {"state": init_state(cfg)}
    key = jax.random.key(0)

    def run() -> jax.Array:
        holder["state"], info = step(holder["state"], batch_d, key)
        return info["loss"]

    return run


def bench_train(
    mc: ModelConfig, size: int, batch: int, reps: int, level1_loss_weight: float = 0.0
) -> dict[str, float]:
    first, t = timeit(train_runner(mc, size, batch, level1_loss_weight), reps)
    cells = batch * 2 * mc.patch**2 * mc.steps
    return {
        "train_step_s": t,
        "train_compile_s": first - t,
        "train_cell_steps_per_s": cells / t,
        "train_gflops": train_flop(mc, batch) / t / 1e9,
    }


def _bench_params(mc: ModelConfig) -> Any:
    """Fresh parameters; an NCA's zero-initialised dense_out made non-zero, so that its steps
    do work as a trained model's do (an untrained NCA is the identity)."""
    params = init_params(mc, key=jax.random.key(0))
    if mc.kind == "med-nca":
        params["level1"]["dense_out"]["kernel"] += 0.01
        params["level2"]["dense_out"]["kernel"] += 0.01
    return params


def predict_runner(mc: ModelConfig, size: int) -> Callable[[], jax.Array]:
    """One prediction (1 x size x size random image, fixed key) per call: its probabilities."""
    params = _bench_params(mc)
    img = jnp.asarray(np.random.default_rng(0).uniform(size=(1, size, size)), jnp.float32)
    one = jax.jit(lambda p, i, k: jax.nn.sigmoid(predict_logits(p, i, cfg=mc, key=k)))
    key = jax.random.key(1)
    return lambda: one(params, img, key)


def timeit_interleaved(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up (compile) call each, the
    calls interleaved (A, B, A, B, ...) so that a shared machine's drift falls on all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


# The --compare-* flags: the model change, the JSON key of the variant's time, whether the
# speed-up is variant / base (the variant is the old path) or base / variant, and its words.
COMPARISONS: dict[str, tuple[dict[str, Any], str, str, bool, str, str]] = {
    "autodiff_baseline": (
        {"fast_backward": False}, "autodiff", "fast_backward", True,
        "XLA autodiff backward", "fast backward is {:.2f}x faster",
    ),
    "compare_perceive": (
        {"perceive": "im2col"}, "im2col", "im2col", False,
        "perception as one matmul", "{:.2f}x the convolutions' speed",
    ),
    "compare_fold": (
        {"fold_norm": False}, "unfolded", "fold", True,
        "norm not folded", "folding is {:.2f}x faster",
    ),
    "compare_chunk": (
        {"mlp_chunk": 0}, "unchunked", "chunk", True,
        "MLP on all cells at once", "chunks are {:.2f}x faster",
    ),
    "compare_fired": (
        {"mlp_fired": 0}, "every_cell", "fired", True,
        "MLP on every cell", "the fired cells alone are {:.2f}x faster",
    ),
    "compare_fused": (
        {"fused_forward": 0, "fused_train": 0}, "xla_steps", "fused", True,
        "NCA steps as XLA ops", "the fused kernels are {:.2f}x faster",
    ),
}  # fmt: skip


def compare(
    flag: str,
    mc: ModelConfig,
    make: Callable[[ModelConfig], Callable[[], Any]],
    reps: int,
    what: str,
    label: str,
) -> dict[str, float]:
    """Time the base config's `make(mc)` and the flag's variant interleaved, and print the
    ratio. Returns {what}_{name}_s (the variant), {what}_{name}_base_s (the base, same run)
    and the speed-up as speedup_{ratio} (label "") or speedup_{label}_{ratio}, with name and
    ratio from COMPARISONS (e.g. train_step_unfolded_s and speedup_fold, or
    predict_unfolded_s and speedup_predict_fold)."""
    change, name, ratio, variant_is_old, words, sentence = COMPARISONS[flag]
    t = timeit_interleaved({"base": make(mc), "alt": make(dataclasses.replace(mc, **change))}, reps)
    speedup = t["alt"] / t["base"] if variant_is_old else t["base"] / t["alt"]
    print(
        f"{what.replace('_', ' ')}, {words}: {t['alt']:.3f} s against {t['base']:.3f} s "
        f"interleaved ({sentence.format(speedup)})",
        flush=True,
    )
    key = ratio if label == "" else f"{label}_{ratio}"
    return {
        f"{what}_{name}_s": t["alt"],
        f"{what}_{name}_base_s": t["base"],
        f"speedup_{key}": speedup,
    }


def bench_predict(mc: ModelConfig, size: int, reps: int, samples: int = 10) -> dict[str, float]:
    params = _bench_params(mc)
    img = jnp.asarray(np.random.default_rng(0).uniform(size=(1, size, size)), jnp.float32)
    one = jax.jit(lambda p, i, k: jax.nn.sigmoid(predict_logits(p, i, cfg=mc, key=k)))
    vm = make_predict(mc, samples, ALL)  # all samples side by side (one vmap)
    key = jax.random.key(1)
    index = jnp.zeros((1,), jnp.int32)
    keys = sample_keys(jax.random.fold_in(key, 0), samples)  # the keys make_predict uses
    _, t1 = timeit(lambda: one(params, img, key), reps)
    first, tv = timeit(lambda: vm(params, img, key, index), reps)
    _, tl = timeit(lambda: [one(params, img, keys[j]) for j in range(samples)], max(1, reps // 2))
    lib = make_predict(mc, samples)  # the library's path: a loop of calls on CPU, vmap on GPU
    _, td = timeit(lambda: lib(params, img, key, index), max(1, reps // 2))
    flop = predict_cell_steps(mc, size) * flop_per_cell_step(mc)
    return {
        "predict_s": t1,
        "predict_gflops": flop / t1 / 1e9,
        "predict_cell_steps_per_s": predict_cell_steps(mc, size) / t1,
        f"variance{samples}_vmap_s": tv,
        f"variance{samples}_loop_s": tl,
        f"variance{samples}_vmap_compile_s": first - tv,
        f"variance{samples}_s": td,
        f"variance{samples}_parallel": float(
            samples if fused.resolve(mc) else min(default_parallel(), samples)
        ),
        f"variance{samples}_gflops": samples * flop / td / 1e9,  # the library's path
        f"variance{samples}_vmap_gflops": samples * flop / tv / 1e9,
    }


def _signature_inputs(b: int, s: int) -> dict[str, dict[str, np.ndarray]]:
    """One call's inputs per timed signature: a (b, s, s, 1) random image, a box mask."""
    img = np.random.default_rng(0).uniform(size=(b, s, s, 1)).astype(np.float32)
    msk = np.zeros_like(img)
    msk[:, s // 4 : 3 * s // 4, s // 8 : s // 2] = 1
    return {
        "infer": {"image": img},
        "train": {"image": img, "mask": msk},
        "finetune": {"image": img, "target": msk, "weight": np.ones_like(img)},
        "sample": {"image": img},
    }


def twin_config(file_config: dict[str, Any], batch: int, size: int, where: str) -> RunConfig:
    """The run config JAX's twin of an exported file trains with: the file's own (its model,
    and its loss with level 1's term), at the file's batch and size, without the weights'
    average (the phone's `train` is the plain optimizer step)."""
    cfg = config_from_dict(file_config, f"{where} (its config)")
    train = dataclasses.replace(cfg.train, batch_size=batch, image_size=size, ema_decay=0.0)
    finetune = dataclasses.replace(cfg.finetune or FinetuneConfig(), batch_size=batch)
    return dataclasses.replace(cfg, train=train, finetune=finetune).validate()


def bench_tflite(path: str, reps: int, threads: int | None = None) -> dict[str, float]:
    """Per-call seconds of the file's signatures (LiteRT) and of the jitted JAX functions that
    do the same work (the file's model, batch and size), in this process. Times the signatures
    the file holds among infer, sample, train and finetune (a UNet's file has no sample or
    finetune; a frozen file only infer and sample). threads: LiteRT's CPU threads (None: its
    default)."""
    from nca_jax.device_train import TFLiteModel
    from nca_jax.finetuning import make_finetune_step

    model = TFLiteModel(path, threads)
    b, s = model.batch, model.size
    cfg = twin_config(model.info["config"], b, s, path)
    mc = cfg.model
    calls = _signature_inputs(b, s)
    img, msk = calls["train"]["image"], calls["train"]["mask"]
    calls = {k: v for k, v in calls.items() if k in model.signatures}
    out: dict[str, float] = {
        "tflite_bytes": float(Path(path).stat().st_size),
        "batch": float(b),
        "size": float(s),
    }
    for sig, kw in calls.items():
        n = 1 if sig == "sample" else reps
        _, t = timeit(lambda sig=sig, kw=kw: model.run(sig, **kw), n)
        out[f"tflite_{sig}_s"] = t
    # JAX, same work
    params = _bench_params(mc)
    one = jax.jit(lambda p, i, k: jax.nn.sigmoid(predict_logits(p, i, cfg=mc, key=k)))
    ten = make_predict(mc, model.info["spec"]["samples"])  # the library's own sampling path
    key = jax.random.key(1)
    if "infer" in calls:
        _, out["jax_infer_s"] = timeit(lambda: one(params, img[..., 0], key), reps)
    if "sample" in calls:
        idx = jnp.arange(b)
        _, out["jax_sample_s"] = timeit(
            lambda: ten(params, img[..., 0], key, idx), max(1, reps // 2)
        )
    steps = {
        "train": (make_train_step, {"images": img[..., 0], "masks": msk[..., 0]}),
        "finetune": (
            make_finetune_step,
            {"images": img[..., 0], "targets": msk[..., 0], "weights": np.ones_like(msk[..., 0])},
        ),
    }
    for name, (make, batch) in steps.items():
        if name not in calls:
            continue
        step = make(cfg)
        holder = {"state": init_state(cfg, jax.tree_util.tree_map(jnp.copy, params))}

        def run(step=step, batch=batch, holder=holder):
            holder["state"], info = step(holder["state"], batch, key)
            return info["loss"]

        _, out[f"jax_{name}_s"] = timeit(run, reps)
    for sig in calls:
        out[f"tflite_over_jax_{sig}"] = out[f"tflite_{sig}_s"] / out[f"jax_{sig}_s"]
    return out


def bench_tflite_interleaved(
    paths: list[str], reps: int, threads: int | None = None
) -> dict[str, dict[str, float]]:
    """Per-call seconds (median of `reps`) of the same signatures in several files, the calls
    interleaved (file A, file B, A, B, ...) in this process after one warm-up call each, so
    that a shared machine's drift falls on all files alike: {path: {signature: s}}. Times the
    signatures all files hold among infer, train and finetune."""
    from nca_jax.device_train import TFLiteModel

    models = [TFLiteModel(p, threads) for p in paths]
    if len({(m.batch, m.size) for m in models}) != 1:
        raise ConfigError(f"{paths}: the files differ in batch or size, nothing to compare")
    calls = _signature_inputs(models[0].batch, models[0].size)
    calls = {
        k: v for k, v in calls.items() if k != "sample" and all(k in m.signatures for m in models)
    }
    for m in models:
        for sig, kw in calls.items():
            m.run(sig, **kw)
    ts: dict[tuple[int, str], list[float]] = {}
    for _ in range(reps):
        for i, m in enumerate(models):
            for sig, kw in calls.items():
                t = time.perf_counter()
                m.run(sig, **kw)
                ts.setdefault((i, sig), []).append(time.perf_counter() - t)
    return {p: {sig: statistics.median(ts[i, sig]) for sig in calls} for i, p in enumerate(paths)}


def peer_command(
    src: str, python: str, batch: int, size: int, steps: int, reps: int = 1
) -> list[str]:
    """The command that times the authors' code (../shared/peer/torch_mednca_bench.py): one
    warm-up call, then the median of `reps` calls of a training step and of the variance."""
    return [
        python,
        "-W",
        "ignore",
        str(PEER_SCRIPT),
        src,
        "--batch",
        str(batch),
        "--size",
        str(size),
        "--steps",
        str(steps),
        "--reps",
        str(reps),
    ]


def run_peer(
    src: str, python: str, batch: int, size: int, steps: int, reps: int = 1
) -> dict[str, Any]:
    cmd = peer_command(src, python, batch, size, steps, reps)
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Med-NCA speed benchmark")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-predict", action="store_true")
    p.add_argument(
        "--autodiff-baseline",
        action="store_true",
        help="also time the training step with XLA's own gradient (fast_backward=False)",
    )
    p.add_argument(
        "--compare-perceive",
        action="store_true",
        help="also time the training step and one prediction with the perception written as "
        "one matmul (model.perceive im2col, the TFLite export's) and print the ratios",
    )
    p.add_argument(
        "--compare-fold",
        action="store_true",
        help="also time the training step and one prediction with the batch norm NOT folded "
        "into the first dense layer (model.fold_norm false, the MLP before session 19) and "
        "print the ratios",
    )
    p.add_argument(
        "--compare-chunk",
        action="store_true",
        help="also time the training step and one prediction with the folded MLP on all cells "
        "at once (model.mlp_chunk 0, the MLP before session 21) and print the ratios",
    )
    p.add_argument(
        "--compare-fired",
        action="store_true",
        help="also time the training step and one prediction with the folded MLP on every cell "
        "(model.mlp_fired 0, the MLP before session 26) and print the ratios",
    )
    p.add_argument(
        "--compare-fused",
        action="store_true",
        help="also time the training step and one prediction with their NCA steps as XLA ops "
        "(model.fused_train 0 and fused_forward 0, the paths before sessions 33 and 32) and print "
        "the ratios",
    )
    p.add_argument("--peer", help="folder holding the authors' src/ (see ../shared/peer/README.md)")
    p.add_argument("--peer-python", default=sys.executable)
    p.add_argument(
        "--peer-reps",
        type=int,
        default=1,
        help="timed calls of the authors' code after its warm-up (median; default 1: a 256-px "
        "batch-16 step takes 40-50 s there). Small sizes need more, as --reps does for ours",
    )
    p.add_argument(
        "--tflite",
        nargs="+",
        help="a .tflite file from export_tflite.py: time its signatures against JAX; with "
        "several files, also time them against each other, calls interleaved",
    )
    p.add_argument("--tflite-threads", type=int, help="LiteRT CPU threads (default: its own)")
    p.add_argument(
        "--tflite-only", action="store_true", help="time only the --tflite file (and its JAX twin)"
    )
    p.add_argument(
        "--level1-loss",
        type=float,
        default=0.0,
        help="time the training step with level 1's whole-image loss at this weight "
        "(train.level1_loss_weight; experiments/time_to_dice.py projects such variants with it)",
    )
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    mc = ModelConfig(steps=a.steps, patch=a.size // 4)
    res: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        },
        "size": a.size,
        "steps": a.steps,
        "level1_loss_weight": a.level1_loss,
        "batches": a.batch,
        "reps": a.reps,
        "peer_reps": a.peer_reps if a.peer else None,
        "flop_per_cell_step": flop_per_cell_step(mc),
        "fused_forward": fused.resolve(mc),  # predictions' NCA steps as one kernel each
        "fused_train": fused.resolve(mc, train=True),  # training's steps: forward + backward
        "fused_status": fused.kernel_status()[1],
    }
    if a.tflite_only and any(getattr(a, flag) for flag in COMPARISONS):
        raise ConfigError(
            "--compare-perceive, --compare-fold, --compare-chunk, --compare-fired, "
            "--compare-fused and --autodiff-baseline time "
            "JAX: not with --tflite-only"
        )
    if a.tflite_only and not a.tflite:
        raise ConfigError("--tflite-only needs --tflite FILE")
    res["matmul_gflops"] = matmul_gflops()
    print(f"float32 matmul: {res['matmul_gflops']:.1f} GFLOP/s", flush=True)
    per_batch = {}
    for b in [] if a.tflite_only else a.batch:
        r = bench_train(mc, a.size, b, a.reps, a.level1_loss)
        r["train_fraction_of_matmul"] = r["train_gflops"] / res["matmul_gflops"]
        for flag in COMPARISONS:
            if getattr(a, flag):
                r.update(
                    compare(flag, mc, lambda m, b=b: train_runner(m, a.size, b), a.reps,
                            "train_step", "")
                )  # fmt: skip
        per_batch[str(b)] = r
        print(
            f"train step batch {b}: {r['train_step_s']:.3f} s, {r['train_gflops']:.1f} GFLOP/s "
            f"({100 * r['train_fraction_of_matmul']:.0f}% of matmul; compile "
            f"{r['train_compile_s']:.0f} s)",
            flush=True,
        )
    res["per_batch"] = per_batch
    res.update(per_batch.get(str(a.batch[0]), {}))
    if not a.skip_predict and not a.tflite_only:
        r = bench_predict(mc, a.size, a.reps)
        r["variance10_fraction_of_matmul"] = r["variance10_gflops"] / res["matmul_gflops"]
        res.update(r)
        for flag in (
            "compare_perceive",
            "compare_fold",
            "compare_chunk",
            "compare_fired",
            "compare_fused",
        ):
            if getattr(a, flag):
                res.update(
                    compare(flag, mc, lambda m: predict_runner(m, a.size), a.reps, "predict",
                            "predict")
                )  # fmt: skip
        print(
            f"prediction 1x{a.size}: {r['predict_s']:.3f} s ({r['predict_gflops']:.1f} GFLOP/s); "
            f"10 samples: vmap {r['variance10_vmap_s']:.2f} s, "
            f"loop {r['variance10_loop_s']:.2f} s, "
            f"library default ({r['variance10_parallel']:.0f} at a time) {r['variance10_s']:.2f} s "
            f"({100 * r['variance10_fraction_of_matmul']:.0f}% of matmul)",
            flush=True,
        )
    if not a.tflite_only:
        _matmul_again(res)
    for f in a.tflite or []:
        r = bench_tflite(f, a.reps, a.tflite_threads)
        entry = {"file": f, "threads": a.tflite_threads, **r}
        res.setdefault("tflite", entry)  # the first file's, where earlier runs kept it
        res.setdefault("tflite_files", []).append(entry)
        for sig in ("infer", "sample", "train", "finetune"):
            if f"tflite_{sig}_s" not in r:
                continue
            print(
                f"{f}: TFLite {sig}: {r[f'tflite_{sig}_s']:.2f} s, JAX {r[f'jax_{sig}_s']:.2f} s "
                f"({r[f'tflite_over_jax_{sig}']:.1f}x)",
                flush=True,
            )
    if a.tflite and len(a.tflite) > 1:
        inter = bench_tflite_interleaved(a.tflite, a.reps, a.tflite_threads)
        res["tflite_interleaved"] = inter
        first = inter[a.tflite[0]]
        for f, r in inter.items():
            print(
                f"interleaved {f}: "
                + ", ".join(
                    f"{sig} {t:.2f} s ({first[sig] / t:.2f}x the first file)"
                    for sig, t in r.items()
                ),
                flush=True,
            )
    if a.peer:
        for b in [] if a.tflite_only else a.batch:
            peer = run_peer(a.peer, a.peer_python, b, a.size, a.steps, a.peer_reps)
            per_batch[str(b)]["peer_train_step_s"] = peer["train_step_s"]
            per_batch[str(b)]["speedup_train"] = (
                peer["train_step_s"] / per_batch[str(b)]["train_step_s"]
            )
            if b == a.batch[0]:
                res["peer_train_step_s"] = peer["train_step_s"]
                res["speedup_train"] = per_batch[str(b)]["speedup_train"]
                res["peer_variance10_s"] = peer["variance10_s"]
                if "variance10_s" in res:  # the library's default path
                    res["speedup_variance10"] = peer["variance10_s"] / res["variance10_s"]
                    res["speedup_variance10_vmap"] = peer["variance10_s"] / res["variance10_vmap_s"]
            print(
                f"peer (authors' PyTorch) batch {b}: train step {peer['train_step_s']:.2f} s",
                flush=True,
            )
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
