"""Prototype (issue 17, goal 3, session 25): does `mlp.transposed` (w.T behind an optimization
barrier, for the TFLite converter) cost the JAX path anything? The training step (batch 4, 256
px, 50 steps) and one prediction, traced once with it and once with a plain transpose (the
module attribute swapped between the two traces), timed interleaved in one process. The two
steps' losses are printed: they must agree.

Usage: python experiments/prototypes/transposed_ab.py [--reps 7]
"""

from __future__ import annotations

import argparse
import json

import jax

from nca_jax import mlp
from nca_jax.bench import predict_runner, timeit_interleaved, train_runner
from nca_jax.config import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    mc = ModelConfig(steps=50, patch=64)
    fns = {"train_barrier": train_runner(mc, 256, 4), "predict_barrier": predict_runner(mc, 256)}
    for fn in fns.values():
        jax.block_until_ready(fn())  # traced now, with the barrier
    library = mlp.transposed
    mlp.transposed = lambda w: w.T
    try:
        fns["train_plain"] = train_runner(mc, 256, 4)
        fns["predict_plain"] = predict_runner(mc, 256)
        for k in ("train_plain", "predict_plain"):
            jax.block_until_ready(fns[k]())
    finally:
        mlp.transposed = library
    print("losses of the next steps:", float(fns["train_barrier"]()), float(fns["train_plain"]()))
    t = timeit_interleaved(fns, a.reps)
    print(json.dumps(t))
    for what in ("train", "predict"):
        print(f"{what}: plain / barrier = {t[f'{what}_plain'] / t[f'{what}_barrier']:.3f}")


if __name__ == "__main__":
    main()
