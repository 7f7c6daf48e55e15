"""Prototype (issue 17, goal 1, session 20): the folded MLP's backward recomputing relu(pre)
instead of keeping it.

`mlp.cell_mlp_folded` keeps r = relu(pre), (N, hidden) per NCA step, for its backward: at
batch 4 that is 16,384 x 128 x 4 B = 8 MB per step, 800 MB over the 2 x 50 steps of a training
step, written in the forward and read back in the backward. This variant keeps only the centred
input (N, 48) that the folded forward keeps anyway, and recomputes pre = xc @ (w1 * a) + c in the
backward (one more (N, 48) @ (48, hidden) matmul per step, a third more dense_in work).

Timed interleaved in one process against the library's folded MLP: the MLP alone (value and
gradient), then the whole supervised training step (configs/paper.json model, 256 px, 50 steps),
each built once per variant by swapping `mlp.cell_mlp_folded` before its first call (its
trace). Gradients compared to the library's.

Usage: python experiments/prototypes/folded_recompute.py [--rows 16384] [--batch 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from experiments.prototypes.folded_norm import report, time_mlps
from nca_jax import mlp
from nca_jax.bench import timeit_interleaved, train_runner
from nca_jax.config import ModelConfig


def _fwd(x, w1, b1, scale, shift, w2, eps):
    """The library's folded forward, keeping the bias c of pre = xc @ (w1 * a) + c instead of
    relu(pre) for the backward (xa: the centred rows and the library's column of ones)."""
    out, (xa, m, w1, scale, w2, cov, rstd, a, _) = mlp._folded_forward(
        x, w1, b1, scale, shift, w2, eps
    )
    return out, (xa, m, w1, scale, w2, cov, rstd, a, shift - (m @ w1) * a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def mlp_recompute(x, w1, b1, scale, shift, w2, eps):
    return _fwd(x, w1, b1, scale, shift, w2, eps)[0]


def _bwd(eps, res, g):
    """pre recomputed from the centred input, then the library's folded backward."""
    xa, m, w1, scale, w2, cov, rstd, a, c = res
    r = jax.nn.relu(xa @ jnp.concatenate([w1 * a, c[None]], axis=0))
    return mlp._cell_mlp_folded_bwd(eps, False, (xa, m, w1, scale, w2, cov, rstd, a, r), g)


mlp_recompute.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def mlp_recompute_barrier(x, w1, b1, scale, shift, w2, eps):
    return _fwd(x, w1, b1, scale, shift, w2, eps)[0]


def _bwd_barrier(eps, res, g):
    # an optimisation barrier, so that XLA cannot merge the recomputed pre with the forward's
    # (in one unrolled graph it otherwise keeps the forward's value: no recompute at all)
    xc, m, w1, scale, w2, cov, rstd, a, c = res
    xc, g = jax.lax.optimization_barrier((xc, g))
    return _bwd(eps, (xc, m, w1, scale, w2, cov, rstd, a, c), g)


mlp_recompute_barrier.defvjp(_fwd, _bwd_barrier)

VARIANTS = {"keep r": None, "recompute": mlp_recompute, "barrier": mlp_recompute_barrier}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[16384])
    ap.add_argument("--batch", type=int, nargs="*", default=[4])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    library = mlp.cell_mlp_folded
    for n in a.rows:
        med, err = time_mlps({k: fn or library for k, fn in VARIANTS.items()}, n, a.reps)
        print(f"MLP alone, {n} rows:", report(med, 1e3, "ms"), f"max relative diff {err}")
    for b in a.batch:
        fns, losses = {}, {}
        for name, fn in VARIANTS.items():
            mlp.cell_mlp_folded = fn or library  # read when the step is traced
            fns[name] = train_runner(ModelConfig(mlp_chunk=0), 256, b)  # all cells at once
            losses[name] = float(fns[name]())  # traces and compiles with this variant
        mlp.cell_mlp_folded = library
        med = timeit_interleaved(fns, a.reps)
        print(f"training step, batch {b}:", report(med, 1, "s"), f"first losses {losses}")


if __name__ == "__main__":
    main()
