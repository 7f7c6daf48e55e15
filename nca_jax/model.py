"""Med-NCA: two neural-cellular-automaton levels with an explicit-randomness step.

Shapes: B batch, H x W cells, C state channels (channel 0 = image, channel 1 = lung logits).
One level's learned parts (`UpdateRule`) map a state (B, H, W, C) to a proposed update
(B, H, W, C). The stochastic step applies it through a per-cell fire mask (B, H, W, 1) that is
drawn from a PRNG key or passed in as a tensor (the TFLite export needs the latter). The mask
is NOT rescaled (unlike dropout): a cell either adds its full update or keeps its state.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nca_jax import conv, mlp
from nca_jax.config import ModelConfig
from nca_jax.fused import resolve as resolve_fused
from nca_jax.fused import step as fused_step
from nca_jax.unet import init_unet, unet_logits

Params = dict[str, Any]

LEVEL_KEY, LEVEL2_KEY, PATCH_KEY = 1, 2, 3  # fold_in tags for the per-level keys


class BatchStatsNorm(nn.Module):
    """Batch norm that always uses the current batch's statistics (no running averages).

    x: (B, H, W, F) -> (B, H, W, F), normalised over (B, H, W) per feature, then scaled and
    shifted by learned (F,) vectors. A prediction therefore depends on the batch it is in.
    """

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))  # biased, as PyTorch normalises
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class Perceive(nn.Module):
    """State (B, H, W, C) -> features (B, H, W, 3C): the state and two learned 3x3 convolutions
    of it (full C -> C, with bias), reflect padding."""

    channels: int

    @nn.compact
    def __call__(self, state: jax.Array) -> jax.Array:
        padded = jnp.pad(state, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        p0 = nn.Conv(self.channels, (3, 3), padding="VALID", name="conv0")(padded)
        p1 = nn.Conv(self.channels, (3, 3), padding="VALID", name="conv1")(padded)
        return jnp.concatenate([state, p0, p1], axis=-1)


class UpdateRule(nn.Module):
    """One NCA level's learned rule: state (B, H, W, C) -> proposed update (B, H, W, C).

    perceive -> dense 3C->hidden -> batch-stats norm -> ReLU -> dense hidden->C (no bias, zero
    initialised, so an untrained automaton is the identity).
    """

    channels: int = 16
    hidden: int = 128
    bn_eps: float = 1e-5

    @nn.compact
    def __call__(self, state: jax.Array) -> jax.Array:
        x = Perceive(self.channels, name="perceive")(state)
        x = nn.Dense(self.hidden, name="dense_in")(x)
        x = BatchStatsNorm(self.bn_eps, name="norm")(x)
        x = nn.relu(x)
        return nn.Dense(
            self.channels, use_bias=False, kernel_init=nn.initializers.zeros, name="dense_out"
        )(x)


def update_rule(cfg: ModelConfig) -> UpdateRule:
    return UpdateRule(channels=cfg.channels, hidden=cfg.hidden, bn_eps=cfg.bn_eps)


def perceive_im2col(perceive_params: Params, state: jax.Array) -> jax.Array:
    """Perceive's function as one matmul: state (B, H, W, C) -> features (B, H, W, 3C).

    Both 3x3 convolutions at once, as `conv.conv3x3_columns` with their kernels side by side
    (C -> 2C, reflect padding). Same parameters and values as `Perceive` (to float rounding).
    The TFLite export's trainable files use it: LiteRT's XNNPACK delegate takes no convolution
    with computed weights, and `mlp.matmul` keeps the backward's product delegated too."""
    pp = perceive_params
    k = jnp.concatenate([pp["conv0"]["kernel"], pp["conv1"]["kernel"]], -1)  # (3, 3, C, 2C)
    bias = jnp.concatenate([pp["conv0"]["bias"], pp["conv1"]["bias"]])
    p = conv.conv3x3_columns(state, k, bias, pad_mode="reflect")
    return jnp.concatenate([state, p], axis=-1)


CONV_DIMS = ("NHWC", "HWIO", "NHWC")  # flax's nn.Conv layout


def _centred(x: jax.Array) -> jax.Array:
    """x (B, H, W, F) less its per-feature mean over (B, H, W), the mean behind stop_gradient
    (see `perceive_centred`)."""
    return x - jax.lax.stop_gradient(jnp.mean(x, axis=(0, 1, 2)))


def perceive_centred(perceive_params: Params, state: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The perception's features less their mean over all cells, one row per cell: state
    (B, H, W, C) -> (B H W, 3C), what the folded MLP (`mlp.folded_mlp` with centred=True)
    takes. The parts are concatenated as rows, so that the converter merges the MLP's column
    of ones (`mlp.cell_mlp_folded`) into the same CONCATENATION.

    The batch-stats norm makes the MLP a function of its centred input, so the convolutions'
    biases cancel (they are left out: their gradient is exactly 0, where it was rounding
    noise) and each of the three parts is centred on its own, in the one pass that
    concatenates them: the uncentred features are never written whole. The means are behind
    stop_gradient, exact here: the norm makes the MLP's input gradient sum to 0 over cells, so
    the centring's own gradient (subtracting that sum's mean) is the identity. "conv" and
    "im2col" as in `apply_rule`."""
    pp = perceive_params
    if cfg.perceive == "im2col":
        k = jnp.concatenate([pp["conv0"]["kernel"], pp["conv1"]["kernel"]], -1)
        parts = [conv.conv3x3_columns(state, k, None, pad_mode="reflect")]
    else:
        padded = jnp.pad(state, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        parts = [
            jax.lax.conv_general_dilated(
                padded, pp[name]["kernel"], (1, 1), "VALID", dimension_numbers=CONV_DIMS
            )
            for name in ("conv0", "conv1")
        ]
    rows = [_centred(q).reshape(-1, q.shape[-1]) for q in [state, *parts]]
    return jnp.concatenate(rows, axis=-1)


def _update_channels(cfg: ModelConfig) -> jax.Array:
    """(C,) 0 for channel 0 (the image, which no step changes), 1 for the others: the update
    times it is 0 in channel 0, so a step keeps the image there without slicing it back in."""
    return (jnp.arange(cfg.channels) > 0).astype(jnp.float32)


def apply_rule(
    level_params: Params, state: jax.Array, cfg: ModelConfig, fired: jax.Array | None = None
) -> jax.Array:
    """UpdateRule's function with the fast backward, channel 0's update zeroed (as a step
    uses it): state (B, H, W, C) -> update (B, H, W, C).

    Same parameters and same values as `update_rule(cfg).apply(...) * _update_channels(cfg)`
    (to float rounding); the zeroing is folded into dense_out's kernel. Given the
    step's fire mask fired (B, H, W, 1) and cfg.mlp_fired on (`mlp.resolve_fired`), it is the
    update times fired, the MLP computed only where fired is 1; else every cell's update.
    With cfg.fold_norm the features are centred as they are made (`perceive_centred`)."""
    b, h, w, _ = state.shape
    if cfg.fold_norm:
        feats = perceive_centred(level_params["perceive"], state, cfg)
    elif cfg.perceive == "im2col":
        feats = perceive_im2col(level_params["perceive"], state)
    else:
        feats = Perceive(cfg.channels).apply({"params": level_params["perceive"]}, state)
    p = level_params
    args = (
        feats.reshape(b * h * w, -1),
        p["dense_in"]["kernel"],
        p["dense_in"]["bias"],
        p["norm"]["scale"],
        p["norm"]["bias"],
        p["dense_out"]["kernel"] * _update_channels(cfg),
        cfg.bn_eps,
    )
    if cfg.fold_norm:
        chunk = mlp.resolve_chunk(cfg.mlp_chunk)
        if fired is not None and not mlp.resolve_fired(cfg.mlp_fired, chunk):
            fired = None
        out = mlp.folded_mlp(
            *args,
            chunk=chunk,
            fired=None if fired is None else fired.reshape(b * h * w),
            rate=cfg.fire_rate,
            centred=True,
        )
    else:
        out = mlp.cell_mlp(*args)
    return out.reshape(b, h, w, -1)


def init_params(cfg: ModelConfig, *, key: jax.Array) -> Params:
    """Fresh parameters {'level1': ..., 'level2': ...}, each level with its own weights (a
    UNet's own tree for kind "unet")."""
    if cfg.kind == "unet":
        return init_unet(cfg, key)
    rule = update_rule(cfg)
    dummy = jnp.zeros((1, 4, 4, cfg.channels), jnp.float32)
    k1, k2 = jax.random.split(key)
    return {
        "level1": rule.init(k1, dummy)["params"],
        "level2": rule.init(k2, dummy)["params"],
    }


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def fire_mask(key: jax.Array, shape: tuple[int, int, int], rate: float) -> jax.Array:
    """Bernoulli(rate) per cell: (B, H, W) -> float32 mask (B, H, W, 1), 1 = the cell updates.

    (The authors' code updates where uniform > rate, i.e. with probability 1 - rate; at the
    default rate 0.5 the two are the same distribution.)"""
    return (jax.random.uniform(key, (*shape, 1)) < rate).astype(jnp.float32)


def nca_step(
    level_params: Params,
    state: jax.Array,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    fused: bool = False,
) -> jax.Array:
    """One stochastic NCA step: state (B, H, W, C) -> new state (B, H, W, C).

    Channel 0 of the state is the image: the update is 0 there (`_update_channels`), so every
    step keeps it. Exactly one of `key` (a PRNG key; the fire mask is drawn from it) or `mask`
    (a given fire mask (B, H, W, 1) of 0/1) must be passed: randomness is never implicit.
    fused=True computes the step in one CPU kernel, its gradient in another (`nca_jax.fused`).
    """
    if (key is None) == (mask is None):
        raise TypeError("nca_step needs exactly one of key= (a PRNG key) or mask= (a fire mask)")
    if mask is None:
        mask = fire_mask(key, state.shape[:3], cfg.fire_rate)
    if fused:
        return fused_step(level_params, state, mask, cfg, _update_channels(cfg))
    if cfg.fast_backward:
        delta = apply_rule(level_params, state, cfg, fired=mask)
    else:
        delta = update_rule(cfg).apply({"params": level_params}, state) * _update_channels(cfg)
    return state + delta * mask


def step_keys(key: jax.Array, steps: int) -> jax.Array:
    """Per-step keys fold_in(key, i) for i < steps: (steps,) keys."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(steps))


def rollout(
    level_params: Params,
    state: jax.Array,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    masks: jax.Array | None = None,
    unroll: bool | str = False,
    fused: bool = False,
) -> jax.Array:
    """cfg.steps NCA steps as one lax.scan: state (B, H, W, C) -> (B, H, W, C).

    Step i draws its fire mask from fold_in(key, i), or takes masks[i] from given masks
    (steps, B, H, W, 1). `unroll=True` unrolls the scan (faster gradients on XLA CPU, longer
    compile); `unroll="python"` writes the steps out as a Python loop, no scan at all (what the
    TFLite export needs: a converted scan stores its backward buffers as constants). fused as
    in `nca_step`."""
    if (key is None) == (masks is None):
        raise TypeError("rollout needs exactly one of key= (a PRNG key) or masks= (fire masks)")
    if masks is None:
        xs, use_key = step_keys(key, cfg.steps), True
    else:
        if masks.shape[0] != cfg.steps:
            raise ValueError(f"masks has {masks.shape[0]} steps, the config says {cfg.steps}")
        xs, use_key = masks, False

    def body(s: jax.Array, x: jax.Array) -> tuple[jax.Array, None]:
        if use_key:
            return nca_step(level_params, s, cfg=cfg, key=x, fused=fused), None
        return nca_step(level_params, s, cfg=cfg, mask=x, fused=fused), None

    if unroll == "python":
        for i in range(cfg.steps):
            state, _ = body(state, xs[i])
        return state
    state, _ = jax.lax.scan(body, state, xs, unroll=cfg.steps if unroll else 1)
    return state


def rollout_history(
    level_params: Params, state: jax.Array, *, cfg: ModelConfig, key: jax.Array
) -> jax.Array:
    """rollout(key=key) keeping every step: state (B, H, W, C) -> (steps, B, H, W, C), the state
    after each step (the last one is rollout's result; same keys, same draws)."""

    def body(s: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        new = nca_step(level_params, s, cfg=cfg, key=k)
        return new, new

    return jax.lax.scan(body, state, step_keys(key, cfg.steps))[1]


# ----------------------------------------------------------------------------- two levels


class Randomness(NamedTuple):
    """Every random draw of one Med-NCA forward pass, as tensors.

    masks1: (steps, B, h, w, 1) level-1 fire masks; masks2: (steps, B, H2, W2, 1) level-2 fire
    masks (H2 = patch in training, the full size at inference); patch_yx: (B, 2) int32 top-left
    corner of each sample's level-2 patch (training only, else None)."""

    masks1: jax.Array
    masks2: jax.Array
    patch_yx: jax.Array | None = None


def downscale(image: jax.Array, factor: int) -> jax.Array:
    """Area (block-mean) downscaling: (B, H, W, 1) -> (B, H/f, W/f, 1)."""
    b, h, w, c = image.shape
    return image.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upscale(state: jax.Array, factor: int) -> jax.Array:
    """Nearest-neighbour upsampling: (B, h, w, C) -> (B, h*f, w*f, C).

    Written as two concatenations of `factor` copies (`jnp.repeat`'s values): LiteRT's XNNPACK
    delegate runs a CONCATENATION, while a repeat converts to a BROADCAST_TO that LiteRT runs
    on its single-threaded reference kernel."""
    b, h, w, c = state.shape
    rows = jnp.concatenate([state[:, :, None]] * factor, axis=2).reshape(b, h * factor, w, c)
    cols = jnp.concatenate([rows[:, :, :, None]] * factor, axis=3)
    return cols.reshape(b, h * factor, w * factor, c)


def seed_state(image: jax.Array, channels: int) -> jax.Array:
    """(B, H, W, 1) image -> (B, H, W, C) seed: channel 0 = image, the others 0 (built by
    padding, so no large constant lands in an exported graph)."""
    return jnp.pad(image, ((0, 0), (0, 0), (0, 0), (0, channels - 1)))


def crop_patches(x: jax.Array, yx: jax.Array, size: int) -> jax.Array:
    """Per-sample crop: x (B, H, W, ...) and corners yx (B, 2) -> (B, size, size, ...).

    Written as two products with one-hot row and column selectors (exact: each output is one
    input times 1 plus zeros), because the gradient of a per-sample dynamic slice becomes a
    scatter that the TFLite runtime cannot run; on XLA it costs about 1% of a training step."""
    h, w = x.shape[1], x.shape[2]
    offs = jnp.arange(size)
    rows = (jnp.arange(h)[None, None, :] == (yx[:, 0, None] + offs)[:, :, None]).astype(x.dtype)
    cols = (jnp.arange(w)[None, None, :] == (yx[:, 1, None] + offs)[:, :, None]).astype(x.dtype)
    y = jnp.einsum("bph,bhw...->bpw...", rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bqw,bpw...->bpq...", cols, y, precision=jax.lax.Precision.HIGHEST)


def draw_randomness(
    key: jax.Array, cfg: ModelConfig, batch: int, size: int, *, train: bool
) -> Randomness:
    """All draws of one forward pass from `key`, exactly as the key path draws them."""
    low = size // cfg.downscale
    size2 = cfg.patch if train else size
    k1, k2 = jax.random.fold_in(key, LEVEL_KEY), jax.random.fold_in(key, LEVEL2_KEY)
    masks1 = rollout_masks(k1, cfg, (batch, low, low))
    masks2 = rollout_masks(k2, cfg, (batch, size2, size2))
    yx = draw_patch_corners(key, cfg, batch, size) if train else None
    return Randomness(masks1, masks2, yx)


def rollout_masks(key: jax.Array, cfg: ModelConfig, shape: tuple[int, int, int]) -> jax.Array:
    """The fire masks (steps, B, H, W, 1) that rollout(key=key) draws for a (B, H, W) state."""
    return jax.vmap(lambda k: fire_mask(k, shape, cfg.fire_rate))(step_keys(key, cfg.steps))


def draw_patch_corners(key: jax.Array, cfg: ModelConfig, batch: int, size: int) -> jax.Array:
    """(B, 2) int32 uniform top-left corners of the level-2 training patches."""
    return jax.random.randint(
        jax.random.fold_in(key, PATCH_KEY), (batch, 2), 0, size - cfg.patch + 1, jnp.int32
    )


def as_nhwc(image: jax.Array) -> jax.Array:
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4 or image.shape[-1] != 1:
        raise ValueError(f"image must be (B, H, W) or (B, H, W, 1), got {image.shape}")
    return image.astype(jnp.float32)


def _level1_to_full(
    params: Params,
    image: jax.Array,
    cfg: ModelConfig,
    unroll: bool | str,
    fused: bool = False,
    **rand: Any,
) -> jax.Array:
    """Level 1 on the downscaled image, upsampled: (B, H, W, 1) -> full-res state (B, H, W, C)."""
    low = downscale(image, cfg.downscale)
    seed = seed_state(low, cfg.channels)
    s = rollout(params["level1"], seed, cfg=cfg, unroll=unroll, fused=fused, **rand)
    up = upscale(s, cfg.downscale)
    return jnp.concatenate([image, up[..., 1:]], axis=-1)


def _check_rand(key: jax.Array | None, randomness: Randomness | None) -> None:
    if (key is None) == (randomness is None):
        raise TypeError("Med-NCA needs exactly one of key= (a PRNG key) or randomness=")


def predict_state(
    params: Params,
    image: jax.Array,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    randomness: Randomness | None = None,
    unroll: bool | str = False,
) -> jax.Array:
    """Inference: image (B, H, W[, 1]) in [0, 1] -> final full-resolution state (B, H, W, C).

    Every step runs the fused CPU kernel where cfg.fused_forward resolves to it
    (`nca_jax.fused.resolve`): same values (and gradients, where one is taken)."""
    _check_rand(key, randomness)
    image = as_nhwc(image)
    fused = resolve_fused(cfg)
    if randomness is None:
        r1 = {"key": jax.random.fold_in(key, LEVEL_KEY)}
        r2 = {"key": jax.random.fold_in(key, LEVEL2_KEY)}
    else:
        r1, r2 = {"masks": randomness.masks1}, {"masks": randomness.masks2}
    state = _level1_to_full(params, image, cfg, unroll, fused, **r1)
    return rollout(params["level2"], state, cfg=cfg, unroll=unroll, fused=fused, **r2)


def predict_history(
    params: Params, image: jax.Array, *, cfg: ModelConfig, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The lung logits after every NCA step of one prediction (same draws as
    predict_logits(key=key)): image (B, H, W[, 1]) -> (level 1 (steps, B, H, W) upsampled to
    full size, level 2 (steps, B, H, W)); level2[-1] is predict_logits' result."""
    image = as_nhwc(image)
    low = downscale(image, cfg.downscale)
    k1, k2 = jax.random.fold_in(key, LEVEL_KEY), jax.random.fold_in(key, LEVEL2_KEY)
    h1 = rollout_history(params["level1"], seed_state(low, cfg.channels), cfg=cfg, key=k1)
    up = upscale(h1[-1], cfg.downscale)
    state = jnp.concatenate([image, up[..., 1:]], axis=-1)
    h2 = rollout_history(params["level2"], state, cfg=cfg, key=k2)
    f = cfg.downscale
    lung1 = jnp.repeat(jnp.repeat(h1[..., 1], f, axis=2), f, axis=3)
    return lung1, h2[..., 1]


def predict_logits(params: Params, image: jax.Array, **kw: Any) -> jax.Array:
    """Inference: image (B, H, W[, 1]) -> lung logits (B, H, W) (channel 1 of the state).
    Keyword arguments as predict_state (cfg=, and key= or randomness=); a UNet takes the
    same arguments and ignores the randomness (it is deterministic)."""
    if kw["cfg"].kind == "unet":
        _check_rand(kw.get("key"), kw.get("randomness"))
        return unet_logits(params, as_nhwc(image), kw["cfg"])
    return predict_state(params, image, **kw)[..., 1]


def train_logits(
    params: Params,
    image: jax.Array,
    mask: jax.Array,
    *,
    cfg: ModelConfig,
    key: jax.Array | None = None,
    randomness: Randomness | None = None,
    unroll: bool | str = True,
    level1: bool = False,
) -> tuple[jax.Array, ...]:
    """Training forward: level 2 runs on one random patch per sample.

    image, mask: (B, H, W) -> (patch logits (B, p, p), patch mask (B, p, p)), p = cfg.patch;
    with level1=True also level 1's lung logits upsampled to the image, (B, H, W) (the same
    draws: level 1 runs once). A UNet (kind "unet") trains on the whole image: (logits
    (B, H, W), mask)."""
    _check_rand(key, randomness)
    image = as_nhwc(image)
    if cfg.kind == "unet":
        if level1:
            raise ValueError("a UNet has no level 1")
        return unet_logits(params, image, cfg), mask
    if randomness is None:
        yx = draw_patch_corners(key, cfg, image.shape[0], image.shape[1])
        r1 = {"key": jax.random.fold_in(key, LEVEL_KEY)}
        r2 = {"key": jax.random.fold_in(key, LEVEL2_KEY)}
    else:
        yx = randomness.patch_yx
        r1, r2 = {"masks": randomness.masks1}, {"masks": randomness.masks2}
    fused = resolve_fused(cfg, train=True)
    state = _level1_to_full(params, image, cfg, unroll, fused, **r1)
    state_p = crop_patches(state, yx, cfg.patch)
    mask_p = crop_patches(mask, yx, cfg.patch)
    out = rollout(params["level2"], state_p, cfg=cfg, unroll=unroll, fused=fused, **r2)
    if level1:
        return out[..., 1], mask_p, state[..., 1]
    return out[..., 1], mask_p


def sample_keys(key: jax.Array, n: int) -> jax.Array:
    """The n sample keys fold_in(key, i), i < n: (n,) keys."""
    return step_keys(key, n)
