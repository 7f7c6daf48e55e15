"""Where one supervised training step spends its time on XLA CPU (issue 17, goal 1): a
jax.profiler trace of one step after warm-up, read back and summarised.

Prints the step's wall time, each XLA op's summed time (its thunk's trace event; ops that
hand their work to a thread pool asynchronously, such as Eigen's convolutions, show only the
launch), how much of the wall time some op event covers, and the gaps between op events
grouped by the ops on either side. Nothing is written outside a temporary folder.

Usage: python experiments/prototypes/profile_step.py [--batch 4] [--size 256] [--steps 50]
                                                     [--warmup 3] [--top 20] [--predict]
--predict profiles one prediction (1 x size x size, the bench's) instead of a training step.
Run it with nothing else on the machine: the gaps are what another process's load inflates.
"""

from __future__ import annotations

import os

# XLA reads its flags once, when the backend starts: ask for one trace event per thunk
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nca_jax.bench import predict_runner  # noqa: E402
from nca_jax.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from nca_jax.training import init_state, make_train_step  # noqa: E402

# trace events that are not an XLA op's own work
NOT_OPS = (
    "ThunkExecutor",
    "ThreadpoolListener",
    "SlinkyThreadPool",
    "end:",
    "$",
    "PjitFunction",
    "CommonPjRt",
    "Wait for",
)
EXECUTE = "ThunkExecutor::Execute (wait for completion)"


def merged(intervals: list[tuple[float, float]]) -> list[list[float]]:
    """Sorted, non-overlapping union of (start, end) intervals."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def summarise(events: list[dict], top: int) -> dict:
    """Op times, coverage and gaps of the one executed step in `events` (Chrome trace 'X'
    events, microseconds)."""
    step = max((e for e in events if e["name"] == EXECUTE), key=lambda e: e["dur"])
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    ops = sorted(
        (e for e in events if t0 <= e["ts"] < t1 and not e["name"].startswith(NOT_OPS)),
        key=lambda e: e["ts"],
    )
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in ops:
        k = re.sub(r"\.\d+$", "", e["name"])
        per_op[k][0] += 1
        per_op[k][1] += e["dur"]
    covered = sum(e - s for s, e in merged([(e["ts"], e["ts"] + e["dur"]) for e in ops]))
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])
    end, prev = t0, "START"
    for e in ops:
        name = re.sub(r"\.\d+$", "", e["name"])
        if e["ts"] > end:
            gaps[(prev, name)][0] += 1
            gaps[(prev, name)][1] += e["ts"] - end
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], name
    if t1 > end:
        gaps[(prev, "END")][0] += 1
        gaps[(prev, "END")][1] += t1 - end
    ms = 1e-3
    return {
        "step_ms": step["dur"] * ms,
        "ops_cover_ms": covered * ms,
        "ops_thread_ms": sum(v[1] for v in per_op.values()) * ms,
        "op_events": len(ops),
        "ops": [
            (k, int(c), t * ms) for k, (c, t) in sorted(per_op.items(), key=lambda kv: -kv[1][1])
        ][:top],
        "gaps": [
            (a, b, int(c), t * ms)
            for (a, b), (c, t) in sorted(gaps.items(), key=lambda kv: -kv[1][1])
        ][:top],
    }


def profile_train_step(batch: int, size: int, steps: int, warmup: int) -> list[dict]:
    """Trace events of one supervised step (Med-NCA defaults but `steps` per level) at
    `batch` x `size` px, after `warmup` steps."""
    cfg = RunConfig(
        model=ModelConfig(steps=steps), train=TrainConfig(batch_size=batch, image_size=size)
    ).validate()
    step = make_train_step(cfg)
    rng = np.random.default_rng(0)
    data = {
        "images": jnp.asarray(rng.uniform(size=(batch, size, size)), jnp.float32),
        "masks": jnp.asarray(rng.uniform(size=(batch, size, size)) > 0.5, jnp.float32),
    }
    key = jax.random.key(0)
    state = init_state(cfg)
    for _ in range(warmup):
        t = time.perf_counter()
        state, info = step(state, data, key)
        jax.block_until_ready(info)
        print(f"warm-up step {time.perf_counter() - t:.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            state, info = step(state, data, key)
            jax.block_until_ready(info)
        (trace,) = Path(tmp).glob("plugins/profile/*/*.trace.json.gz")
        with gzip.open(trace) as f:
            return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def profile_prediction(size: int, steps: int, warmup: int) -> list[dict]:
    """Trace events of one prediction (1 x `size` px, `steps` per level), after `warmup`."""
    run = predict_runner(ModelConfig(steps=steps), size)
    for _ in range(warmup):
        t = time.perf_counter()
        jax.block_until_ready(run())
        print(f"warm-up prediction {time.perf_counter() - t:.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(run())
        (trace,) = Path(tmp).glob("plugins/profile/*/*.trace.json.gz")
        with gzip.open(trace) as f:
            return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--predict", action="store_true", help="profile one prediction instead")
    a = ap.parse_args()
    if a.predict:
        events = profile_prediction(a.size, a.steps, a.warmup)
    else:
        events = profile_train_step(a.batch, a.size, a.steps, a.warmup)
    s = summarise(events, a.top)
    print(
        f"profiled step {s['step_ms']:.1f} ms; op events cover {s['ops_cover_ms']:.1f} ms of it "
        f"({100 * s['ops_cover_ms'] / s['step_ms']:.0f}%); {s['op_events']} op events, "
        f"{s['ops_thread_ms']:.1f} ms summed over threads"
    )
    print("\nop                                        events   ms (summed over threads)")
    for k, c, t in s["ops"]:
        print(f"{k[:42]:42s} {c:6d} {t:9.1f}")
    print("\ngap (no op event on any thread) after -> before        count   ms")
    for a_, b, c, t in s["gaps"]:
        print(f"{(a_ + ' -> ' + b)[:52]:52s} {c:6d} {t:7.1f}")


if __name__ == "__main__":
    main()
