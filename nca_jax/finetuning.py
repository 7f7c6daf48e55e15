"""VWSL fine-tuning of a trained Med-NCA on unlabelled images (never reads masks).

The fine-tuned run is a normal run folder (config.json with a `finetune` section, weights.npz,
checkpoints, metrics.jsonl) that evaluate.py accepts, plus `uncertainty.json` and
`uncertainty/NAME_std_{before,after}.png`: per-image quality scores and std maps of the model
before and after fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nca_jax import checkpoint as ckpt
from nca_jax.config import FinetuneConfig, RunConfig
from nca_jax.data import Dataset
from nca_jax.guard import choose, label_free_check, verdict_line
from nca_jax.metrics import foreground_fraction, quality_score
from nca_jax.model import Params
from nca_jax.predict import make_predict, predict_dataset
from nca_jax.predict import sample as predict_sample
from nca_jax.render import save_image, std_rgb
from nca_jax.training import (
    Hooks,
    Stop,
    TrainState,
    fit,
    make_optimizer,
    make_optimizer_schedule,
    make_update_step,
)
from nca_jax.vwsl import balanced_gamma, finetune_loss, targets_from_probs

TARGET_KEY, UNCERTAINTY_KEY, CHECK_KEY, GAMMA_KEY = 10, 11, 12, 13
# The predicted foreground area after / before VWSL outside this range is reported as a likely
# fall towards VWSL's trivial fixed point (an empty or full mask agrees with itself in every
# sample): seen in the cross-site experiment (results/README.md), where it is label-free evidence.
AREA_RATIO_OK = (0.5, 2.0)


def area_warning(
    before: float, after: float, ok: tuple[float, float] = AREA_RATIO_OK
) -> str | None:
    """A warning when the mean predicted foreground fraction on the fine-tuning images moved
    from `before` to `after` by a factor outside `ok`; None when it stayed inside."""
    if before <= 0.0:
        if after <= 0.0:
            return None
        return f"the predicted foreground on the fine-tuning images grew from none to {after:.1%}"
    ratio = after / before
    if ok[0] <= ratio <= ok[1]:
        return None
    return (
        f"the predicted foreground area on the fine-tuning images went from {before:.1%} to "
        f"{after:.1%} of the image (x{ratio:.2f}) during VWSL: the model may be collapsing "
        f"towards an {'empty' if ratio < ok[0] else 'over-full'} mask, VWSL's trivial fixed "
        "point; compare it with the source model before using it"
    )


def _balanced_gamma(
    out: Path,
    params: Params,
    cfg: RunConfig,
    fixed: dict[str, np.ndarray],
    carried: dict[str, np.ndarray],
    fresh: bool,
    root: jax.Array,
) -> float:
    """gamma_rule 'balance': computed once on the first batch at the source weights (saved in
    gamma.json, read back on a resume)."""
    path = out / "gamma.json"
    if not fresh and path.is_file():
        return float(json.loads(path.read_text())["gamma"])
    fc, arrays = cfg.finetune, {**fixed, **carried}
    b = min(fc.batch_size, len(arrays["images"]))
    g = balanced_gamma(
        params,
        jax.numpy.asarray(arrays["images"][:b]),
        jax.numpy.asarray(arrays["targets"][:b]),
        jax.numpy.asarray(arrays["weights"][:b]),
        cfg=cfg.model,
        fc=fc,
        key=jax.random.fold_in(root, GAMMA_KEY),
    )
    ckpt.write_json(path, {"gamma": g, "rule": "balance", "images": b})
    return g


def make_checker(cfg: RunConfig, images: np.ndarray) -> Callable[[Params], dict[str, float]]:
    """The label-free check of cfg.finetune: params -> label_free_check of check_samples
    predictions of the first check_images of images (N, H, W), with the same keys
    (fold_in(key(seed), CHECK_KEY)) at every call, so checks differ only by the weights."""
    fc = cfg.finetune
    predict = make_predict(cfg.model, fc.check_samples)
    key = jax.random.fold_in(jax.random.key(fc.seed), CHECK_KEY)
    imgs = images[: fc.check_images]
    return lambda p: label_free_check(predict_dataset(predict, p, imgs, key))


def apply_verdict(out: Path, source_params: Params, fc: FinetuneConfig) -> dict[str, Any]:
    """Chooses the weights of a finished run in `out` from its label-free checks (guard.json
    and the check_* columns of metrics.jsonl) and writes them as weights.npz: the chosen
    snapshot, or the source weights when it rolls back. Returns {'verdict', 'criterion',
    'selected_epoch', 'weights'} for run.json."""
    source = json.loads((out / "guard.json").read_text())["source"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    checks = [
        {"epoch": r["epoch"] + 1, **{k[6:]: r[k] for k in r if k.startswith("check_")}}
        for r in rows
        if "check_area" in r
    ]
    decision = choose(checks, source, fc)
    if decision["epoch"] is None:
        ckpt.save_weights(source_params, out / "weights.npz")
        weights = "source weights (rolled back)"
    else:
        ckpt.atomic_copy(
            out / "snapshots" / f"epoch{decision['epoch']:04d}.npz", out / "weights.npz"
        )
        weights = f"epoch {decision['epoch']} (label-free check)"
    return {
        "verdict": decision["verdict"],
        "criterion": decision["criterion"],
        "selected_epoch": decision["epoch"],
        "weights": weights,
        "verdict_line": verdict_line(decision),
    }


def make_finetune_step(cfg: RunConfig) -> Callable:
    """Fine-tuning step of cfg.finetune.method: batch {'images', 'targets', 'weights'} each
    (B, H, W); the loss terms come back in info['terms']."""
    fc = cfg.finetune

    def loss_fn(params: Params, batch: dict[str, jax.Array], key: jax.Array):
        loss, terms = finetune_loss(
            params,
            batch["images"],
            batch["targets"],
            batch["weights"],
            cfg=cfg.model,
            fc=fc,
            key=key,
        )
        return loss, {"skip": jax.numpy.array(False), **terms}

    return make_update_step(make_optimizer(fc), loss_fn)


def sample(
    params: Params,
    cfg: RunConfig,
    images: np.ndarray,
    key: jax.Array,
    progress: bool | None = False,
    desc: str = "sampling",
) -> np.ndarray:
    """cfg.finetune.samples predictions per image: (S, N, H, W) probabilities."""
    return predict_sample(
        params, cfg.model, images, key, cfg.finetune.samples, progress=progress, desc=desc
    )


def _write_std_pngs(folder: Path, names: tuple[str, ...], probs: np.ndarray, tag: str) -> None:
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        save_image(folder / f"{name}_std_{tag}.png", std_rgb(probs[:, i].std(0)))


def finetune(
    source: RunConfig,
    params: Params,
    data: Dataset,
    out: str | Path,
    fc: FinetuneConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    uncertainty_after: bool = True,
    stop_after_epochs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fine-tunes `params` (trained with config `source`) on data.images with fc.method (VWSL
    by default); with fc.check_every > 0 the safety net then keeps the latest acceptable check's
    weights or rolls back to `params` (summary: verdict, criterion, selected_epoch).

    data: images (N, H, W); data.masks is ignored (and should be None). Returns the summary."""
    cfg = dataclasses.replace(source, finetune=fc).validate()
    out = Path(out)
    root = jax.random.key(fc.seed)
    target_key = jax.random.fold_in(root, TARGET_KEY)

    if resume and not (out / "config.json").is_file():
        raise ckpt.RunError(f"{out}: nothing to resume (not a run folder)")
    restart = resume and not ckpt.has_checkpoint(out / "checkpoints")  # killed before one
    fresh = not resume or restart
    if fresh and (out / "config.json").exists() and not restart:
        raise ckpt.RunError(f"{out}: already holds a run (use --resume or another --out)")
    # Targets from the source model, computed once before fine-tuning. Fixed targets are
    # recomputed on a resume (the same keys give the same values) rather than checkpointed, so
    # a checkpoint holds only the training state (~0.3 MB, small enough to commit), never
    # per-image arrays derived from the users' images; refreshed targets are checkpointed.
    # TENT-style entropy reads no targets: its 10 predictions per image are drawn only for
    # the before / after uncertainty maps (about 10 min for 50 images on 2 cores)
    needs_targets = fc.method != "entropy" or uncertainty_after
    t = w = None
    if needs_targets and (fresh or fc.refresh_every == 0):
        probs_before = sample(
            params, cfg, data.images, target_key, progress=progress, desc="VWSL targets"
        )
        t, w = (
            np.asarray(x)
            for x in targets_from_probs(probs_before, fc.target_reduce, fc.weight_kind)
        )
    if not needs_targets:  # placeholders: the entropy step ignores them
        t = w = np.zeros(data.images.shape, np.float32)
        out.mkdir(parents=True, exist_ok=True)
    elif fresh:
        out.mkdir(parents=True, exist_ok=True)
        _write_std_pngs(out / "uncertainty", data.names, probs_before, "before")
        rows = {
            n: {
                "quality_before": quality_score(probs_before[:, i]),
                "foreground_before": foreground_fraction(probs_before[:, i], fc.target_reduce),
            }
            for i, n in enumerate(data.names)
        }
        ckpt.write_json(out / "uncertainty.json", rows)
    fixed: dict[str, np.ndarray] = {"images": data.images}
    carried: dict[str, np.ndarray] = {}
    if fc.refresh_every == 0:
        fixed.update(targets=t, weights=w)
    elif fresh:
        carried = {"targets": t, "weights": w}
    else:  # placeholders of the right shape: fit restores the checkpointed ones
        shape = data.images.shape
        carried = {"targets": np.zeros(shape, np.float32), "weights": np.zeros(shape, np.float32)}

    def refresh(epoch: int, p: Params) -> dict[str, np.ndarray] | None:
        if fc.refresh_every <= 0 or epoch == 0 or epoch % fc.refresh_every or not needs_targets:
            return None
        probs = sample(p, cfg, data.images, jax.random.fold_in(target_key, epoch))
        t, w = targets_from_probs(probs, fc.target_reduce, fc.weight_kind)
        return {"targets": np.asarray(t), "weights": np.asarray(w)}

    step_cfg = cfg
    if fc.method == "vwsl" and fc.gamma_rule == "balance":
        step_cfg = dataclasses.replace(
            cfg,
            finetune=dataclasses.replace(
                fc, gamma=_balanced_gamma(out, params, cfg, fixed, carried, fresh, root)
            ),
        )
    check = make_checker(cfg, data.images) if fc.check_every > 0 else None
    if check is not None and (not resume or restart):
        ckpt.write_json(out / "guard.json", {"source": check(params)})

    def on_epoch_end(epoch: int, p: Params) -> dict[str, float] | None:
        done = epoch + 1
        if fc.snapshot_every > 0 and done % fc.snapshot_every == 0:
            (out / "snapshots").mkdir(exist_ok=True)
            ckpt.save_weights(p, out / "snapshots" / f"epoch{done:04d}.npz")
        if fc.check_every > 0 and (done % fc.check_every == 0 or done == fc.epochs):
            (out / "snapshots").mkdir(exist_ok=True)
            ckpt.save_weights(p, out / "snapshots" / f"epoch{done:04d}.npz")
            return {f"check_{k}": v for k, v in check(p).items()}
        return None

    # the steps donate the state: train a copy, so that the caller's params (and the rollback's
    # source weights) stay alive when they are already JAX arrays
    own = jax.tree_util.tree_map(jax.numpy.copy, params)
    state = TrainState(own, make_optimizer(fc).init(own), jax.numpy.zeros((), "int32"))
    summary = fit(
        cfg,
        fc,
        state,
        make_finetune_step(step_cfg),
        fixed,
        out,
        carried=carried,
        resume=resume,
        progress=progress,
        stop=Stop(stop_after_epochs),
        hooks=Hooks(
            refresh=refresh, on_epoch_end=on_epoch_end, schedule=make_optimizer_schedule(fc)
        ),
        log=log,
        summary_extra={
            "finetune_source": data.source,
            "source_run": fc.source_run,
            "gamma_used": step_cfg.finetune.gamma,
        },
    )
    if summary["finished"] and fc.check_every > 0:
        summary.update(apply_verdict(out, params, fc))
        ckpt.write_json(out / "run.json", summary)
    if summary["finished"] and uncertainty_after:
        _, final = ckpt.load_run(out)
        ukey = jax.random.fold_in(root, UNCERTAINTY_KEY)
        probs_after = sample(final, cfg, data.images, ukey, progress=progress, desc="uncertainty")
        _write_std_pngs(out / "uncertainty", data.names, probs_after, "after")
        path = out / "uncertainty.json"
        rows = json.loads(path.read_text()) if path.exists() else {}
        for i, n in enumerate(data.names):
            row = rows.setdefault(n, {})
            row["quality_after"] = quality_score(probs_after[:, i])
            row["foreground_after"] = foreground_fraction(probs_after[:, i], fc.target_reduce)
        for name in ("quality", "foreground"):
            q = [r for r in rows.values() if f"{name}_before" in r and f"{name}_after" in r]
            for when in ("before", "after") if q else ():
                summary[f"{name}_{when}_mean"] = float(np.mean([r[f"{name}_{when}"] for r in q]))
        if "foreground_before_mean" in summary:
            summary["area_warning"] = area_warning(
                summary["foreground_before_mean"], summary["foreground_after_mean"]
            )
        ckpt.write_json(path, rows)
        ckpt.write_json(out / "run.json", summary)
    return summary
