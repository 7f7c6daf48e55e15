"""Segmentation losses on logits, optionally weighted per pixel (the VWSL weight map).

All take logits and targets of the same shape (B, H, W) and return a scalar. With a weight map w
(B, H, W) every per-pixel term is multiplied by w; w = 1 everywhere equals the unweighted loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(
    logits: jax.Array, target: jax.Array, weight: jax.Array | None = None, smooth: float = 1.0
) -> jax.Array:
    """1 - (2 sum(p y w) + s) / (sum(p w) + sum(y w) + s), summed over the whole batch."""
    p = jax.nn.sigmoid(logits)
    w = jnp.ones_like(p) if weight is None else weight
    inter = jnp.sum(p * target * w)
    return 1.0 - (2.0 * inter + smooth) / (jnp.sum(p * w) + jnp.sum(target * w) + smooth)


def bce_loss(logits: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Mean binary cross-entropy, computed stably from logits."""
    per_pixel = optax.sigmoid_binary_cross_entropy(logits, target)
    if weight is not None:
        per_pixel = per_pixel * weight
    return jnp.mean(per_pixel)


def focal_loss(
    logits: jax.Array, target: jax.Array, weight: jax.Array | None = None, gamma: float = 2.0
) -> jax.Array:
    """Mean focal loss (Lin et al.): BCE scaled by (1 - p_t)^gamma; gamma = 0 gives BCE."""
    per_pixel = optax.sigmoid_focal_loss(logits, target, alpha=None, gamma=gamma)
    if weight is not None:
        per_pixel = per_pixel * weight
    return jnp.mean(per_pixel)


def segmentation_loss(
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array | None = None,
    *,
    kind: str = "dice_bce",
    focal_gamma: float = 2.0,
) -> jax.Array:
    """Soft Dice + BCE (`dice_bce`, the authors' effective loss) or soft Dice + focal."""
    dice = soft_dice_loss(logits, target, weight)
    if kind == "dice_bce":
        return dice + bce_loss(logits, target, weight)
    if kind == "dice_focal":
        return dice + focal_loss(logits, target, weight, focal_gamma)
    raise ValueError(f"unknown loss {kind!r}: use 'dice_bce' or 'dice_focal'")
