"""The per-cell update MLP of a Med-NCA level with its batch-stats norm, as plain functions
with hand-written backward passes: x (N, F) per-cell features -> (N, C) updates, where the norm
uses the statistics over all N cells.

Three implementations of one function (tested against the Flax rule's autodiff): `cell_mlp`
(the norm as written), `cell_mlp_folded` (the norm folded into the first dense layer, the
default) and `cell_mlp_chunked` (the folded one a chunk of cells at a time); and
`cell_mlp_rows`, the folded one on the cells that fire only (times the fire mask).
`model.apply_rule` picks one from the ModelConfig.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def transposed(w: jax.Array) -> jax.Array:
    """w (K, M) -> w.T (M, K), kept as a tensor of its own for the TFLite export.

    Left alone, the converter folds `x @ w.T` into a FULLY_CONNECTED op, which LiteRT's XNNPACK
    delegate does not take when w is computed in the graph (a weight or a gradient, not a
    constant): it then runs on LiteRT's single-threaded kernel, 2-3x slower than the delegated
    BATCH_MATMUL that `x @ transposed(w)` becomes (a 4096 x 16 @ 16 x 128 probe, 2 threads).
    The barrier costs XLA one copy of a weight-sized array."""
    return jax.lax.optimization_barrier(w.T)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (N, K) @ w (K, M) -> (N, M), whose backward multiplies by `transposed(w)` (see there)."""
    return x @ w


def _matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ w, (x, w)


def _matmul_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    return g @ transposed(w), x.T @ g


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# The per-cell MLP with batch-stats norm, with a hand-written backward pass. XLA CPU's own
# gradient of these few ops is memory-bound (about 10x the forward time); this one keeps only
# the inputs and the normalised features for the backward, recomputes the ReLU, and folds the
# batch-norm gradient into one expression. Same function and gradient (tested against autodiff).


def _mlp_forward(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    h = x @ w1 + b1
    mean = jnp.mean(h, axis=0)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(h - mean), axis=0) + eps)
    xhat = (h - mean) * rstd
    out = jax.nn.relu(xhat * scale + shift) @ w2
    return out, (x, w1, scale, shift, w2, xhat, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def cell_mlp(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
) -> jax.Array:
    """Per-cell features x (N, F) -> update (N, C): relu(norm(x @ w1 + b1)) @ w2, where norm
    uses the statistics over all N cells (biased variance) and then scale and shift (hidden,)."""
    return _mlp_forward(x, w1, b1, scale, shift, w2, eps)[0]


def _cell_mlp_bwd(eps, res, g):
    del eps
    x, w1, scale, shift, w2, xhat, rstd = res
    n = x.shape[0]
    pre = xhat * scale + shift
    dn = jnp.where(pre > 0, g @ transposed(w2), 0.0)
    dw2 = jnp.maximum(pre, 0.0).T @ g
    dscale = jnp.sum(dn * xhat, axis=0)
    dshift = jnp.sum(dn, axis=0)
    dh = (rstd * scale) * (dn - dshift / n - xhat * (dscale / n))
    return dh @ transposed(w1), x.T @ dh, jnp.sum(dh, axis=0), dscale, dshift, dw2


cell_mlp.defvjp(_mlp_forward, _cell_mlp_bwd)  # the forward already returns the residuals


# The same MLP with the batch norm folded into the first dense layer. With mu (F,) and cov
# (F, F) the mean and covariance of the N input rows, the pre-activation h = x @ w1 + b1 has
# h - mean(h) = (x - mu) @ w1 and per-feature variance diag(w1^T cov w1), so
# norm(h) * scale + shift = (x - mu) @ (w1 * a) + shift, a = scale * rsqrt(var + eps).
# The (N, hidden) array is never normalised in a pass of its own, and the backward keeps
# relu(pre) (which the forward makes anyway) instead of the normalised features. Centring x
# first (and taking off the mean that float rounding leaves) also spares the cancellation of
# h - mean(h) when the inputs sit far from 0 with a small spread. b1 cancels: its gradient is
# exactly 0 here (0 up to rounding in `cell_mlp`).


def _folded_stats(
    x: jax.Array,
    w1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    eps: float,
    centred: bool = False,
) -> tuple[jax.Array, ...]:
    """The folded MLP's part over all N rows x (N, F): the centred rows xc (N, F), the mean m
    (F,) that rounding leaves in them, their covariance (F, F), rstd and a = scale * rstd
    (hidden,), the folded weights w1 * a (F, hidden) and bias c (hidden,): pre = xc @ (w1 * a)
    + c is the normalised, scaled and shifted pre-activation. centred: x is already centred
    (`centre_rows`), so xc is x itself and m its whole mean (the same function)."""
    xc = x if centred else x - jnp.mean(x, axis=0)
    m = jnp.mean(xc, axis=0)  # the rounding left in the first mean: small, so exact enough
    cov = (xc.T @ xc) / x.shape[0] - jnp.outer(m, m)
    rstd = jax.lax.rsqrt(jnp.sum((cov @ w1) * w1, axis=0) + eps)
    a = scale * rstd
    return xc, m, cov, rstd, a, w1 * a, shift - (m @ w1) * a


def _ones_column(x: jax.Array) -> jax.Array:
    """x (N, F) -> (N, F + 1), a column of ones appended (a constant of the exported file, not
    a broadcast that LiteRT would run on its reference kernel)."""
    return jnp.concatenate([x, jnp.asarray(np.ones((x.shape[0], 1), np.float32), x.dtype)], 1)


def _folded_forward(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    centred: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`_folded_stats`'s function with a column of ones beside the centred rows, xa (N, F + 1):
    one product xa^T xa gives the covariance and the mean m (its last row), and the bias c
    rides in the first matmul as the folded weights' last row, so that no pass over an (N, F)
    or (N, hidden) array adds it or sums m. XLA writes the ones into the concatenation that
    made x; in LiteRT's graph they join it too (where x was concatenated in 2-D, as
    `model.perceive_centred` does), so relu(xa @ [w1 a; c]) is a product and a ReLU."""
    del b1
    n, f = x.shape
    xa = _ones_column(x if centred else x - jnp.mean(x, axis=0))
    gram = (xa.T @ xa) / n
    m = gram[f, :f]  # the rounding left in the centring: small, so exact enough
    cov = gram[:f, :f] - jnp.outer(m, m)
    rstd = jax.lax.rsqrt(jnp.sum((cov @ w1) * w1, axis=0) + eps)
    a = scale * rstd
    wfa = jnp.concatenate([w1 * a, (shift - (m @ w1) * a)[None]], axis=0)
    r = jax.nn.relu(xa @ wfa)
    return r @ w2, (xa, m, w1, scale, w2, cov, rstd, a, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def cell_mlp_folded(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    centred: bool = False,
) -> jax.Array:
    """`cell_mlp`'s function (x (N, F) -> (N, C)), computed with the norm folded into w1.
    centred: x's columns have mean 0 already (`centre_rows`; the same function, a pass less)."""
    return _folded_forward(x, w1, b1, scale, shift, w2, eps, centred)[0]


def _stats_grads(
    xdpre: jax.Array,
    dshift: jax.Array,
    n: int,
    res: tuple[jax.Array, ...],
) -> tuple[jax.Array, ...]:
    """The folded MLP's weight gradients from the sums its backward makes over the n rows:
    xdpre = xc^T @ dpre (F, hidden), dshift = the column sums of dpre (hidden,); res = the
    forward's (rows, m, w1, scale, w2, cov, rstd, a, ...). -> dw1, dscale, and what the rows'
    gradient takes: dx = dpre @ (w1 a)^T + xc @ dcov2 - row, with dcov2 (F, F) and row (F,)."""
    _, m, w1, scale, _, cov, rstd, a = res[:8]
    dw1a = xdpre - jnp.outer(m, dshift)  # the gradient of the folded weights w1 * a
    da = jnp.sum(dw1a * w1, axis=0)
    dvar = da * scale * (-0.5) * rstd**3
    dcov = (w1 * dvar) @ transposed(w1)
    dw1 = dw1a * a + 2.0 * (cov @ w1) * dvar
    # through the centring: the row mean of the rows' gradient comes off (the cov term's is 0).
    # (2 / n) (xc - m) @ dcov is written xc @ ((2 / n) dcov) less a row, so that no pass over
    # the (N, F) rows subtracts m or scales: both go into the one (F,) row taken off.
    dcov2 = (2.0 / n) * dcov
    row = m @ dcov2 + (dshift @ transposed(w1 * a)) / n
    return dw1, da * rstd, dcov2, row


def _folded_grads(
    xdpre: jax.Array,
    dshift: jax.Array,
    dx_rows: jax.Array,
    dw2: jax.Array,
    res: tuple[jax.Array, ...],
) -> tuple[jax.Array, ...]:
    """The folded MLP's gradients from the row sums its backward makes: xdpre = xc^T @ dpre
    (F, hidden), dshift = the column sums of dpre (hidden,), dx_rows = dpre @ (w1 * a)^T
    (N, F), dw2 (hidden, C); res = the forward's (xc, m, w1, scale, w2, cov, rstd, a, ...).
    -> the gradients of (x, w1, b1, scale, shift, w2)."""
    xc, a = res[0], res[7]
    dw1, dscale, dcov2, row = _stats_grads(xdpre, dshift, xc.shape[0], res)
    dx = dx_rows + xc @ dcov2 - row
    return dx, dw1, jnp.zeros_like(a), dscale, dshift, dw2


def _cell_mlp_folded_bwd(eps, centred, res, g):
    del eps, centred
    xa, _, w1, _, w2, _, _, a, r = res
    f = w1.shape[0]
    # r > 0 as ceil(min(r, 1)) (exact for r = relu(pre) >= 0): ops that LiteRT's XNNPACK
    # delegate runs, where the comparison and select of jnp.where ran on LiteRT's own kernels
    dpre = (g @ transposed(w2)) * jnp.ceil(jnp.minimum(r, 1.0))
    xdpre = xa.T @ dpre  # its last row: the column sums of dpre, dshift
    dshift = xdpre[f]
    dw1, dscale, dcov2, row = _stats_grads(xdpre[:f], dshift, xa.shape[0], res)
    # xc @ dcov2 - row as xa @ [dcov2; -row]: the ones column takes the row off
    dx = dpre @ transposed(w1 * a) + xa @ jnp.concatenate([dcov2, -row[None]], axis=0)
    return dx, dw1, jnp.zeros_like(a), dscale, dshift, r.T @ g


cell_mlp_folded.defvjp(_folded_forward, _cell_mlp_folded_bwd)


# The folded MLP in chunks of rows. Only the statistics above use all N rows at once; the rest
# is row by row, so a lax.scan over chunks of `chunk` rows computes it with every (chunk,
# hidden) array in cache instead of (N, hidden) arrays in memory (8 MB per NCA step at batch
# 4). The backward recomputes each chunk's pre-activations (one more (chunk, F) @ (F, hidden)
# matmul) instead of keeping relu(pre), and accumulates the weight gradients chunk by chunk.
# The rows are padded with zeros to a multiple of `chunk`: a padded row gets a zero gradient
# g, so it adds nothing to any weight gradient, and its output is dropped.


def _row_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """(N, F) -> (ceil(N / chunk), chunk, F), the last chunk padded with zero rows."""
    n, f = x.shape
    k = -(-n // chunk)
    return jnp.pad(x, ((0, k * chunk - n), (0, 0))).reshape(k, chunk, f)


def _chunks_fwd(xc: jax.Array, wf: jax.Array, c: jax.Array, w2: jax.Array, chunk: int) -> jax.Array:
    """The folded MLP's forward over rows xc (R, F), `chunk` rows at a time: (R, C)."""

    def body(_: None, xk: jax.Array) -> tuple[None, jax.Array]:
        return None, jax.nn.relu(xk @ wf + c) @ w2

    out = jax.lax.scan(body, None, _row_chunks(xc, chunk))[1]
    return out.reshape(-1, w2.shape[1])[: xc.shape[0]]


def _chunked_forward(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    chunk: int,
    centred: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    del b1
    xc, m, cov, rstd, a, wf, c = _folded_stats(x, w1, scale, shift, eps, centred)
    return _chunks_fwd(xc, wf, c, w2, chunk), (xc, m, w1, scale, w2, cov, rstd, a, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def cell_mlp_chunked(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    chunk: int,
    centred: bool = False,
) -> jax.Array:
    """`cell_mlp`'s function (x (N, F) -> (N, C)), folded, computed `chunk` rows at a time.
    centred: as in `cell_mlp_folded`."""
    return _chunked_forward(x, w1, b1, scale, shift, w2, eps, chunk, centred)[0]


def _chunks_bwd(
    xc: jax.Array, g: jax.Array, wf: jax.Array, c: jax.Array, w2: jax.Array, chunk: int
) -> tuple[jax.Array, ...]:
    """The folded MLP's backward over rows xc (R, F) with output gradients g (R, C), `chunk`
    rows at a time (pre-activations recomputed): (dw2, xdpre, dshift, dx_rows (R, F)), the sums
    `_folded_grads` takes."""
    r = xc.shape[0]

    def body(acc: tuple[jax.Array, ...], xg: tuple[jax.Array, jax.Array]):
        xk, gk = xg
        pre = xk @ wf + c
        dpre = jnp.where(pre > 0, gk @ w2.T, 0.0)
        dw2, xdpre, dshift = acc
        acc = (
            dw2 + jnp.maximum(pre, 0.0).T @ gk,
            xdpre + xk.T @ dpre,
            dshift + jnp.sum(dpre, axis=0),
        )
        return acc, dpre @ wf.T

    zeros = (jnp.zeros_like(w2), jnp.zeros_like(wf), jnp.zeros_like(c))
    (dw2, xdpre, dshift), dxf = jax.lax.scan(
        body, zeros, (_row_chunks(xc, chunk), _row_chunks(g, chunk))
    )
    return dw2, xdpre, dshift, dxf.reshape(-1, xc.shape[1])[:r]


def _cell_mlp_chunked_bwd(eps, chunk, centred, res, g):
    del eps, centred
    xc, _, w1, _, w2, _, _, a, c = res
    dw2, xdpre, dshift, dx_rows = _chunks_bwd(xc, g, w1 * a, c, w2, chunk)
    return _folded_grads(xdpre, dshift, dx_rows, dw2, res)


cell_mlp_chunked.defvjp(_chunked_forward, _cell_mlp_chunked_bwd)


# Only the cells that fire need the MLP. An NCA step keeps a cell's update only where its fire
# mask is 1 (about half the cells), but the norm's statistics are over all cells. So the
# statistics (and their gradient) take every row, and the MLP's matmuls, forward and backward,
# only the fired rows: gathered into a fixed number of slots (`fired_capacity`, far above the
# Binomial count; a step that fires more takes the all-cells path instead), and scattered back.
# A padding slot gathers a clamped row, gets a zero output gradient, and its output is dropped.


def fired_capacity(n: int, rate: float) -> int:
    """Slots for the fired rows among n at fire rate `rate`: the mean count plus 8 standard
    deviations, rounded up to a multiple of 256 and at most n (a Binomial count above it has
    probability below 1e-15)."""
    c = rate * n + 8.0 * math.sqrt(n * rate * (1.0 - rate))
    return min(n, 256 * math.ceil(c / 256))


def _slot_chunk(r: int, chunk: int) -> int:
    """Rows per chunk for r slots, at most `chunk` (0: all at once), in as few chunks as that
    allows, split evenly (multiples of 8): 2304 slots with chunk 2048 are two chunks of 1152,
    not 2048 and a last one mostly padding."""
    if not 0 < chunk < r:
        return r
    count = -(-r // chunk)
    return min(chunk, 8 * -(-r // (8 * count)))


def _rows_forward(
    x: jax.Array,
    rows: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    chunk: int,
    centred: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    del b1
    n = x.shape[0]
    xc, m, cov, rstd, a, wf, c = _folded_stats(x, w1, scale, shift, eps, centred)
    xr = xc[jnp.minimum(rows, n - 1)]
    out = _chunks_fwd(xr, wf, c, w2, _slot_chunk(rows.shape[0], chunk))
    out = jnp.zeros((n, w2.shape[1]), x.dtype).at[rows].set(out, mode="drop")
    return out, (xc, m, w1, scale, w2, cov, rstd, a, c, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def cell_mlp_rows(
    x: jax.Array,
    rows: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    chunk: int,
    centred: bool = False,
) -> jax.Array:
    """The folded MLP's output (N, C) on the rows listed in rows (R,) (distinct indices < N;
    N marks an empty slot) and 0 on the others; the norm's statistics over all N rows of x
    (N, F). `chunk` rows at a time (0: all R at once). centred: as in `cell_mlp_folded`."""
    return _rows_forward(x, rows, w1, b1, scale, shift, w2, eps, chunk, centred)[0]


def _cell_mlp_rows_bwd(eps, chunk, centred, res, g):
    del eps, centred
    xc, _, w1, _, w2, _, _, a, c, rows = res
    n, r = xc.shape[0], rows.shape[0]
    k = _slot_chunk(r, chunk)
    xr = xc[jnp.minimum(rows, n - 1)]
    gr = g.at[rows].get(mode="fill", fill_value=0.0)  # an empty slot: no gradient
    dw2, xdpre, dshift, dxr = _chunks_bwd(xr, gr, w1 * a, c, w2, k)
    dx_rows = jnp.zeros_like(xc).at[rows].set(dxr, mode="drop")
    dx, dw1, db1, dscale, dshift, dw2 = _folded_grads(xdpre, dshift, dx_rows, dw2, res[:9])
    return dx, None, dw1, db1, dscale, dshift, dw2


cell_mlp_rows.defvjp(_rows_forward, _cell_mlp_rows_bwd)


def centre_rows(x: jax.Array) -> jax.Array:
    """x (N, F) minus its column means, for the folded MLP alone: the gradient passes through
    unchanged (the means are behind stop_gradient). That is exact for a function of the rows
    that a common shift of all of them leaves unchanged, as the batch-stats norm makes the MLP:
    its gradient's columns then sum to 0, so the centring's own gradient (which subtracts their
    means) is the identity. The folded MLP's backward makes those sums 0 explicitly."""
    return x - jax.lax.stop_gradient(jnp.mean(x, axis=0))


CPU_CHUNK = 2048  # cells per chunk on CPU (batch 16 training step 1.41-1.50x, session 21)


def resolve_chunk(mlp_chunk: int) -> int:
    """ModelConfig.mlp_chunk -> cells per chunk (0: all at once). -1 (auto) is CPU_CHUNK on
    CPU and 0 on GPU/TPU, where a loop over chunks would only serialise the work."""
    if mlp_chunk >= 0:
        return mlp_chunk
    return CPU_CHUNK if jax.default_backend() == "cpu" else 0


def folded_mlp(
    x: jax.Array,
    w1: jax.Array,
    b1: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    w2: jax.Array,
    eps: float,
    *,
    chunk: int,
    fired: jax.Array | None = None,
    rate: float = 0.5,
    centred: bool = False,
) -> jax.Array:
    """The folded MLP, x (N, F) -> (N, C): `chunk` cells at a time where there are more than
    that (a loop over chunks), else all at once (chunk 0: always).

    With fired (N,), a 0/1 fire mask drawn at `rate`, the output is the MLP's times fired: the
    MLP runs only on the fired rows (`cell_mlp_rows`), unless more of them fired than
    `fired_capacity` holds (then on all rows).

    centred: x's columns have mean 0 already, their gradient passing through the centring
    unchanged (`model.perceive_centred` makes them so as it concatenates the features, with no
    pass of its own over the (N, F) rows); else the rows are centred here (`centre_rows`)."""
    args = (x if centred else centre_rows(x), w1, b1, scale, shift, w2)

    def every(args: tuple[jax.Array, ...]) -> jax.Array:
        if 0 < chunk < x.shape[0]:
            return cell_mlp_chunked(*args, eps, chunk, True)
        return cell_mlp_folded(*args, eps, True)

    if fired is None:
        return every(args)
    n = x.shape[0]
    cap = fired_capacity(n, rate)
    if cap >= n:
        return every(args) * fired[:, None]

    def some(args: tuple[jax.Array, ...]) -> jax.Array:
        (rows,) = jnp.nonzero(fired > 0, size=cap, fill_value=n)
        return cell_mlp_rows(args[0], rows, *args[1:], eps, chunk, True)

    return jax.lax.cond(jnp.sum(fired) <= cap, some, lambda a: every(a) * fired[:, None], args)


def resolve_fired(mlp_fired: int, chunk: int) -> bool:
    """ModelConfig.mlp_fired -> whether the MLP runs only on the fired cells. -1 (auto): where
    the MLP runs in chunks (`resolve_chunk` > 0: on CPU)."""
    return chunk > 0 if mlp_fired == -1 else bool(mlp_fired)
