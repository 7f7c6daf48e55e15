"""Frozen configuration dataclasses, saved as JSON beside every run and checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from nca_jax.errors import ConfigError  # noqa: F401 (re-exported)

_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def check_fields(section: Any, name: str) -> None:
    """Every field of the dataclass `section` has its declared type (int, float, bool, str; a
    bool is not taken for a number) and every float is finite; else a ConfigError naming
    `name.field`."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        types = _TYPES.get(f.type if isinstance(f.type, str) else f.type.__name__)
        if types is None:
            continue
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise ConfigError(f"{name}.{f.name} must be of type {f.type}, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{name}.{f.name} must be finite, got {v}")


MODEL_KINDS = ("med-nca", "unet")
PERCEIVE_IMPLS = ("conv", "im2col")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Med-NCA architecture. Defaults are the paper's (26,432 parameters). kind "unet" selects
    the UNet baseline instead (nca_jax/unet.py; unet_blocks / unet_channels: 5 / 64 is the
    paper's 36,950,273-parameter UNet, 3 / 7 the small one), and the NCA fields are unused."""

    channels: int = 16  # state channels per cell; channel 0 = image, channel 1 = lung logits
    hidden: int = 128  # width of the per-cell update MLP
    steps: int = 50  # NCA steps per level (authors' newer code: 50; older: 64)
    fire_rate: float = 0.5  # probability that a cell updates in a step
    downscale: int = 4  # level 1 runs on the image downscaled by this factor
    patch: int = 64  # level-2 training patch size (the low-resolution size at 256 px)
    bn_eps: float = 1e-5  # batch-norm epsilon (PyTorch's default)
    unroll: bool = True  # fully unroll the training rollout (3x faster gradient on XLA CPU)
    fast_backward: bool = True  # hand-written MLP/batch-norm gradient (same values, faster)
    # how the two 3x3 perception convolutions are computed (same function): "conv" (one
    # convolution each) or "im2col" (the nine shifted windows side by side times both kernels:
    # one matmul). The TFLite export uses "im2col": LiteRT's XNNPACK delegate runs matmuls
    # with variable weights but not convolutions. "im2col" needs fast_backward. For kind
    # "unet", "im2col" computes the UNet's convolutions and upsampling as matmuls the same way
    # (nca_jax/conv.py).
    perceive: str = "conv"
    # the fast_backward path's batch norm folded into the first dense layer through the (F, F)
    # covariance of the MLP's input: same function, fewer passes over the (cells, hidden)
    # array (a training step 1.14-1.26x at batch 4, session 19). fast_backward false (XLA's own
    # gradient of the flax rule, the reference) does not fold.
    fold_norm: bool = True
    # > 0: the folded MLP runs this many cells at a time (a lax.scan over chunks of cells, each
    # chunk's (cells, hidden) arrays in cache; the backward recomputes them): same function.
    # 0 = all cells at once; -1 = auto (2048 on CPU, 0 on GPU/TPU; nca_jax.mlp.resolve_chunk).
    # Unused where fold_norm is false; the TFLite export always uses 0.
    mlp_chunk: int = -1
    # 1: the folded MLP runs only on the cells that fire in a step (their updates are the only
    # ones kept; the norm's statistics still take every cell): same function, half the MLP's
    # matmuls at fire rate 0.5. 0: on every cell. -1 = auto: where the MLP runs in chunks (on
    # CPU). Unused where fold_norm is false; the TFLite export and vmapped predictions use 0.
    mlp_fired: int = -1
    # 1: every NCA step of a prediction (model.predict_state: evaluation, the samples of the
    # variance, VWSL's targets) is one fused CPU kernel (nca_jax/fused.py, compiled with g++ on
    # first use; x86-64 with AVX-512, channels 16, hidden 128): same function, a prediction
    # 1.8x faster (session 32). 0: XLA's ops. -1 = auto: on the CPU backend where the kernel
    # builds. The TFLite export and predict_history never use it.
    fused_forward: int = -1
    # the same for the NCA steps of training and fine-tuning (model.train_logits, VWSL's
    # losses): each step one fused kernel forward and one fused kernel backward (which
    # recomputes the step's features and statistics): same function and gradients to float
    # rounding (session 33). 1 / 0 / -1 (auto) as fused_forward.
    fused_train: int = -1
    kind: str = "med-nca"  # "med-nca" or "unet" (the deterministic baseline of Table 1)
    unet_blocks: int = 5  # UNet: encoding blocks (pooling levels + 1)
    unet_channels: int = 64  # UNet: channels of the first level, doubled per level

    def validate(self) -> None:
        check_fields(self, "model")
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.perceive not in PERCEIVE_IMPLS:
            raise ConfigError(
                f"model.perceive must be one of {PERCEIVE_IMPLS}, got {self.perceive!r}"
            )
        if self.perceive == "im2col" and not self.fast_backward:
            raise ConfigError('model.perceive "im2col" needs model.fast_backward true')
        if self.mlp_chunk < -1:
            raise ConfigError(f"model.mlp_chunk must be -1 (auto) or >= 0, got {self.mlp_chunk}")
        if self.mlp_fired not in (-1, 0, 1):
            raise ConfigError(f"model.mlp_fired must be -1 (auto), 0 or 1, got {self.mlp_fired}")
        if self.fused_forward not in (-1, 0, 1):
            raise ConfigError(
                f"model.fused_forward must be -1 (auto), 0 or 1, got {self.fused_forward}"
            )
        if self.fused_train not in (-1, 0, 1):
            raise ConfigError(
                f"model.fused_train must be -1 (auto), 0 or 1, got {self.fused_train}"
            )
        if self.mlp_chunk > 0 and not (self.fold_norm and self.fast_backward):
            raise ConfigError("model.mlp_chunk > 0 needs model.fold_norm and model.fast_backward")
        if self.unet_blocks < 2 or self.unet_channels < 1:
            raise ConfigError("model.unet_blocks must be >= 2 and model.unet_channels >= 1")
        if not (math.isfinite(self.bn_eps) and self.bn_eps > 0):
            raise ConfigError(f"model.bn_eps must be positive, got {self.bn_eps}")
        if self.channels < 2:
            raise ConfigError("model.channels must be >= 2 (image + logits)")
        if self.hidden < 1 or self.steps < 1 or self.downscale < 1 or self.patch < 1:
            raise ConfigError("model.hidden, steps, downscale and patch must be positive")
        if not 0.0 < self.fire_rate <= 1.0:
            raise ConfigError(f"model.fire_rate must lie in (0, 1], got {self.fire_rate}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Supervised training. Defaults are the paper's protocol (1500 epochs, batch 16)."""

    epochs: int = 1500
    batch_size: int = 16
    lr: float = 1.6e-3
    beta1: float = 0.9
    beta2: float = 0.99
    lr_decay: float = 0.9999  # exponential decay of the learning rate per step
    # Time-to-quality options (the defaults are the paper's: constant-rate exponential decay,
    # no warm-up, 50 NCA steps from the start). They change how the model is trained, not the
    # model: inference always runs model.steps.
    schedule: str = "exponential"  # or "cosine": lr -> 0 along a half cosine over decay_steps
    decay_steps: int = 0  # cosine only: steps of the decay (after the warm-up)
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    curriculum_epochs: int = 0  # the first curriculum_epochs epochs run ...
    curriculum_steps: int = 0  # ... this many NCA steps per level (cheaper steps early)
    # deep supervision: + this weight x the loss of level 1's lung logits (upsampled, whole
    # image) against the mask; 0 = the authors' loss on the level-2 patch only
    level1_loss_weight: float = 0.0
    # Polyak averaging: > 0 keeps an exponential moving average of the weights (ema <- d x ema
    # + (1 - d) x weights after every step, starting at the initial weights); validation, the
    # best and the last weights are then the average's. 0 = the authors' (no average)
    ema_decay: float = 0.0
    loss: str = "dice_bce"  # "dice_bce" or "dice_focal"
    focal_gamma: float = 2.0
    skip_empty_patches: bool = True  # authors: a batch whose patch labels are all empty is skipped
    image_size: int = 256
    seed: int = 0
    checkpoint_every: int = 10  # epochs
    eval_every: int = 10  # epochs; validation Dice when a validation folder is given
    eval_samples: int = 1  # stochastic predictions averaged per validation image
    keep_checkpoints: int = 2

    def validate(self) -> None:
        check_fields(self, "train")
        if not 0 < self.lr_decay <= 1 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("train.lr_decay must lie in (0, 1], beta1 and beta2 in [0, 1)")
        if self.focal_gamma < 0:
            raise ConfigError(f"train.focal_gamma must be >= 0, got {self.focal_gamma}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.epochs and train.batch_size must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be positive and finite, got {self.lr}")
        if self.loss not in ("dice_bce", "dice_focal"):
            raise ConfigError(f"train.loss must be 'dice_bce' or 'dice_focal', got {self.loss!r}")
        if self.checkpoint_every < 1 or self.eval_every < 1 or self.eval_samples < 1:
            raise ConfigError("train.checkpoint_every, eval_every, eval_samples must be >= 1")
        if self.keep_checkpoints < 1:
            raise ConfigError("train.keep_checkpoints must be >= 1 (else a run cannot resume)")
        if self.schedule not in ("exponential", "cosine"):
            raise ConfigError(
                f"train.schedule must be 'exponential' or 'cosine', got {self.schedule!r}"
            )
        if self.schedule == "cosine" and self.decay_steps < 1:
            raise ConfigError("train.schedule 'cosine' needs train.decay_steps >= 1")
        if min(self.warmup_steps, self.curriculum_epochs, self.curriculum_steps) < 0:
            raise ConfigError("train.warmup_steps and curriculum fields must be >= 0")
        if (self.curriculum_epochs > 0) != (self.curriculum_steps > 0):
            raise ConfigError("train.curriculum_epochs and curriculum_steps go together")
        if self.level1_loss_weight < 0:
            raise ConfigError(
                f"train.level1_loss_weight must be >= 0, got {self.level1_loss_weight}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")


FINETUNE_METHODS = ("vwsl", "pseudo-label", "entropy")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on unlabelled images. Defaults from the authors' code, except gamma
    (see README: chosen without target labels; the paper reports 1e3, the code uses 1e2).

    method: 'vwsl' (weighted Dice + BCE to the median target + gamma x consistency),
    'pseudo-label' (the same targets, w = 1, no consistency term) or 'entropy' (TENT-style:
    the binary entropy of the mean of two stochastic level-2 runs; with update='norm' only the
    batch-norm scale and shift change). The safety net (check_every > 0): every check_every
    epochs the model predicts check_samples samples of the first check_images images; a check
    is acceptable when its predicted lung share stays within [area_min_ratio, area_max_ratio]
    of the source model's share and its quality score (sample spread) is at most
    (1 - min_quality_gain) x the source's. The last acceptable check is kept
    (keep='until-failure': the last one before the first unacceptable check); with none, the
    run rolls back to the source weights (rollback=True). With prior_share P > 0 (the mean
    lung share of the source site's training masks, which train.py records in run.json as
    train_mask_share) a check must also keep its lung share no farther from P than the source
    model's share on the same images: an anatomical prior with a direction. finetune.py
    sets P from the source run unless told otherwise (nca_jax.guard.PRIOR_BY_DEFAULT); the
    dataclass's own default, 0.0, is no prior."""

    method: str = "vwsl"
    update: str = "all"  # parameters that change: "all", or "norm" (batch-norm scale, shift)
    epochs: int = 100
    batch_size: int = 8
    lr: float = 3e-6
    beta1: float = 0.9
    beta2: float = 0.99
    lr_decay: float = 0.9999  # per step, as the authors' fine-tuning config (lr_gamma)
    gamma: float = 1e2  # weight of the consistency term
    # "fixed": gamma as given; "balance": gamma chosen without labels before fine-tuning so that
    # gamma x the consistency gradient has the norm of the segmentation gradient (source
    # weights, first batch of targets); the value used is saved in the run's gamma.json
    gamma_rule: str = "fixed"
    samples: int = 10  # stochastic predictions per image for the surrogate target
    target_reduce: str = "median"  # "median" (authors' code) or "mean" (paper)
    weight_kind: str = "std"  # w = 1 - 2 std (authors' code) or "var": w = 1 - 4 var
    refresh_every: int = 0  # recompute targets every K epochs; 0 = once, before fine-tuning
    loss: str = "dice_bce"
    focal_gamma: float = 2.0
    seed: int = 0
    checkpoint_every: int = 10
    eval_every: int = 10
    eval_samples: int = 1
    keep_checkpoints: int = 2
    snapshot_every: int = 0  # save the weights every K epochs under snapshots/ (0 = never)
    check_every: int = 20  # epochs between label-free checks (0: no checks, no rollback)
    check_images: int = 16  # the first N fine-tuning images are checked
    check_samples: int = 4  # stochastic predictions per checked image
    area_min_ratio: float = 0.8  # predicted lung share / source share must stay in this band
    area_max_ratio: float = 1.25
    min_quality_gain: float = 0.0  # quality score must fall at least by this fraction
    rollback: bool = True  # no acceptable check -> weights.npz = the source weights
    # which acceptable check is kept: "latest" of all, or "until-failure": the latest before the
    # first unacceptable one (a stop rule: once a check fails, later recoveries are not trusted)
    keep: str = "latest"
    # anatomical prior: the source site's mean training-mask lung share (0 = no prior rule)
    prior_share: float = 0.0
    source_run: str = ""  # the run it starts from (for the record)

    def validate(self) -> None:
        check_fields(self, "finetune")
        for name in (
            "gamma",
            "lr",
            "lr_decay",
            "beta1",
            "beta2",
            "area_min_ratio",
            "area_max_ratio",
            "min_quality_gain",
            "focal_gamma",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"finetune.{name} must be finite and >= 0, got {v}")
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(
                f"finetune.method must be one of {FINETUNE_METHODS}, got {self.method!r}"
            )
        if self.gamma_rule not in ("fixed", "balance"):
            raise ConfigError(
                f"finetune.gamma_rule must be 'fixed' or 'balance', got {self.gamma_rule!r}"
            )
        if self.keep not in ("latest", "until-failure"):
            raise ConfigError(
                f"finetune.keep must be 'latest' or 'until-failure', got {self.keep!r}"
            )
        if self.update not in ("all", "norm"):
            raise ConfigError(f"finetune.update must be 'all' or 'norm', got {self.update!r}")
        if not 0 < self.lr_decay <= 1 or not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("finetune.lr_decay must lie in (0, 1], beta1 and beta2 in [0, 1)")
        if self.area_min_ratio > self.area_max_ratio:
            raise ConfigError("finetune.area_min_ratio must not exceed area_max_ratio")
        if not 0.0 <= self.prior_share < 1.0:
            raise ConfigError(
                f"finetune.prior_share must lie in [0, 1) (0 = no prior), got {self.prior_share}"
            )
        if self.check_every < 0 or self.check_images < 1 or self.check_samples < 2:
            raise ConfigError(
                "finetune.check_every must be >= 0, check_images >= 1, check_samples >= 2"
            )
        if self.lr == 0:
            raise ConfigError("finetune.lr must be > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.samples < 2:
            raise ConfigError("finetune.epochs, batch_size must be >= 1 and samples >= 2")
        if self.target_reduce not in ("median", "mean"):
            raise ConfigError("finetune.target_reduce must be 'median' or 'mean'")
        if self.weight_kind not in ("std", "var", "none"):
            raise ConfigError("finetune.weight_kind must be 'std', 'var' or 'none'")
        if self.loss not in ("dice_bce", "dice_focal"):
            raise ConfigError("finetune.loss must be 'dice_bce' or 'dice_focal'")
        if self.keep_checkpoints < 1 or self.checkpoint_every < 1:
            raise ConfigError(
                "finetune.keep_checkpoints and checkpoint_every must be >= 1 (else a run "
                "cannot resume)"
            )
        if self.refresh_every < 0 or self.snapshot_every < 0:
            raise ConfigError("finetune.refresh_every and snapshot_every must be >= 0")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs to be reproduced: saved as `config.json` in the run folder."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None  # set in runs made by finetune.py

    def validate(self) -> RunConfig:
        self.model.validate()
        self.train.validate()
        if self.finetune is not None:
            self.finetune.validate()
        if self.model.kind == "unet":
            if self.train.level1_loss_weight:
                raise ConfigError("train.level1_loss_weight needs Med-NCA: a UNet has no level 1")
            levels = 2 ** (self.model.unet_blocks - 1)
            if self.train.image_size % levels:
                raise ConfigError(
                    f"train.image_size must be divisible by {levels} for a UNet with "
                    f"{self.model.unet_blocks} encoding blocks"
                )
            return self
        if self.train.image_size % self.model.downscale:
            raise ConfigError("train.image_size must be divisible by model.downscale")
        if self.model.patch > self.train.image_size:
            raise ConfigError("model.patch must not exceed train.image_size")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    return cls(**data)


def config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    """Builds a RunConfig from a (possibly partial) nested dict; missing fields keep defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    unknown = set(data) - {"model", "train", "finetune"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}")
    model = _build(ModelConfig, data.get("model", {}), f"{where} [model]")
    train = _build(TrainConfig, data.get("train", {}), f"{where} [train]")
    ft = data.get("finetune")
    finetune = None if ft is None else _build(FinetuneConfig, ft, f"{where} [finetune]")
    try:
        return RunConfig(model=model, train=train, finetune=finetune).validate()
    except ConfigError as e:  # validation names the field; say which file it is in too
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from e


def load_config(path: str | os.PathLike) -> RunConfig:
    """Reads a config JSON file (full or partial); raises ConfigError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({e})") from e
    try:
        return config_from_dict(data, where=str(path))
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from e


def json_safe(obj: Any) -> Any:
    """obj with every non-finite float (NaN, inf) replaced by None and numpy scalars and arrays
    made plain, so that json.dumps writes valid JSON (null, never a bare NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str):  # numpy / jax scalars and arrays
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    """Valid JSON of obj (see json_safe): non-finite numbers become null."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temporary name beside `path`, then renames it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write_bytes for text (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def with_overrides(cfg: RunConfig, **train_fields: Any) -> RunConfig:
    """Returns cfg with the given train fields replaced (None values are ignored)."""
    fields = {k: v for k, v in train_fields.items() if v is not None}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields)).validate()
