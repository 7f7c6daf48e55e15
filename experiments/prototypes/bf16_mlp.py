"""Prototype (issue 17, session 22): the chunked MLP's matmuls in bfloat16 on this CPU (AMX).

The issue leaves open whether bfloat16 matmuls (float32 accumulation) pay in a fused or
reshaped form, since a plain (cells, 48) @ (48, 128) dot did not. This patches a copy of the
library's chunked MLP (`mlp.cell_mlp_chunked`: the same forward and hand-written backward) whose
six matmuls per chunk take bfloat16 operands and accumulate in float32; the statistics (mean,
covariance) stay float32. It times the training step and one prediction of the library's path
with each, interleaved in one process, and prints how far the bfloat16 prediction moves.

Usage: python experiments/prototypes/bf16_mlp.py [--batch 4] [--size 256] [--reps 3]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from nca_jax import mlp
from nca_jax.bench import predict_runner, timeit_interleaved, train_runner
from nca_jax.config import ModelConfig


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b with bfloat16 operands and a float32 result."""
    return jnp.dot(
        a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32
    )


def _fwd(x, w1, b1, scale, shift, w2, eps, chunk):
    del b1
    xc, m, cov, rstd, a, wf, c = mlp._folded_stats(x, w1, scale, shift, eps)

    def body(_, xk):
        return None, mm(jax.nn.relu(mm(xk, wf) + c), w2)

    out = jax.lax.scan(body, None, mlp._row_chunks(xc, chunk))[1]
    return out.reshape(-1, w2.shape[1])[: x.shape[0]], (xc, m, w1, scale, w2, cov, rstd, a, c)


def _bwd(eps, chunk, res, g):
    del eps
    xc, _, w1, _, w2, _, _, a, c = res
    n, wf = xc.shape[0], w1 * a

    def body(acc, xg):
        xk, gk = xg
        pre = mm(xk, wf) + c
        dpre = jnp.where(pre > 0, mm(gk, w2.T), 0.0)
        dw2, xdpre, dshift = acc
        acc = (
            dw2 + mm(jnp.maximum(pre, 0.0).T, gk),
            xdpre + mm(xk.T, dpre),
            dshift + jnp.sum(dpre, axis=0),
        )
        return acc, mm(dpre, wf.T)

    zeros = (jnp.zeros_like(w2), jnp.zeros_like(w1), jnp.zeros_like(c))
    (dw2, xdpre, dshift), dxf = jax.lax.scan(
        body, zeros, (mlp._row_chunks(xc, chunk), mlp._row_chunks(g, chunk))
    )
    return mlp._folded_grads(xdpre, dshift, dxf.reshape(-1, xc.shape[1])[:n], dw2, res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def chunked_bf16(x, w1, b1, scale, shift, w2, eps, chunk):
    """mlp.cell_mlp_chunked with bfloat16 matmul operands."""
    return _fwd(x, w1, b1, scale, shift, w2, eps, chunk)[0]


chunked_bf16.defvjp(_fwd, _bwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    mc = ModelConfig()
    # each runner traces at its first call: the float32 ones before the patch, the others after
    fns = {
        "float32 train": train_runner(mc, a.size, a.batch),
        "float32 predict": predict_runner(mc, a.size),
    }
    vals = {k: fn() for k, fn in fns.items()}
    orig, mlp.cell_mlp_chunked = mlp.cell_mlp_chunked, chunked_bf16
    try:
        more = {
            "bf16 train": train_runner(mc, a.size, a.batch),
            "bf16 predict": predict_runner(mc, a.size),
        }
        vals.update({k: fn() for k, fn in more.items()})
    finally:
        mlp.cell_mlp_chunked = orig
    fns.update(more)
    diff = float(jnp.abs(vals["float32 predict"] - vals["bf16 predict"]).max())
    med = timeit_interleaved(fns, a.reps)
    print({k: f"{v:.3f} s" for k, v in med.items()})
    print(
        f"bfloat16 / float32 speed: training step {med['float32 train'] / med['bf16 train']:.2f}x, "
        f"prediction {med['float32 predict'] / med['bf16 predict']:.2f}x; prediction max "
        f"difference {diff:.1e} (untrained weights)"
    )


if __name__ == "__main__":
    main()
