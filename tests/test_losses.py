"""The segmentation losses on exact tiny inputs (values computed by hand)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from nca_jax.losses import bce_loss, focal_loss, segmentation_loss, soft_dice_loss

# logits 0 -> p = 0.5 everywhere; two pixels, one of them lung
ZERO = jnp.zeros((1, 1, 2))
TARGET = jnp.array([[[1.0, 0.0]]])


def test_soft_dice_by_hand():
    # p = (0.5, 0.5), y = (1, 0): 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3
    assert float(soft_dice_loss(ZERO, TARGET)) == pytest.approx(1 / 3, abs=1e-6)
    # a weight map scales every sum: w = (2, 0) -> 1 - (2*1 + 1) / (1 + 2 + 1) = 1/4
    w = jnp.array([[[2.0, 0.0]]])
    assert float(soft_dice_loss(ZERO, TARGET, w)) == pytest.approx(0.25, abs=1e-6)


def test_bce_by_hand_and_weighted():
    assert float(bce_loss(ZERO, TARGET)) == pytest.approx(math.log(2), abs=1e-6)
    w = jnp.array([[[3.0, 1.0]]])  # mean of (3 log 2, log 2)
    assert float(bce_loss(ZERO, TARGET, w)) == pytest.approx(2 * math.log(2), abs=1e-6)
    # stable for large logits: a confident right answer costs ~0, a wrong one ~|logit|
    big = jnp.array([[[40.0, -40.0]]])
    assert float(bce_loss(big, TARGET)) < 1e-12
    assert float(bce_loss(-big, TARGET)) == pytest.approx(40.0, rel=1e-6)


def test_focal_by_hand_and_gamma_zero_is_bce():
    # p_t = 0.5 on both pixels: (1 - 0.5)^2 * log 2
    assert float(focal_loss(ZERO, TARGET, gamma=2.0)) == pytest.approx(0.25 * math.log(2), 1e-6)
    logits = jnp.array([[[1.5, -0.3], [0.2, 2.0]]])
    target = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    np.testing.assert_allclose(
        focal_loss(logits, target, gamma=0.0), bce_loss(logits, target), rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["dice_bce", "dice_focal"])
def test_segmentation_loss_is_dice_plus_the_pixel_term(kind):
    got = float(segmentation_loss(ZERO, TARGET, kind=kind))
    pixel = math.log(2) if kind == "dice_bce" else 0.25 * math.log(2)
    assert got == pytest.approx(1 / 3 + pixel, abs=1e-6)
    ones = jnp.ones_like(TARGET)
    assert float(segmentation_loss(ZERO, TARGET, ones, kind=kind)) == pytest.approx(got, 1e-6)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss 'dice'"):
        segmentation_loss(ZERO, TARGET, kind="dice")
