"""Micro-benchmark (issue 17, goal 1, session 19): the per-cell MLP's value and gradient, plain
(`mlp.cell_mlp`) against the batch norm folded into the first dense layer through the input's
covariance (`mlp.cell_mlp_folded`, config `model.fold_norm`), timed interleaved in one process.

The hidden pre-activation h = x @ w1 + b1 has mean mu @ w1 + b1 and, per feature, variance
diag(w1^T cov(x) w1), with mu (F,) and cov(x) (F, F) the statistics of the N input rows. So
norm(h) * scale + shift = x @ (w1 * a) + (shift - (mu @ w1) * a) with a = scale * rsqrt(var +
eps): one dense layer whose weights depend on (F, F) statistics. The (N, hidden) array is never
normalised in a pass of its own, and the backward keeps only relu(pre) (which the forward makes
anyway) instead of the normalised features. b1 cancels (its gradient is exactly 0; in the
unfolded form it is 0 up to rounding).

Usage: python experiments/prototypes/folded_norm.py [--rows 16384 65536] [--reps 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax.mlp import cell_mlp, cell_mlp_folded


def _inputs(n: int, f: int = 48, h: int = 128, c: int = 16, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (n, f)) * 0.7 + 0.3
    w1 = jax.random.normal(ks[1], (f, h)) / np.sqrt(f)
    b1 = 0.1 * jax.random.normal(ks[2], (h,))
    scale = 1.0 + 0.1 * jax.random.normal(ks[3], (h,))
    shift = 0.1 * jax.random.normal(ks[4], (h,))
    w2 = jax.random.normal(ks[5], (h, c)) / np.sqrt(h)
    g = jax.random.normal(ks[6], (n, c))
    return (x, w1, b1, scale, shift, w2), g


def grad_fn(mlp):
    def loss(args, g):
        return jnp.sum(mlp(*args, 1e-5) * g)

    return jax.jit(jax.value_and_grad(loss))


def time_mlps(mlps: dict[str, Any], n: int, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each MLP's value and gradient (`grad_fn`) on the same n `_inputs` rows, timed
    interleaved (bench.timeit_interleaved, 2 reps + 1 calls each): (median seconds per call,
    max relative difference of its value and gradients from the first MLP's)."""
    from nca_jax.bench import timeit_interleaved

    args, g = _inputs(n)
    fns = {k: functools.partial(grad_fn(fn), args, g) for k, fn in mlps.items()}
    ref = next(iter(fns.values()))()
    err = {
        k: max(
            float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(u)) + 1e-30))
            for u, v in zip(jax.tree.leaves(ref), jax.tree.leaves(fn()), strict=True)
        )
        for k, fn in fns.items()
    }
    return timeit_interleaved(fns, 2 * reps + 1), err


def report(med: dict[str, float], unit: float, name: str) -> str:
    """'name time unit (speed-up against the first)' for each timed variant."""
    base = next(iter(med.values()))
    return ", ".join(f"{k} {v * unit:.3g} {name} ({base / v:.2f}x)" for k, v in med.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    fns = {"cell_mlp": grad_fn(cell_mlp), "folded": grad_fn(cell_mlp_folded)}
    for n in a.rows:
        args, g = _inputs(n)
        ref = fns["cell_mlp"](args, g)
        got = fns["folded"](args, g)
        err = [
            float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(u)) + 1e-30))
            for u, v in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True)
        ]
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.reps):  # interleaved, so load changes hit both alike
            for k, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(args, g))
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        print(
            f"rows {n}: cell_mlp {med['cell_mlp'] * 1e3:.2f} ms, folded "
            f"{med['folded'] * 1e3:.2f} ms, speed-up {med['cell_mlp'] / med['folded']:.2f}x; "
            f"max relative difference per output/gradient {[f'{e:.1e}' for e in err]}"
        )


if __name__ == "__main__":
    main()
