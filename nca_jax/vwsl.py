"""VWSL (variance-weighted segmentation loss): unsupervised targets and loss for fine-tuning.

Targets: `samples` stochastic full-image predictions of the model per image, all in ONE jitted
vmap over keys; the surrogate target is the 0.5-threshold of their median (authors' code) or
mean (paper); the weight map is w = 1 - 2 std (authors' code) or 1 - 4 var (the paper writes
Var; scaled so it also lies in [0, 1]) of the sigmoid probabilities: w = 1 where all samples agree.
Loss: weighted soft Dice + weighted BCE (or focal) against the target on level 2's patch, plus
gamma * consistency: the mean L1 between the sigmoids of two runs of the SAME level with
different keys on the same input, at level 1 and (divided by 16) at level 2.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax.config import FinetuneConfig, ModelConfig
from nca_jax.fused import resolve as resolve_fused
from nca_jax.losses import segmentation_loss
from nca_jax.model import (
    Params,
    _level1_to_full,
    as_nhwc,
    crop_patches,
    downscale,
    draw_patch_corners,
    rollout,
    seed_state,
    upscale,
)

LEVEL2_CONSISTENCY_DIVISOR = 16.0  # as in the authors' code
KEY_A1, KEY_B1, KEY_A2, KEY_B2 = 11, 12, 21, 22


def targets_from_probs(
    probs: Any, reduce: str = "median", weight_kind: str = "std"
) -> tuple[Any, Any]:
    """probs (S, N, H, W) in [0, 1] -> (target (N, H, W) in {0, 1}, weight (N, H, W) in [0, 1])."""
    xp = jnp if isinstance(probs, jax.Array) else np
    center = xp.median(probs, axis=0) if reduce == "median" else xp.mean(probs, axis=0)
    target = (center > 0.5).astype(xp.float32)
    if weight_kind == "std":
        w = 1.0 - 2.0 * xp.std(probs, axis=0)
    elif weight_kind == "var":
        w = 1.0 - 4.0 * xp.var(probs, axis=0)
    elif weight_kind == "none":  # plain pseudo-labels: every pixel counts fully
        w = xp.ones_like(center)
    else:
        raise ValueError(f"unknown weight kind {weight_kind!r}")
    return target, xp.clip(w, 0.0, 1.0).astype(xp.float32)


def make_targets(
    params: Params,
    images: np.ndarray,
    *,
    cfg: ModelConfig,
    fc: FinetuneConfig,
    key: jax.Array,
    chunk: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """images (N, H, W) -> (targets, weights), each (N, H, W) float32: fc.samples predictions of
    every image (alone in its batch, keys fold_in(fold_in(key, i), j)) reduced as configured."""
    from nca_jax.predict import sample

    probs = sample(params, cfg, images, key, fc.samples, chunk=chunk)
    t, w = targets_from_probs(probs, fc.target_reduce, fc.weight_kind)
    return np.asarray(t, np.float32), np.asarray(w, np.float32)


def l1_sigmoid(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean |sigmoid(a) - sigmoid(b)|."""
    return jnp.mean(jnp.abs(jax.nn.sigmoid(a) - jax.nn.sigmoid(b)))


def vwsl_terms(
    params: Params,
    images: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    cfg: ModelConfig,
    keys: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    masks: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    patch_yx: jax.Array,
    loss: str = "dice_bce",
    focal_gamma: float = 2.0,
    unroll: bool | str = True,
) -> dict[str, jax.Array]:
    """The loss terms for images, targets, weights (B, H, W) with explicit randomness.

    Exactly one of keys = (level-1 run a, level-1 run b, level-2 run a, level-2 run b) or masks
    = the fire masks of those four runs ((steps, B, h, w, 1) twice, then (steps, B, p, p, 1)
    twice); patch_yx (B, 2). Run a of each level feeds the next level and the segmentation
    loss; run b only the consistency term. Returns {'seg', 'cons1', 'cons2'} (cons2 already
    divided by 16)."""
    if (keys is None) == (masks is None):
        raise TypeError("vwsl_terms needs exactly one of keys= or masks=")
    r = [{"key": k} for k in keys] if masks is None else [{"masks": m} for m in masks]
    fused = resolve_fused(cfg, train=True)
    image = as_nhwc(images)
    low = downscale(image, cfg.downscale)
    seed = seed_state(low, cfg.channels)
    s1a = rollout(params["level1"], seed, cfg=cfg, unroll=unroll, fused=fused, **r[0])
    s1b = rollout(params["level1"], seed, cfg=cfg, unroll=unroll, fused=fused, **r[1])
    full = jnp.concatenate([image, upscale(s1a, cfg.downscale)[..., 1:]], axis=-1)
    patch = crop_patches(full, patch_yx, cfg.patch)
    tgt = crop_patches(targets, patch_yx, cfg.patch)
    w = crop_patches(weights, patch_yx, cfg.patch)
    o2a = rollout(params["level2"], patch, cfg=cfg, unroll=unroll, fused=fused, **r[2])
    o2b = rollout(params["level2"], patch, cfg=cfg, unroll=unroll, fused=fused, **r[3])
    return {
        "seg": segmentation_loss(o2a[..., 1], tgt, w, kind=loss, focal_gamma=focal_gamma),
        "cons1": l1_sigmoid(s1a[..., 1], s1b[..., 1]),
        "cons2": l1_sigmoid(o2a[..., 1], o2b[..., 1]) / LEVEL2_CONSISTENCY_DIVISOR,
    }


def balanced_gamma(
    params: Params,
    images: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    cfg: ModelConfig,
    fc: FinetuneConfig,
    key: jax.Array,
) -> float:
    """|grad seg| / |grad (cons1 + cons2)| at `params` on one batch (B, H, W) with the draws of
    vwsl_loss(key): the gamma at which both parts of VWSL's gradient have the same norm. One
    forward, two pullbacks; no label is involved (targets are the model's own)."""
    keys = tuple(jax.random.fold_in(key, t) for t in (KEY_A1, KEY_B1, KEY_A2, KEY_B2))
    yx = draw_patch_corners(key, cfg, images.shape[0], images.shape[1])

    def parts(p: Params) -> jax.Array:
        t = vwsl_terms(
            p,
            images,
            targets,
            weights,
            cfg=cfg,
            keys=keys,
            patch_yx=yx,
            loss=fc.loss,
            focal_gamma=fc.focal_gamma,
            unroll=cfg.unroll,
        )
        return jnp.stack([t["seg"], t["cons1"] + t["cons2"]])

    _, pull = jax.vjp(parts, params)

    def norm(g: Params) -> jax.Array:
        return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g)))

    (g_seg,) = pull(jnp.array([1.0, 0.0]))
    (g_cons,) = pull(jnp.array([0.0, 1.0]))
    return float(norm(g_seg) / jnp.maximum(norm(g_cons), 1e-12))


def binary_entropy(p: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean binary entropy (nats) of probabilities p (any shape), clipped to [eps, 1 - eps]."""
    p = jnp.clip(p, eps, 1.0 - eps)
    return jnp.mean(-(p * jnp.log(p) + (1.0 - p) * jnp.log1p(-p)))


def entropy_terms(
    params: Params,
    images: jax.Array,
    *,
    cfg: ModelConfig,
    keys: tuple[jax.Array, jax.Array, jax.Array],
    patch_yx: jax.Array,
    unroll: bool | str = True,
) -> dict[str, jax.Array]:
    """TENT-style term for images (B, H, W): level 1 once (keys[0]), level 2 twice (keys[1],
    keys[2]) from the same state on the patches patch_yx (B, 2); returns {'entropy'}: the
    binary entropy of the mean of the two level-2 probabilities."""
    image = as_nhwc(images)
    fused = resolve_fused(cfg, train=True)
    full = _level1_to_full(params, image, cfg, unroll, fused, key=keys[0])
    patch = crop_patches(full, patch_yx, cfg.patch)
    oa = rollout(params["level2"], patch, cfg=cfg, unroll=unroll, fused=fused, key=keys[1])
    ob = rollout(params["level2"], patch, cfg=cfg, unroll=unroll, fused=fused, key=keys[2])
    mean = 0.5 * (jax.nn.sigmoid(oa[..., 1]) + jax.nn.sigmoid(ob[..., 1]))
    return {"entropy": binary_entropy(mean)}


def finetune_loss(
    params: Params,
    images: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    cfg: ModelConfig,
    fc: FinetuneConfig,
    key: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of fc.method on a batch (B, H, W), all randomness from `key`: 'vwsl' as
    vwsl_loss; 'pseudo-label' = the segmentation loss to the targets with w = 1 and no
    consistency term (level 1 and 2 run once); 'entropy' as entropy_terms (targets, weights
    unused). Returns (loss, terms)."""
    if fc.method == "vwsl":
        return vwsl_loss(params, images, targets, weights, cfg=cfg, fc=fc, key=key)
    yx = draw_patch_corners(key, cfg, images.shape[0], images.shape[1])
    k = [jax.random.fold_in(key, t) for t in (KEY_A1, KEY_A2, KEY_B2)]
    if fc.method == "entropy":
        terms = entropy_terms(
            params, images, cfg=cfg, keys=tuple(k), patch_yx=yx, unroll=cfg.unroll
        )
        return terms["entropy"], terms
    if fc.method == "pseudo-label":
        fused = resolve_fused(cfg, train=True)
        image = as_nhwc(images)
        full = _level1_to_full(params, image, cfg, cfg.unroll, fused, key=k[0])
        patch = crop_patches(full, yx, cfg.patch)
        o2 = rollout(params["level2"], patch, cfg=cfg, unroll=cfg.unroll, fused=fused, key=k[1])
        seg = segmentation_loss(
            o2[..., 1],
            crop_patches(targets, yx, cfg.patch),
            kind=fc.loss,
            focal_gamma=fc.focal_gamma,
        )
        return seg, {"seg": seg}
    raise ValueError(f"unknown fine-tuning method {fc.method!r}")


def vwsl_loss(
    params: Params,
    images: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    cfg: ModelConfig,
    fc: FinetuneConfig,
    key: jax.Array | None = None,
    masks: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
    patch_yx: jax.Array | None = None,
    unroll: bool | str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """seg + gamma * (cons1 + cons2). Randomness from `key` (the four runs use
    fold_in(key, KEY_A1 / B1 / A2 / B2), patches draw_patch_corners(key)), or given as the four
    runs' fire masks and patch_yx (the TFLite export). Fine-tuning and the exported `finetune`
    both call this. Returns (loss, terms)."""
    if (key is None) == (masks is None) or (masks is not None and patch_yx is None):
        raise TypeError("vwsl_loss needs key=, or masks= and patch_yx=")
    if key is not None:
        rand = {"keys": tuple(jax.random.fold_in(key, t) for t in (KEY_A1, KEY_B1, KEY_A2, KEY_B2))}
        patch_yx = draw_patch_corners(key, cfg, images.shape[0], images.shape[1])
    else:
        rand = {"masks": masks}
    terms = vwsl_terms(
        params,
        images,
        targets,
        weights,
        cfg=cfg,
        patch_yx=patch_yx,
        loss=fc.loss,
        focal_gamma=fc.focal_gamma,
        unroll=cfg.unroll if unroll is None else unroll,
        **rand,
    )
    return terms["seg"] + fc.gamma * (terms["cons1"] + terms["cons2"]), terms
