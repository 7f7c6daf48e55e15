"""Tests for nca_jax.metrics on tiny hand-made masks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nca_jax.metrics import (
    case_metrics,
    dice,
    foreground_fraction,
    hd95,
    quality_score,
    soft_dice,
    stray_share,
    summarize,
)


def _square(shape: tuple[int, int], r0: int, c0: int, size: int) -> np.ndarray:
    """Boolean (H, W) mask with a filled size x size square at (r0, c0)."""
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def _brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Reference HD95 by explicit 4-neighbour surfaces and all pairwise distances."""

    def surface(m: np.ndarray) -> np.ndarray:
        pad = np.pad(m, 1, constant_values=False)
        interior = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
        return np.argwhere(m & ~interior).astype(np.float64)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


# ---------------------------------------------------------------- dice


def test_dice_two_squares_by_hand() -> None:
    a = _square((8, 8), 0, 0, 4)  # 16 px
    b = _square((8, 8), 2, 2, 4)  # 16 px, overlap 2x2 = 4 px
    assert dice(a, b) == pytest.approx(2 * 4 / 32)
    assert dice(a, a) == 1.0
    assert dice(a.astype(np.float32), b.astype(np.uint8)) == pytest.approx(0.25)


def test_dice_empty_rules() -> None:
    empty = np.zeros((5, 5), dtype=bool)
    full = _square((5, 5), 1, 1, 2)
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0


def test_dice_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


# ---------------------------------------------------------------- soft dice


def test_soft_dice_by_hand() -> None:
    prob = np.array([[0.5, 1.0], [0.0, 0.0]])
    target = np.array([[1.0, 0.0], [0.0, 0.0]])
    # (2 * 0.5 + 1) / (1.5 + 1 + 1) = 2 / 3.5
    assert soft_dice(prob, target) == pytest.approx(4 / 7)
    # smooth = 0: 1 / 2.5
    assert soft_dice(prob, target, smooth=0.0) == pytest.approx(0.4)


def test_soft_dice_empty() -> None:
    z = np.zeros((3, 3))
    assert soft_dice(z, z) == 1.0
    p = np.full((3, 3), 0.5)  # sum 4.5 -> 1 / 5.5
    assert soft_dice(p, z) == pytest.approx(1 / 5.5)


# ---------------------------------------------------------------- hd95


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_hd95_horizontal_shift_of_square_is_k(k: int) -> None:
    # The left edge of A is k from the nearest surface of B (and the right edge of B k from A);
    # every other surface pixel is closer, and those k's are > 5% of the union, so HD95 = k.
    a = _square((16, 20), 3, 2, 6)
    b = _square((16, 20), 3, 2 + k, 6)
    assert hd95(a, b) == pytest.approx(float(k))
    assert hd95(a, b) == pytest.approx(_brute_hd95(a, b))


def test_hd95_square_shift_distance_multiset_by_hand() -> None:
    # 5x5 square shifted right by 2. Directed distances A->B (16 surface px): left column 2 x5,
    # top/bottom rows 1,0,0,0 each (corner at right counted there), right column interior 1,2,1.
    # -> six 2s, four 1s, six 0s; B->A is the mirror image. Union: 12 zeros, 8 ones, 12 twos;
    # percentile index 0.95 * 31 = 29.45 lies among the 2s.
    a = _square((12, 12), 2, 2, 5)
    b = _square((12, 12), 2, 4, 5)
    assert hd95(a, b) == 2.0


def test_hd95_union_convention_hand_value() -> None:
    # A = {(0,0)}, B = {(0,0), (0,4)}: A->B {0}, B->A {0, 4}; union {0, 0, 4};
    # linear percentile at index 0.95 * 2 = 1.9 -> 0 + 0.9 * 4 = 3.6.
    # (The max of the two directed 95th percentiles would give 3.8 instead.)
    a = np.zeros((3, 6), dtype=bool)
    a[0, 0] = True
    b = a.copy()
    b[0, 4] = True
    assert hd95(a, b) == pytest.approx(3.6)
    assert hd95(b, a) == pytest.approx(3.6)


def test_hd95_single_pixels_and_spacing() -> None:
    a = np.zeros((6, 6), dtype=bool)
    b = np.zeros((6, 6), dtype=bool)
    a[1, 1] = True
    b[4, 1] = True  # 3 rows apart
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, b, spacing=(1.0, 5.0)) == pytest.approx(3.0)


def test_hd95_symmetric_and_identical() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((12, 12)) > 0.6
    b = rng.random((12, 12)) > 0.5
    assert hd95(a, b) == pytest.approx(hd95(b, a))
    assert hd95(a, b) == pytest.approx(_brute_hd95(a, b))
    assert hd95(a, a) == 0.0
    sq = _square((10, 10), 2, 3, 4)
    assert hd95(sq, sq) == 0.0


def test_hd95_empty_rules() -> None:
    empty = np.zeros((5, 5), dtype=bool)
    full = _square((5, 5), 1, 1, 2)
    assert hd95(empty, empty) == 0.0
    assert math.isnan(hd95(full, empty))
    assert math.isnan(hd95(empty, full))


# ---------------------------------------------------------------- quality score


def test_quality_zero_when_samples_equal() -> None:
    p = np.tile(np.array([[[0.2, 0.9], [0.0, 1.0]]]), (4, 1, 1))
    assert quality_score(p) == 0.0


def test_quality_hand_value() -> None:
    # pixel 0: samples {0, 1} -> mean 0.5, std 0.5; pixel 1: {1, 1} -> mean 1, std 0.
    p = np.array([[[0.0, 1.0]], [[1.0, 1.0]]])
    assert quality_score(p) == pytest.approx(0.5 / 1.5)


def test_quality_positive_and_degenerate() -> None:
    rng = np.random.default_rng(1)
    assert quality_score(rng.random((3, 4, 4))) > 0.0
    assert quality_score(np.zeros((3, 2, 2))) == 0.0


# ---------------------------------------------------------------- summarize


def test_summarize_population_std_and_nan() -> None:
    s = summarize([1.0, 3.0, float("nan"), 5.0, float("inf")])
    assert s["n"] == 3
    assert s["n_nan"] == 2
    assert s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt(8 / 3))  # ddof=0
    assert s["median"] == 3.0
    assert s["min"] == 1.0
    assert s["max"] == 5.0


def test_summarize_all_nan_and_empty() -> None:
    s = summarize([float("nan")])
    assert s["n"] == 0 and s["n_nan"] == 1
    assert all(math.isnan(s[k]) for k in ("mean", "std", "median", "min", "max"))
    e = summarize([])
    assert e["n"] == 0 and e["n_nan"] == 0 and math.isnan(e["mean"])


# ---------------------------------------------------------------- case metrics


def test_case_metrics_keys_and_values() -> None:
    probs = np.zeros((2, 4, 4))
    probs[:, 1:3, 1:3] = 0.9
    probs[0, 0, 0] = 1.0  # mean 0.5: not above the threshold
    target = np.zeros((4, 4), dtype=np.uint8)
    target[1:3, 1:3] = 1

    no_target = case_metrics(probs, None)
    assert set(no_target) == {"quality", "fg_fraction"}
    assert no_target["fg_fraction"] == pytest.approx(4 / 16)

    full = case_metrics(probs, target)
    assert set(full) == {"quality", "fg_fraction", "dice", "soft_dice", "hd95"}
    assert full["dice"] == 1.0
    assert full["hd95"] == 0.0
    # std sum 0.5 (one pixel {0, 1}), mean sum 4 * 0.9 + 0.5
    assert full["quality"] == pytest.approx(0.5 / 4.1)
    # (2 * 3.6 + 1) / (4.1 + 4 + 1)
    assert full["soft_dice"] == pytest.approx(8.2 / 9.1)


def test_case_metrics_empty_prediction() -> None:
    probs = np.zeros((3, 4, 4))
    target = np.zeros((4, 4))
    target[0, 0] = 1
    m = case_metrics(probs, target)
    assert m["dice"] == 0.0
    assert math.isnan(m["hd95"])
    assert m["fg_fraction"] == 0.0
    assert m["quality"] == 0.0


def test_foreground_fraction_exact_values():
    # 3 samples of a 2 x 2 image; per pixel: median / mean of the samples
    probs = np.array(
        [
            [[0.9, 0.2], [0.6, 0.0]],
            [[0.8, 0.7], [0.1, 0.0]],
            [[0.1, 0.9], [0.2, 0.0]],
        ]
    )
    # medians 0.8, 0.7, 0.2, 0.0 -> 2 of 4 pixels; means 0.6, 0.6, 0.3, 0.0 -> 2 of 4
    assert foreground_fraction(probs) == 0.5
    assert foreground_fraction(probs, "mean") == 0.5
    probs[2, 1, 0] = 0.9  # median of (0.6, 0.1, 0.9) = 0.6 -> 3 of 4; mean 0.533 -> 3 of 4
    assert foreground_fraction(probs) == 0.75
    assert foreground_fraction(np.zeros((2, 3, 3))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        foreground_fraction(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="reduce"):
        foreground_fraction(probs, "max")


def test_stray_share_counts_the_foreground_outside_the_two_largest_parts():
    m = np.zeros((12, 12), bool)
    m[1:6, 1:5] = True  # 20 px: one lung
    m[1:6, 7:11] = True  # 20 px: the other
    assert stray_share(m) == 0.0
    m[9, 9] = m[10, 10] = True  # two 1-px fragments, touching only by a corner: 2 parts
    assert stray_share(m) == pytest.approx(2 / 42)
    m[9, 10] = True  # now one 3-px fragment (edge-connected)
    assert stray_share(m) == pytest.approx(3 / 43)
    assert stray_share(np.zeros((4, 4))) == 0.0
    with pytest.raises(ValueError, match="H, W"):
        stray_share(np.zeros((2, 4, 4)))
