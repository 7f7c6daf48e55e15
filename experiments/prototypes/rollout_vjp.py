"""Prototype (issue 17, session 9; measured SLOWER, kept to reproduce the figure): one NCA
level's rollout with a custom VJP whose weight gradients are batched over the steps.

The backward loop computes only what the chain through the states needs; the per-step hidden
cotangents dh_t and update cotangents g_t are stacked, and dW1 = X^T DH and dW2 = A^T G are
formed once as two large GEMMs over steps x cells. Gradients equal autodiff's (tested in
tests/test_experiments.py); on this CPU one level's gradient (batch 4, 64 x 64 cells, 50 steps)
took 1.67 s against 1.29-1.33 s for model.rollout's autodiff (results/README.md).

Usage: python experiments/prototypes/rollout_vjp.py [--batch 4] [--size 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax.config import ModelConfig
from nca_jax.mlp import _mlp_forward
from nca_jax.model import Params, Perceive, _update_channels, init_params, rollout


def make_rollout(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """roll(level_params, state (B,H,W,C), masks (steps,B,H,W,1)) -> state, the same function
    as model.rollout(masks=...), with the batched-weight-gradient VJP. Channel 0 (the image)
    gets no update, as in the library since session 30 (it was sliced back in before)."""
    c, eps = cfg.channels, cfg.bn_eps
    keep = _update_channels(cfg)

    def perc(pp: Params, s: jax.Array) -> jax.Array:
        return Perceive(c).apply({"params": pp}, s)

    def step(p: Params, s: jax.Array, m: jax.Array):
        f = perc(p["perceive"], s)
        b, h, w, nf = f.shape
        mlp = (p["dense_in"]["kernel"], p["dense_in"]["bias"], p["norm"]["scale"])
        out, (x, _, _, _, _, xhat, rstd) = _mlp_forward(
            f.reshape(-1, nf), *mlp, p["norm"]["bias"], p["dense_out"]["kernel"], eps
        )
        return s + out.reshape(b, h, w, c) * keep * m, (s, x, xhat, rstd)

    @jax.custom_vjp
    def roll(p: Params, s: jax.Array, masks: jax.Array) -> jax.Array:
        for t in range(masks.shape[0]):
            s, _ = step(p, s, masks[t])
        return s

    def fwd(p, s, masks):
        res = []
        for t in range(masks.shape[0]):
            s, r = step(p, s, masks[t])
            res.append(r)
        return s, (p, masks, res)

    def bwd(saved, g):
        p, masks, res = saved
        w1, w2 = p["dense_in"]["kernel"], p["dense_out"]["kernel"]
        sc, sh = p["norm"]["scale"], p["norm"]["bias"]
        dscale, dshift = jnp.zeros_like(sc), jnp.zeros_like(sh)
        db1 = jnp.zeros_like(p["dense_in"]["bias"])
        g_perc = jax.tree_util.tree_map(jnp.zeros_like, p["perceive"])
        xs, dhs, acts, gds = [], [], [], []
        for t in reversed(range(masks.shape[0])):
            s, x, xhat, rstd = res[t]
            b, h, w, _ = s.shape
            n = x.shape[0]
            gd = (g * keep * masks[t]).reshape(n, c)  # channel 0 (the image) has no update
            pre = xhat * sc + sh
            dn = jnp.where(pre > 0, gd @ w2.T, 0.0)
            ds, dsh = jnp.sum(dn * xhat, 0), jnp.sum(dn, 0)
            dh = (rstd * sc) * (dn - dsh / n - xhat * (ds / n))
            dscale, dshift, db1 = dscale + ds, dshift + dsh, db1 + jnp.sum(dh, 0)
            xs.append(x)
            dhs.append(dh)
            acts.append(jnp.maximum(pre, 0.0))
            gds.append(gd)
            _, pullback = jax.vjp(perc, p["perceive"], s)
            gp, gs = pullback((dh @ w1.T).reshape(b, h, w, 3 * c))
            g_perc = jax.tree_util.tree_map(jnp.add, g_perc, gp)
            g = g + gs
        grads = {
            "perceive": g_perc,
            "dense_in": {"kernel": jnp.concatenate(xs).T @ jnp.concatenate(dhs), "bias": db1},
            "norm": {"scale": dscale, "bias": dshift},
            "dense_out": {"kernel": jnp.concatenate(acts).T @ jnp.concatenate(gds)},
        }
        return grads, g, jnp.zeros_like(masks)

    roll.defvjp(fwd, bwd)
    return roll


def problem(cfg: ModelConfig, batch: int, size: int, seed: int = 0) -> tuple[Any, ...]:
    """Level-2 parameters with a non-zero output layer, a state (channel 0 an image), fire
    masks and a cotangent target: (params, state, masks, target)."""
    rng = np.random.default_rng(seed)
    p = init_params(cfg, key=jax.random.key(seed))["level2"]
    shape = p["dense_out"]["kernel"].shape
    p["dense_out"]["kernel"] = jnp.asarray(rng.normal(size=shape).astype(np.float32) * 0.05)
    img = jnp.asarray(rng.uniform(size=(batch, size, size, 1)).astype(np.float32))
    rest = rng.normal(size=(batch, size, size, cfg.channels - 1)).astype(np.float32) * 0.1
    s0 = jnp.concatenate([img, jnp.asarray(rest)], -1)
    m = (rng.uniform(size=(cfg.steps, batch, size, size, 1)) < 0.5).astype(np.float32)
    tgt = rng.normal(size=(batch, size, size, cfg.channels)).astype(np.float32)
    return p, s0, jnp.asarray(m), jnp.asarray(tgt)


def losses(cfg: ModelConfig) -> tuple[Callable, Callable]:
    """(reference loss through model.rollout, the same loss through the prototype)."""
    roll = make_rollout(cfg)

    def ref(p, s, m, t):
        return jnp.sum(jnp.tanh(rollout(p, s, cfg=cfg, masks=m, unroll=True)) * t)

    def new(p, s, m, t):
        return jnp.sum(jnp.tanh(roll(p, s, m)) * t)

    return ref, new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    cfg = ModelConfig()
    args = problem(cfg, a.batch, a.size)
    ref, new = losses(cfg)
    for name, f in (("autodiff", ref), ("whole-rollout VJP", new), ("autodiff again", ref)):
        grad = jax.jit(jax.grad(f))
        jax.block_until_ready(grad(*args))
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            jax.block_until_ready(grad(*args))
            ts.append(time.perf_counter() - t)
        print(f"{name}: {statistics.median(ts):.3f} s per level gradient", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
