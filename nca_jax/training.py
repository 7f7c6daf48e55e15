"""Supervised training of Med-NCA: optimizer, one jitted train step, the epoch loop.

Determinism: the run's root key is key(seed); the data order of epoch e comes from
fold_in(data_key, e) and the model's randomness of global step s from fold_in(step_key, s), so a
resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from nca_jax import checkpoint as ckpt
from nca_jax.config import (
    FinetuneConfig,
    RunConfig,
    TrainConfig,
    atomic_write_text,
    load_config,
    save_config,
    to_json,
)
from nca_jax.data import Dataset
from nca_jax.errors import TrainingError  # noqa: F401 (re-exported)
from nca_jax.losses import segmentation_loss
from nca_jax.model import (
    Params,
    Randomness,
    init_params,
    train_logits,
)
from nca_jax.parallel import data_mesh, replicate, shard_batch
from nca_jax.predict import make_predict, predict_dataset
from nca_jax.render import save_figure

DATA_KEY, STEP_KEY, INIT_KEY, EVAL_KEY = 0, 1, 2, 3


class TrainState(NamedTuple):
    """Everything a resumed run needs: a pytree."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: global optimizer step


def make_optimizer(tc: TrainConfig | FinetuneConfig) -> optax.GradientTransformation:
    """Adam with the learning rate decayed by tc.lr_decay every step; a fine-tuning config
    with update='norm' changes only the batch-norm scale and shift (TENT), the rest stays."""
    adam = optax.adam(make_optimizer_schedule(tc), b1=tc.beta1, b2=tc.beta2)
    if getattr(tc, "update", "all") == "all":
        return adam
    return optax.multi_transform({"train": adam, "freeze": optax.set_to_zero()}, norm_labels)


class ParamEmaState(NamedTuple):
    """param_ema's state: the running average of the parameters (the params pytree)."""

    ema: Params


def param_ema(decay: float) -> optax.GradientTransformation:
    """Polyak averaging as the last link of an optax chain: the updates pass unchanged and the
    state tracks ema <- decay x ema + (1 - decay) x (params + updates), i.e. the average of the
    weights after each step, starting at the initial weights. Living in the optimizer state, it
    is checkpointed, guarded (a skipped step leaves it) and resumed with the rest."""

    def init(params: Params) -> ParamEmaState:
        return ParamEmaState(jax.tree_util.tree_map(jnp.copy, params))

    def update(updates, state: ParamEmaState, params: Params | None = None):
        if params is None:
            raise ValueError("param_ema needs the parameters (opt.update(g, state, params))")
        new = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, new)
        return updates, ParamEmaState(ema)

    return optax.GradientTransformation(init, update)


def make_train_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Supervised training's optimizer: make_optimizer, followed by param_ema when
    tc.ema_decay > 0 (without it the state is exactly make_optimizer's, so older checkpoints
    resume)."""
    opt = make_optimizer(tc)
    return optax.chain(opt, param_ema(tc.ema_decay)) if tc.ema_decay > 0 else opt


def delivered_params(state: TrainState, tc: TrainConfig) -> Params:
    """The weights a supervised run validates and saves: the average of param_ema when
    tc.ema_decay > 0, else the trained parameters themselves."""
    return state.opt_state[-1].ema if tc.ema_decay > 0 else state.params


def norm_labels(params: Params) -> Params:
    """'train' for the batch-norm leaves (scale, bias under 'norm'), 'freeze' for the others."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: (
            "train" if any(getattr(k, "key", None) == "norm" for k in path) else "freeze"
        ),
        params,
    )


def init_state(cfg: RunConfig, params: Params | None = None) -> TrainState:
    root = jax.random.key(cfg.train.seed)
    if params is None:
        params = init_params(cfg.model, key=jax.random.fold_in(root, INIT_KEY))
    opt = make_train_optimizer(cfg.train)
    return TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))


LossFn = Callable[[Params, dict[str, jax.Array], jax.Array], tuple[jax.Array, jax.Array]]


def make_update_step(
    opt: optax.GradientTransformation, loss_fn: LossFn
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """jit(step)(state, batch, step_key) -> (state, info); the state is donated.

    loss_fn(params, batch, key) -> (loss, aux) where aux is skip (bool scalar: leave the state
    unchanged) or a dict {'skip': skip, NAME: scalar, ...} whose other scalars (e.g. the terms
    of the loss) come back in info['terms']. The model's randomness is
    fold_in(step_key, state.step). A step whose loss
    or gradient is not finite also leaves parameters and Adam state unchanged; info says which
    happened (loss, finite, skipped)."""

    def step(state: TrainState, batch: dict[str, jax.Array], step_key: jax.Array):
        key = jax.random.fold_in(step_key, state.step)
        return update_state(opt, loss_fn, state, batch, key)

    return jax.jit(step, donate_argnums=0)


def update_state(
    opt: optax.GradientTransformation,
    loss_fn: LossFn,
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array | None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step with the model randomness `key` (None when the batch carries its
    randomness as tensors, as in the TFLite export), guarded as make_update_step says."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    terms = {}
    if isinstance(aux, dict):
        terms = {k: v for k, v in aux.items() if k != "skip"}
        skip = aux["skip"]
    else:
        skip = aux
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # the loss, the gradients AND the updated parameters must be finite (an lr or decay that
    # overflows makes finite gradients give non-finite weights)
    leaves = jax.tree_util.tree_leaves((grads, params))
    finite = jnp.isfinite(loss) & jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in leaves]))
    keep = finite & ~skip
    params, opt_state = jax.tree_util.tree_map(
        lambda new, old: jnp.where(keep, new, old),
        (params, opt_state),
        (state.params, state.opt_state),
    )
    info = {"loss": loss, "finite": finite, "skipped": skip}
    if terms:
        info["terms"] = terms
    return TrainState(params, opt_state, state.step + 1), info


def make_train_step(
    cfg: RunConfig,
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """Supervised step: batch {'images': (B,H,W), 'masks': (B,H,W)}. With skip_empty_patches,
    a step whose patch labels are all empty changes nothing (as in the authors' code)."""

    def loss_fn(params: Params, batch: dict[str, jax.Array], key: jax.Array):
        return supervised_loss(params, batch["images"], batch["masks"], cfg=cfg, key=key)

    return make_update_step(make_train_optimizer(cfg.train), loss_fn)


def supervised_loss(
    params: Params,
    images: jax.Array,
    masks: jax.Array,
    *,
    cfg: RunConfig,
    key: jax.Array | None = None,
    randomness: Randomness | None = None,
    unroll: bool | str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The supervised objective on images, masks (B, H, W), randomness from `key` or given as
    tensors (the TFLite export): (loss, skip), skip = the patch labels are all empty and
    train.skip_empty_patches is set. With train.level1_loss_weight > 0 the loss adds that
    weight x the same loss of level 1's upsampled logits against the whole masks. Training and
    the exported `train` both call this."""
    mc, tc = cfg.model, cfg.train
    deep = tc.level1_loss_weight > 0
    out = train_logits(
        params,
        images,
        masks,
        cfg=mc,
        key=key,
        randomness=randomness,
        unroll=mc.unroll if unroll is None else unroll,
        level1=deep,
    )
    logits, target = out[0], out[1]
    loss = segmentation_loss(logits, target, kind=tc.loss, focal_gamma=tc.focal_gamma)
    if deep:
        aux = segmentation_loss(out[2], masks, kind=tc.loss, focal_gamma=tc.focal_gamma)
        loss = loss + tc.level1_loss_weight * aux
    skip = (jnp.sum(target) == 0) if tc.skip_empty_patches else jnp.array(False)
    return loss, skip


def validation_dice(probs: np.ndarray, masks: np.ndarray) -> float:
    """Mean Dice of the 0.5-thresholded mean prediction: probs (S, N, H, W), masks (N, H, W)."""
    from nca_jax.metrics import dice

    pred = probs.mean(0) > 0.5
    return float(np.mean([dice(p, m > 0.5) for p, m in zip(pred, masks, strict=True)]))


def epoch_order(data_key: jax.Array, epoch: int, n: int) -> np.ndarray:
    return np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), n))


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    if not path.exists():
        return
    keep = [
        ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= last_epoch
    ]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def train_and_evaluate(
    cfg: RunConfig,
    train: Dataset,
    out: str | Path,
    *,
    val: Dataset | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    stop_at_val_dice: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains Med-NCA on `train` (images and masks), writes the run folder `out`.

    Saves an orbax checkpoint every cfg.train.checkpoint_every epochs and at the end;
    with `val`, the weights with the best validation Dice become weights.npz, else the last.
    `stop_after_epochs` ends the call early (as an interruption would), for tests;
    `stop_at_val_dice` ends it (checkpoint saved, resumable) once the validation Dice reaches it.
    With train.curriculum_epochs, those first epochs roll out train.curriculum_steps NCA steps.
    Returns the run summary also written to run.json."""
    cfg.validate()
    if train.masks is None:
        raise TrainingError(f"{train.source}: training needs masks")
    full = make_train_step(cfg)
    step_at = None
    if cfg.train.curriculum_epochs > 0:
        short = dataclasses.replace(cfg.model, steps=cfg.train.curriculum_steps)
        early = make_train_step(dataclasses.replace(cfg, model=short))
        n_early = cfg.train.curriculum_epochs

        def step_at(epoch: int) -> Callable:
            return early if epoch < n_early else full

    return fit(
        cfg,
        cfg.train,
        init_state(cfg),
        full,
        {"images": train.images, "masks": train.masks},
        out,
        val=val,
        resume=resume,
        progress=progress,
        stop=Stop(stop_after_epochs, stop_at_val_dice),
        hooks=Hooks(
            step_fn_at=step_at,
            schedule=make_optimizer_schedule(cfg.train),
            delivered=lambda st: delivered_params(st, cfg.train),
        ),
        log=log,
        summary_extra={
            "train_source": train.source,
            # the anatomical prior a fine-tuning run can check against (finetune --prior-share)
            "train_mask_share": float(np.mean(train.masks > 0.5)),
        },
    )


class LoopSettings(Protocol):
    """The fields of a config section that drive the epoch loop (TrainConfig, FinetuneConfig)."""

    epochs: int
    batch_size: int
    seed: int
    checkpoint_every: int
    keep_checkpoints: int
    eval_every: int
    eval_samples: int


StepFn = Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict]]


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What training and fine-tuning plug into the shared loop (all optional).

    step_fn_at(epoch): the step function of each epoch (a curriculum);
    refresh(epoch, params): new `carried` arrays at the start of an epoch (None = keep);
    on_epoch_end(epoch, params): extra fields for that epoch's metrics row;
    schedule: the learning rate per step, logged per epoch;
    delivered(state): the weights validated and saved (default: state.params), e.g. an average."""

    step_fn_at: Callable[[int], StepFn] | None = None
    refresh: Callable[[int, Params], dict[str, np.ndarray] | None] | None = None
    on_epoch_end: Callable[[int, Params], dict[str, Any] | None] | None = None
    schedule: optax.Schedule | None = None
    delivered: Callable[[TrainState], Params] | None = None

    def model(self, state: TrainState) -> Params:
        """The weights to validate and save at `state`."""
        return state.params if self.delivered is None else self.delivered(state)


@dataclasses.dataclass(frozen=True)
class Stop:
    """When a call ends before loop.epochs: after_epochs (as an interruption would; tests),
    at_val_dice (once validation Dice reaches it). Either way the run stays resumable."""

    after_epochs: int | None = None
    at_val_dice: float | None = None


@dataclasses.dataclass
class _Progress:
    """The loop's state besides the TrainState: where it starts, what is carried, the best."""

    start_epoch: int
    carried: dict[str, np.ndarray]
    best: dict[str, Any]


def _open_run(
    cfg: RunConfig,
    loop: LoopSettings,
    state: TrainState,
    carried: dict[str, np.ndarray],
    out: Path,
    per_epoch: int,
    resume: bool,
    log: Callable[[str], None],
) -> tuple[Any, TrainState, _Progress]:
    """Restore: checks the folder, opens its checkpoint manager, restores the latest checkpoint
    when resuming (a run killed before its first checkpoint starts over), writes config.json.
    -> (checkpoint manager, state, progress)."""
    if resume and not (out / "config.json").is_file():
        raise ckpt.RunError(f"{out}: nothing to resume (not a run folder)")
    if resume and load_config(out / "config.json") != cfg:
        raise ckpt.RunError(f"{out}: --resume with a config that differs from config.json")
    out.mkdir(parents=True, exist_ok=True)
    mngr = ckpt.checkpoint_manager(out / "checkpoints", loop.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"
    prog = _Progress(0, carried, {"val_dice": -1.0, "epoch": None})
    if resume and mngr.latest_step() is None:  # killed before its first checkpoint: start over
        log(f"{out}: no checkpoint yet, starting the run from the beginning")
        resume = False
        metrics_path.unlink(missing_ok=True)
        (out / "weights_best.npz").unlink(missing_ok=True)
    elif resume:
        like = {"state": state, "best": _best_like(), "carried": carried}
        restored = ckpt.restore_checkpoint(mngr, like)
        state = TrainState(*restored["state"])
        prog.carried = {k: np.asarray(v) for k, v in restored["carried"].items()}
        best = {k: v.item() for k, v in restored["best"].items()}
        best["epoch"] = None if best["epoch"] < 0 else int(best["epoch"])
        prog.best = best
        prog.start_epoch = int(state.step) // per_epoch
        _truncate_metrics(metrics_path, prog.start_epoch - 1)
        log(f"resuming {out} at epoch {prog.start_epoch} (step {int(state.step)})")
    elif (out / "config.json").exists() or mngr.latest_step() is not None:
        raise ckpt.RunError(f"{out}: already holds a run (use --resume or another --out)")
    else:
        metrics_path.unlink(missing_ok=True)
    save_config(cfg, out / "config.json")
    return mngr, state, prog


def _run_epoch(
    state: TrainState,
    step_fn: StepFn,
    arrays: dict[str, np.ndarray],
    order: np.ndarray,
    batch: int,
    step_key: jax.Array,
    mesh: Any,
    bar: Any,
    epoch: int,
    fail: Callable[[TrainState], TrainingError],
) -> tuple[TrainState, dict[str, Any]]:
    """Epoch: one pass over `order` in batches -> (state, metrics row without validation).
    A non-finite step raises fail(state)."""
    per_epoch = len(order) // batch
    losses, skipped, t0 = [], 0, time.perf_counter()
    term_sums: dict[str, float] = {}
    for b in range(per_epoch):
        idx = order[b * batch : (b + 1) * batch]
        sharded = shard_batch({k: v[idx] for k, v in arrays.items()}, mesh)
        state, info = step_fn(state, sharded, step_key)
        loss = float(info["loss"])
        if not bool(info["finite"]):
            raise fail(state)
        skipped += int(info["skipped"])
        losses.append(loss)
        for k, v in info.get("terms", {}).items():
            term_sums[k] = term_sums.get(k, 0.0) + float(v)
        bar.update(1)
        rate = batch * (b + 1) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{rate:.2f}")
    dt = time.perf_counter() - t0
    row: dict[str, Any] = {
        "epoch": epoch,
        "step": int(state.step),
        "loss": float(np.mean(losses)),
        "skipped_steps": skipped,
        "epoch_s": dt,
        "images_per_s": per_epoch * batch / dt,
    }
    row.update({f"term_{k}": v / per_epoch for k, v in term_sums.items()})
    return state, row


def _evaluate(
    predict: Callable, params: Params, val: Dataset, eval_key: jax.Array
) -> dict[str, float]:
    """Evaluate: validation Dice of params (the row fields val_dice and eval_s)."""
    t = time.perf_counter()
    probs = predict_dataset(predict, params, val.images, eval_key)
    return {"val_dice": validation_dice(probs, val.masks), "eval_s": time.perf_counter() - t}


def _finalise(
    out: Path, model: Params, summary: dict[str, Any], best_epoch: int | None, has_val: bool
) -> None:
    """Finalise a finished run: weights.npz (the best validation weights, copied so that a
    resume finds them again, or the last), weights_last.npz (`model`: the last delivered
    weights), run.json, training_curve.png."""
    if has_val and (out / "weights_best.npz").exists():
        ckpt.atomic_copy(out / "weights_best.npz", out / "weights.npz")
        summary["weights"] = f"best validation Dice (epoch {best_epoch})"
    else:
        ckpt.save_weights(model, out / "weights.npz")
        summary["weights"] = "last epoch"
    ckpt.save_weights(model, out / "weights_last.npz")
    ckpt.write_json(out / "run.json", summary)
    plot_curves(out / "metrics.jsonl", out / "training_curve.png")


def fit(
    cfg: RunConfig,
    loop: LoopSettings,
    state: TrainState,
    step_fn: StepFn,
    fixed: dict[str, np.ndarray],
    out: str | Path,
    *,
    carried: dict[str, np.ndarray] | None = None,
    val: Dataset | None = None,
    resume: bool = False,
    progress: bool = True,
    stop: Stop = Stop(),
    hooks: Hooks = Hooks(),
    log: Callable[[str], None] = print,
    summary_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The epoch loop shared by training and fine-tuning; writes the run folder `out`.

    fixed / carried: per-example arrays (N, ...) batched together; `carried` ones (e.g.
    refreshed VWSL targets) are checkpointed with the state and may be replaced by
    hooks.refresh. step_fn(state, batch dict, step_key) -> (state, info with loss, finite,
    skipped, optional terms averaged per epoch into the row as term_NAME). Saves a checkpoint
    every loop.checkpoint_every epochs and at the end; returns the summary (run.json when
    finished)."""
    out = Path(out)
    n = len(next(iter(fixed.values())))
    batch = min(loop.batch_size, n)
    if batch < loop.batch_size:
        log(f"warning: batch size {loop.batch_size} but only {n} examples: batches of {n}")
    per_epoch = n // batch
    root = jax.random.key(loop.seed)
    data_key, step_key = jax.random.fold_in(root, DATA_KEY), jax.random.fold_in(root, STEP_KEY)
    eval_key = jax.random.fold_in(root, EVAL_KEY)

    mesh = data_mesh()
    if batch % mesh.devices.size:
        raise TrainingError(
            f"{out}: batch size {batch} is not divisible by the {mesh.devices.size} devices"
        )
    mngr, state, prog = _open_run(
        cfg, loop, state, dict(carried or {}), out, per_epoch, resume, log
    )

    predict = make_predict(cfg.model, loop.eval_samples) if val is not None else None
    state = replicate(state, mesh)
    end_epoch = loop.epochs if stop.after_epochs is None else min(loop.epochs, stop.after_epochs)
    bar = tqdm(total=(end_epoch - prog.start_epoch) * per_epoch, disable=not progress, unit="step")
    t_start = time.perf_counter()
    last_good = mngr.latest_step()
    for epoch in range(prog.start_epoch, end_epoch):
        if hooks.refresh is not None:
            new = hooks.refresh(epoch, state.params)
            prog.carried = prog.carried if new is None else new

        def fail(st: TrainState, epoch: int = epoch, good: int | None = last_good) -> TrainingError:
            bar.close()
            return TrainingError(
                f"{out}: non-finite loss, gradient or weights at step {int(st.step) - 1} "
                f"(epoch {epoch}); stopped, last good checkpoint: step {good}"
            )

        state, row = _run_epoch(
            state,
            step_fn if hooks.step_fn_at is None else hooks.step_fn_at(epoch),
            {**fixed, **prog.carried},
            epoch_order(data_key, epoch, n),
            batch,
            step_key,
            mesh,
            bar,
            epoch,
            fail,
        )
        if hooks.schedule is not None:
            row["lr"] = float(hooks.schedule(int(state.step)))
        if hooks.on_epoch_end is not None:
            row.update(hooks.on_epoch_end(epoch, state.params) or {})
        last = epoch + 1 == end_epoch
        if val is not None and ((epoch + 1) % loop.eval_every == 0 or epoch + 1 == loop.epochs):
            model = hooks.model(state)
            row.update(_evaluate(predict, model, val, eval_key))
            if row["val_dice"] > prog.best["val_dice"]:
                prog.best = {"val_dice": row["val_dice"], "epoch": epoch}
                ckpt.save_weights(model, out / "weights_best.npz")
            if stop.at_val_dice is not None and row["val_dice"] >= stop.at_val_dice:
                end_epoch, last = epoch + 1, True  # reached: stop here, resumable
        with (out / "metrics.jsonl").open("a") as f:
            f.write(to_json(row) + "\n")
        if (epoch + 1) % loop.checkpoint_every == 0 or last:
            tree = {"state": state, "best": _best_arrays(prog.best), "carried": prog.carried}
            ckpt.save_checkpoint(mngr, int(state.step), tree)
            last_good = int(state.step)
        if last:
            break
    bar.close()
    finished = end_epoch == loop.epochs
    best = prog.best
    summary = {
        "finished": finished,
        "epochs_done": end_epoch,
        "steps": int(state.step),
        "batch_size": batch,
        "steps_per_epoch": per_epoch,
        "wall_s_this_call": time.perf_counter() - t_start,
        **(summary_extra or {}),
        "n_train": n,
        "val_source": None if val is None else val.source,
        "best_val_dice": None if best["epoch"] is None else best["val_dice"],
        "best_epoch": best["epoch"],
    }
    if finished:
        _finalise(out, hooks.model(state), summary, best["epoch"], val is not None)
    mngr.close()
    return summary


def make_optimizer_schedule(tc: TrainConfig | FinetuneConfig) -> optax.Schedule:
    """Learning rate per optimizer step: a linear warm-up (train.warmup_steps), then the
    paper's exponential decay by lr_decay per step, or a cosine decay to 0 over decay_steps."""
    if isinstance(tc, TrainConfig) and tc.schedule == "cosine":
        decay = optax.cosine_decay_schedule(tc.lr, tc.decay_steps)
    else:
        decay = optax.exponential_decay(tc.lr, transition_steps=1, decay_rate=tc.lr_decay)
    warm = tc.warmup_steps if isinstance(tc, TrainConfig) else 0
    if warm <= 0:
        return decay
    ramp = optax.linear_schedule(0.0, tc.lr, warm)
    return optax.join_schedules([ramp, decay], [warm])


def _best_like() -> dict[str, jax.Array]:
    return {"val_dice": jnp.zeros((), jnp.float32), "epoch": jnp.zeros((), jnp.int32)}


def _best_arrays(best: dict[str, Any]) -> dict[str, jax.Array]:
    ep = -1 if best["epoch"] is None else best["epoch"]
    return {
        "val_dice": jnp.asarray(best["val_dice"], jnp.float32),
        "epoch": jnp.asarray(ep, jnp.int32),
    }


def curve_figure(rows: list[dict[str, Any]]) -> Any:
    """metrics.jsonl rows -> a matplotlib figure: training loss per epoch and, when present,
    validation Dice on a second axis. The legend sits above the axes, never over the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), layout="constrained")
    (line,) = ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows], label="train loss")
    handles = [line]
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    vals = [(r["epoch"], r["val_dice"]) for r in rows if "val_dice" in r]
    if vals:
        ax2 = ax.twinx()
        (v,) = ax2.plot(*zip(*vals, strict=True), "o-", color="tab:orange", label="validation Dice")
        handles.append(v)
        ax2.set_ylabel("validation Dice")
        ax2.set_ylim(0, 1)
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), frameon=False)
    return fig


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Training loss (and validation Dice when present) per epoch -> PNG (written atomically)."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln]
    save_figure(curve_figure(rows), png, dpi=100)
