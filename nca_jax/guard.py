"""Label-free safety net for fine-tuning on unlabelled images: checks, selection, rollback.

Fine-tuning without labels can make a model worse with nothing to show it; VWSL in particular
has a trivial fixed point (an empty or full mask agrees with itself in every sample). So every
few epochs the model is checked on the unlabelled images alone, and at the end either the last
acceptable check is kept ('adapted') or the source weights are ('rolled back').

A check is computed from S stochastic predictions probs (S, N, H, W) of N images:
  area      mean share of each image marked as foreground (0.5-threshold of the median),
  quality   mean M3D-NCA quality score (sum of the per-pixel std / sum of the mean; lower = surer),
  agreement mean Dice between pairs of samples (1 = every sample gives the same mask),
  stray     mean share of the median mask outside its two largest connected components (two
            lungs make two components: the rest is stray fragments).
A check is acceptable when area / source area lies in [area_min_ratio, area_max_ratio] (an
anatomical prior: both lungs cover a similar share of a chest X-ray at any hospital) and
quality <= (1 - min_quality_gain) x the source's quality. No target label is ever read.

The band has no direction: it cannot tell a source that over-segments the new site (share should
fall) from one that under-segments it. With fc.prior_share = P > 0, the mean lung share of the
SOURCE site's training masks (adult lungs fill about the same share of a frontal chest X-ray at
every site), a check must also satisfy |area - P| <= |source area - P|: the share may only move
towards P. On by default (PRIOR_BY_DEFAULT) since session 16: it passed every held-out case
written down for it before they ran (results/README.md, "A candidate rule").

stray is recorded but decides nothing: with one set of sampling keys it rose in a harmful
self-training run and fell in the helpful ones, but with other keys it fell in the harmful run
too (results/README.md, session 12), like spread and agreement. No label-free figure measured so
far tells a harmful run from a helpful one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from nca_jax.config import FinetuneConfig
from nca_jax.errors import ConfigError
from nca_jax.metrics import dice, foreground_fraction, quality_score, stray_share

VERDICTS = ("adapted", "rolled back")
# whether finetune.py (and the experiments' vwsl-default) applies the prior rule when not told:
# the one place that says so
PRIOR_BY_DEFAULT = True


def label_free_check(probs: np.ndarray) -> dict[str, float]:
    """probs (S, N, H, W) in [0, 1], S >= 2 -> {'area', 'quality', 'agreement', 'stray'}
    (see module)."""
    p = np.asarray(probs)
    if p.ndim != 4 or p.shape[0] < 2:
        raise ValueError(f"expected probs (S >= 2, N, H, W), got {p.shape}")
    areas, quals, agree, stray = [], [], [], []
    for i in range(p.shape[1]):
        areas.append(foreground_fraction(p[:, i], "median"))
        stray.append(stray_share(np.median(p[:, i], axis=0) > 0.5))
        q = quality_score(p[:, i])
        quals.append(q if math.isfinite(q) else 1e6)  # spread without a mean: worst
        masks = p[:, i] > 0.5
        agree.append(np.mean([dice(a, b) for a, b in itertools.combinations(masks, 2)]))
    return {
        "area": float(np.mean(areas)),
        "quality": float(np.mean(quals)),
        "agreement": float(np.mean(agree)),
        "stray": float(np.mean(stray)),
    }


def moment_check(mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """The check from the per-pixel mean and std (ddof=0) of S predictions, (N, H, W) each, as
    the exported `sample` signature returns them (the phone): {'area' (0.5-threshold of the
    MEAN, not the median), 'quality' (exactly label_free_check's), 'stray' (of the mean mask)};
    no 'agreement', which needs the samples themselves."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if m.ndim != 3 or m.shape != s.shape:
        raise ValueError(f"expected mean and std of one shape (N, H, W), got {m.shape}, {s.shape}")
    areas, quals, stray = [], [], []
    for mi, si in zip(m, s, strict=True):
        areas.append(float((mi > 0.5).mean()))
        stray.append(stray_share(mi > 0.5))
        total = mi.sum()
        q = si.sum() / total if total > 0 else (0.0 if si.sum() == 0 else math.inf)
        quals.append(q if math.isfinite(q) else 1e6)  # spread without a mean: worst
    return {
        "area": float(np.mean(areas)),
        "quality": float(np.mean(quals)),
        "stray": float(np.mean(stray)),
    }


def prior_ok(area: float, source_area: float, prior: float) -> bool:
    """The anatomical-prior rule: the predicted lung share `area` is no farther from the prior
    share than the source model's share on the same images."""
    return abs(area - prior) <= abs(source_area - prior)


def resolve_prior_share(
    value: str | None,
    recorded: Callable[[], Any],
    where: str,
    warn: Callable[[str], None],
) -> float | None:
    """The prior share P from a --prior-share value, for finetune.py and the phone stand-in.

    value: 'auto' (the source's recorded training-mask lung share, read by `recorded()` from
    `where`: a run.json or an export sidecar), 'none' (0.0: no prior), a number, or None (not
    given). None gives None (keep the config's) when PRIOR_BY_DEFAULT is off, else 'auto' with
    a warning and None when the source lacks the share. Raises ConfigError for a bad value or
    an explicit 'auto' without a recorded share; errors raised by `recorded()` pass through.
    """
    if value is None:
        if not PRIOR_BY_DEFAULT:
            return None
        try:
            return resolve_prior_share("auto", recorded, where, warn)
        except ConfigError as e:
            warn(f"no anatomical prior in the safety net: {e}")
            return None
    if value == "none":
        return 0.0
    if value != "auto":
        try:
            return float(value)
        except ValueError:
            raise ConfigError(
                f"--prior-share must be 'auto', 'none' or a number, got {value!r}"
            ) from None
    share = recorded()
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise ConfigError(
            f"{where}: no train_mask_share (made before train.py recorded it): pass "
            "--prior-share with the mean lung share of the source's training masks, or add it "
            "to the run with experiments/record_train_share.py"
        )
    return float(share)


def judge(check: dict[str, float], source: dict[str, float], fc: FinetuneConfig) -> list[str]:
    """Why `check` is not acceptable against the source model's check (empty list = it is)."""
    why = []
    if source["area"] <= 0.0:
        ratio = math.inf if check["area"] > 0 else 1.0
    else:
        ratio = check["area"] / source["area"]
    if not fc.area_min_ratio <= ratio <= fc.area_max_ratio:
        why.append(
            f"predicted lung share {check['area']:.1%} is x{ratio:.2f} the source's "
            f"{source['area']:.1%} (allowed x{fc.area_min_ratio:g}-x{fc.area_max_ratio:g})"
        )
    limit = (1.0 - fc.min_quality_gain) * source["quality"]
    if check["quality"] > limit:
        why.append(
            f"quality score {check['quality']:.4f} is not below the source's "
            f"{source['quality']:.4f}"
            + (f" x{1 - fc.min_quality_gain:g}" if fc.min_quality_gain else "")
        )
    if fc.prior_share > 0 and not prior_ok(check["area"], source["area"], fc.prior_share):
        why.append(
            f"predicted lung share {check['area']:.1%} moved away from the prior "
            f"{fc.prior_share:.1%} (the source's was {source['area']:.1%})"
        )
    return why


def choose(
    checks: list[dict[str, Any]], source: dict[str, float], fc: FinetuneConfig
) -> dict[str, Any]:
    """The verdict from the checks [{'epoch': e (1-based epochs done), 'area', 'quality',
    'agreement', 'stray'}, ...] against the source's check: the acceptable check with the most
    epochs ('adapted'; with fc.keep 'until-failure' only checks before the first unacceptable
    one count), else 'rolled back' (epoch None) when fc.rollback, else the last check kept
    anyway ('adapted', with the reasons it failed). Returns {'verdict', 'epoch', 'criterion'}."""
    judged = [(c, judge(c, source, fc)) for c in sorted(checks, key=lambda c: c["epoch"])]
    candidates = (
        itertools.takewhile(lambda cw: not cw[1], judged) if fc.keep == "until-failure" else judged
    )
    ok = [c for c, why in candidates if not why]
    criterion: dict[str, Any] = {
        "rule": (
            f"area within x{fc.area_min_ratio:g}-x{fc.area_max_ratio:g} of the source's and "
            f"quality <= {1 - fc.min_quality_gain:g} x the source's; "
            + (
                f"area no farther from the prior {fc.prior_share:g} than the source's; "
                if fc.prior_share > 0
                else ""
            )
            + (
                "latest such check before the first check that is not"
                if fc.keep == "until-failure"
                else "latest such check"
            )
        ),
        "source": source,
        "checks": [{**c, "acceptable": not why, "why_not": why} for c, why in judged],
    }
    if ok:
        best = ok[-1]
        return {"verdict": "adapted", "epoch": int(best["epoch"]), "criterion": criterion}
    if fc.rollback or not judged:
        return {"verdict": "rolled back", "epoch": None, "criterion": criterion}
    return {"verdict": "adapted", "epoch": int(judged[-1][0]["epoch"]), "criterion": criterion}


def verdict_line(decision: dict[str, Any]) -> str:
    """One line for the end of finetune.py: 'adapted: ...' or 'rolled back: ...'."""
    src = decision["criterion"]["source"]
    figs = f"source area {src['area']:.1%}, quality {src['quality']:.4f}"
    if decision["verdict"] == "rolled back":
        last = decision["criterion"]["checks"][-1] if decision["criterion"]["checks"] else None
        why = "; ".join(last["why_not"]) if last else "no check was made"
        return f"rolled back: no acceptable label-free check ({figs}; last check: {why})"
    chk = next(c for c in decision["criterion"]["checks"] if c["epoch"] == decision["epoch"])
    return (
        f"adapted: weights of epoch {decision['epoch']} (area {chk['area']:.1%}, quality "
        f"{chk['quality']:.4f}"
        + (f", agreement {chk['agreement']:.3f}" if "agreement" in chk else "")
        + f"; {figs})"
        + ("" if chk["acceptable"] else f"; kept without rollback although {chk['why_not']}")
    )
