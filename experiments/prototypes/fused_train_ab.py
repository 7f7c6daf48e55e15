"""A/B of the training step with its NCA steps as the fused kernels (model.fused_train 1)
against XLA's ops (0), calls interleaved in one process (issue 17, goal 1; session 33).

    OMP_NUM_THREADS=2 python experiments/prototypes/fused_train_ab.py --size 256 --batch 4 16 \
        --steps 50 --reps 5 --json results/bench/fused-train-ab-<kind>-s33.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nca_jax.bench import (  # noqa: E402
    cpu_model,
    matmul_gflops,
    timeit_interleaved,
    train_flop,
    train_runner,
)
from nca_jax.config import ModelConfig  # noqa: E402
from nca_jax.fused import kernel_status  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, nargs="+", default=[4])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", required=True)
    a = p.parse_args()
    print(kernel_status(), flush=True)
    mc = ModelConfig(steps=a.steps, patch=a.size // 4)
    res = {"cpu_model": cpu_model(), "size": a.size, "steps": a.steps, "reps": a.reps,
           "matmul_gflops": matmul_gflops(), "per_batch": {}}  # fmt: skip
    t0 = time.time()
    for b in a.batch:
        runs = {
            name: train_runner(dataclasses.replace(mc, fused_train=v), a.size, b)
            for name, v in (("xla", 0), ("fused", 1))
        }
        t = timeit_interleaved(runs, a.reps)
        flops = train_flop(mc, b)
        r = {f"{k}_s": v for k, v in t.items()}
        r.update(
            {
                f"{k}_fraction_of_matmul": flops / v / 1e9 / res["matmul_gflops"]
                for k, v in t.items()
            }
        )
        r["speedup"] = t["xla"] / t["fused"]
        res["per_batch"][str(b)] = r
        print(b, json.dumps(r), flush=True)
    res["matmul_gflops_after"] = matmul_gflops()
    res["wall_s"] = time.time() - t0
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
