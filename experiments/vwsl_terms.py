"""Issue 14's lead, measured: how much of VWSL's loss and of its gradient is the consistency term?

For a source run and unlabelled target images: the VWSL targets (median of `samples`
predictions, w = 1 - 2 std), then for `draws` random draws on one batch the terms (seg, cons1,
cons2), the gradient norm of the segmentation part and of gamma x consistency, and the cosine
between the two gradients. No label is read.

Usage:
    python experiments/vwsl_terms.py --run RUN [--weights W.npz] --data DIR --split FILE
        [--images 8] [--draws 3] [--gamma 100] --out results/vwsl_terms.json
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import checkpoint as ckpt
from nca_jax.config import FinetuneConfig
from nca_jax.data import load_split
from nca_jax.finetuning import sample
from nca_jax.model import draw_patch_corners
from nca_jax.vwsl import KEY_A1, KEY_A2, KEY_B1, KEY_B2, targets_from_probs, vwsl_terms


def tree_norm(t) -> float:
    return float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(t))))


def tree_dot(a, b) -> float:
    return float(
        sum(
            jnp.sum(x * y)
            for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--weights")
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--gamma", type=float, default=100.0)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg, params = ckpt.load_run(a.run, a.weights)
    fc = FinetuneConfig(gamma=a.gamma, samples=a.samples)
    cfg = dataclasses.replace(cfg, finetune=fc)
    data = load_split(a.data, a.split, size=cfg.train.image_size, require_masks=False)
    images = data.images[: a.images]
    probs = sample(params, cfg, images, jax.random.key(0))
    t, w = targets_from_probs(probs, fc.target_reduce, fc.weight_kind)
    x, t, w = jnp.asarray(images), jnp.asarray(t), jnp.asarray(w)
    mc = cfg.model

    def parts(prm, key):
        keys = tuple(jax.random.fold_in(key, k) for k in (KEY_A1, KEY_B1, KEY_A2, KEY_B2))
        yx = draw_patch_corners(key, mc, x.shape[0], x.shape[1])
        terms = vwsl_terms(prm, x, t, w, cfg=mc, keys=keys, patch_yx=yx, unroll=mc.unroll)
        return terms

    @jax.jit
    def measure(prm, key):
        """The terms and the gradients of seg and of gamma x (cons1 + cons2), one forward."""

        def f(q):
            tm = parts(q, key)
            return jnp.stack([tm["seg"], a.gamma * (tm["cons1"] + tm["cons2"])]), tm

        vals, pull, tm = jax.vjp(f, prm, has_aux=True)
        (gs,) = pull(jnp.array([1.0, 0.0]))
        (gc,) = pull(jnp.array([0.0, 1.0]))
        return vals, tm, gs, gc

    rows = []
    for d in range(a.draws):
        key = jax.random.key(100 + d)
        vals, tm, gs, gc = measure(params, key)
        terms = {k: float(v) for k, v in tm.items()}
        s, c = float(vals[0]), float(vals[1])
        ns, nc = tree_norm(gs), tree_norm(gc)
        rows.append(
            {
                **terms,
                "gamma_x_consistency": c,
                "share_of_loss_consistency": c / (s + c),
                "grad_norm_seg": ns,
                "grad_norm_gamma_consistency": nc,
                "grad_ratio_consistency_over_seg": nc / ns,
                "grad_cosine": tree_dot(gs, gc) / (ns * nc),
            }
        )
        print(rows[-1], flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out = {
        "run": a.run,
        "weights": a.weights,
        "data": a.data,
        "split": a.split,
        "images": len(images),
        "draws": a.draws,
        "gamma": a.gamma,
        "samples": a.samples,
        "target_foreground_share": float(np.mean(np.asarray(t))),
        "mean_weight": float(np.mean(np.asarray(w))),
        "mean": mean,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    ckpt.write_json(a.out, out)
    print(mean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
