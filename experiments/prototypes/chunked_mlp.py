"""Prototype (issue 17, goal 1, session 21): how many cells per chunk for the chunked MLP.

`model.mlp_chunk` runs the folded MLP a chunk of cells at a time (`mlp.cell_mlp_chunked`): only
the statistics use all cells at once, every (chunk, hidden) array stays in cache, and the
backward recomputes the chunk's pre-activations instead of reading relu(pre) back from memory.
This sweep times the library's MLP alone (value and gradient) and the whole supervised training
step at several chunk sizes, interleaved in one process, against all cells at once (chunk 0),
and checks the gradients against chunk 0's.

Session 24 added --size/--steps (the bench's 128 px / 20 steps case) and --predict (one
1 x size prediction per chunk size), to re-tune the chunk on another CPU kind (AMD EPYC).

Usage: python experiments/prototypes/chunked_mlp.py [--rows 16384 65536]
       [--chunks 1024 2048 4096] [--batch 4] [--size 256] [--steps 50] [--predict] [--reps 5]
"""

from __future__ import annotations

import argparse
import functools

from experiments.prototypes.folded_norm import report, time_mlps
from nca_jax import mlp
from nca_jax.bench import predict_runner, timeit_interleaved, train_runner
from nca_jax.config import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[16384, 65536])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batch", type=int, nargs="*", default=[4])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="NCA steps per level")
    ap.add_argument("--predict", action="store_true", help="also time one 1 x size prediction")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    chunks = [0, *a.chunks]
    mlps = {f"chunk {k}": functools.partial(mlp.folded_mlp, chunk=k) for k in chunks}
    for n in a.rows:
        med, err = time_mlps(mlps, n, a.reps)
        print(f"MLP alone, {n} rows:", report(med, 1e3, "ms"), f"max relative diff {err}")

    def model(k: int) -> ModelConfig:
        return ModelConfig(mlp_chunk=k, steps=a.steps, patch=a.size // 4)

    where = f"{a.size} px, {a.steps} steps"
    for b in a.batch:
        fns = {f"chunk {k}": train_runner(model(k), a.size, b) for k in chunks}
        losses = {k: float(fn()) for k, fn in fns.items()}
        med = timeit_interleaved(fns, a.reps)
        print(f"training step, batch {b}, {where}:", report(med, 1, "s"), f"losses {losses}")
    if a.predict:
        fns = {f"chunk {k}": predict_runner(model(k), a.size) for k in chunks}
        for fn in fns.values():
            fn()
        med = timeit_interleaved(fns, a.reps)
        print(f"one prediction, 1 x {a.size}, {a.steps} steps:", report(med, 1, "s"))


if __name__ == "__main__":
    main()
