"""Segmentation and quality metrics on 2-D masks (numpy + scipy only).

Conventions (masks are (H, W); a pixel is foreground when its value is truthy):

- ``dice``: 2 |P & T| / (|P| + |T|). Empty ground truth: if prediction and ground truth are both
  empty the Dice is 1.0; if exactly one of them is empty it is 0.0.
- ``soft_dice`` (the authors' metric, on probabilities): (2 sum(p y) + s) / (sum(p) + sum(y) + s)
  with smoothing s = 1. An empty ground truth with an empty prediction gives 1.0; an empty ground
  truth with a non-empty prediction gives 1 / (sum(p) + 1), i.e. close to 0.
- ``hd95``: 95th percentile of the symmetric surface distance (pixels times spacing). Surfaces are
  the boundary pixels (mask minus its binary erosion, cross-shaped structuring element, pixels on
  the image border count as boundary). The percentile is taken over the union of both directed
  distance sets (surface of P to T and of T to P). Empty ground truth: if both masks are empty the
  HD95 is 0.0; if exactly one is empty it is undefined (nan) -- such cases are counted and excluded
  from the mean (see ``summarize``: ``n_nan``).
- ``quality_score`` (M3D-NCA): sum over pixels of the per-pixel std (ddof=0) across N stochastic
  predictions divided by the sum of the per-pixel mean; higher means less trustworthy. If the mean
  sums to 0 the score is 0.0 when the std also sums to 0, else inf.
- ``stray_share``: share of the foreground outside the two largest connected components
  (4-connectivity: pixels that touch by an edge); 0.0 for an empty mask or one of at most two
  components. Two lungs make two components; the rest is stray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _as_mask(x: np.ndarray) -> np.ndarray:
    """Boolean copy of a mask (any shape)."""
    return np.asarray(x).astype(bool)


def _check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    """Raise ValueError unless a and b have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary masks pred, target (H, W) with 0/1 or boolean values.

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    p, t = _as_mask(pred), _as_mask(target)
    _check_same_shape(p, t)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def soft_dice(prob: np.ndarray, target: np.ndarray, smooth: float = 1.0) -> float:
    """Smoothed soft Dice (2 sum(p*y) + smooth) / (sum(p) + sum(y) + smooth) of prob, target (H, W).

    With smooth = 1 an empty target and an all-zero prediction give 1.0.
    """
    p = np.asarray(prob, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    _check_same_shape(p, y)
    num = 2.0 * float((p * y).sum()) + smooth
    den = float(p.sum()) + float(y.sum()) + smooth
    if den == 0.0:
        return 1.0
    return num / den


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels (H, W) bool of a boolean mask: mask minus its binary erosion."""
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return np.logical_and(mask, np.logical_not(eroded))


def hd95(pred: np.ndarray, target: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """95th percentile symmetric surface Hausdorff distance between masks pred, target (H, W).

    Distances are in pixels scaled by spacing (row, column); the percentile (linear interpolation)
    is over the union of both directed surface-distance sets. Both empty -> 0.0; exactly one
    empty -> nan.
    """
    p, t = _as_mask(pred), _as_mask(target)
    _check_same_shape(p, t)
    if p.ndim != 2:
        raise ValueError(f"expected 2-D masks, got shape {p.shape}")
    p_empty, t_empty = not p.any(), not t.any()
    if p_empty and t_empty:
        return 0.0
    if p_empty or t_empty:
        return math.nan
    sp, st = _surface(p), _surface(t)
    sampling = (float(spacing[0]), float(spacing[1]))
    dist_to_t = ndimage.distance_transform_edt(np.logical_not(st), sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(np.logical_not(sp), sampling=sampling)
    distances = np.concatenate([dist_to_t[sp], dist_to_p[st]])
    return float(np.percentile(distances, 95))


def quality_score(probs: np.ndarray) -> float:
    """M3D-NCA variance quality score of N stochastic predictions probs (N, H, W) in [0, 1].

    sum(std over N, ddof=0) / sum(mean over N); 0.0 / 0.0 -> 0.0, x / 0.0 -> inf. Higher is worse.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"expected probs of shape (N, H, W), got {p.shape}")
    std_sum = float(p.std(axis=0).sum())
    mean_sum = float(p.mean(axis=0).sum())
    if mean_sum == 0.0:
        return 0.0 if std_sum == 0.0 else math.inf
    return std_sum / mean_sum


def stray_share(mask: np.ndarray) -> float:
    """Share of the foreground of mask (H, W) outside its two largest 4-connected components."""
    m = _as_mask(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a mask of shape (H, W), got {m.shape}")
    labels, n = ndimage.label(m)
    if n <= 2:
        return 0.0
    sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
    return float(sizes[2:].sum() / sizes.sum())


def foreground_fraction(probs: np.ndarray, reduce: str = "median") -> float:
    """Share of the image that S stochastic predictions probs (S, H, W) in [0, 1] mark as
    foreground: the 0.5-threshold of their median (or mean), i.e. the area of a VWSL target."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"expected probs of shape (S, H, W), got {p.shape}")
    if reduce not in ("median", "mean"):
        raise ValueError(f"unknown reduce {reduce!r}")
    center = np.median(p, axis=0) if reduce == "median" else p.mean(axis=0)
    return float((center > 0.5).mean())


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Summary of values (K,): mean, std (ddof=0), median, min, max over the finite values.

    'n' counts finite values, 'n_nan' non-finite ones (nan or inf); statistics are nan if n == 0.
    """
    v = np.asarray(list(values), dtype=np.float64).reshape(-1)
    finite = v[np.isfinite(v)]
    n, n_nan = int(finite.size), int(v.size - finite.size)
    if n == 0:
        stats = dict.fromkeys(("mean", "std", "median", "min", "max"), math.nan)
    else:
        stats = {
            "mean": float(finite.mean()),
            "std": float(finite.std()),
            "median": float(np.median(finite)),
            "min": float(finite.min()),
            "max": float(finite.max()),
        }
    return {**stats, "n": n, "n_nan": n_nan}


def case_metrics(
    probs: np.ndarray, target: np.ndarray | None, threshold: float = 0.5
) -> dict[str, float]:
    """Metrics of one image from N stochastic sigmoid predictions probs (N, H, W).

    The prediction is mean(probs, axis=0) > threshold. Always returns 'quality' and 'fg_fraction'
    (fraction of predicted foreground pixels); with a target (H, W) also 'dice', 'soft_dice' (of
    the mean probability) and 'hd95' (nan when exactly one of prediction and target is empty).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"expected probs of shape (N, H, W), got {p.shape}")
    mean_prob = p.mean(axis=0)
    pred = mean_prob > threshold
    out = {"quality": quality_score(p), "fg_fraction": float(pred.mean())}
    if target is not None:
        t = np.asarray(target)
        _check_same_shape(pred, t)
        out["dice"] = dice(pred, t)
        out["soft_dice"] = soft_dice(mean_prob, _as_mask(t).astype(np.float64))
        out["hd95"] = hd95(pred, t)
    return out
