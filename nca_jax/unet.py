"""The UNet baselines of issue 16 (Table 1), in Flax: the paper's UNet and a small one.

The paper's UNet (36,950,273 parameters) is fepegar/unet's ``UNet2D(in_channels=1, padding=1,
out_classes=1)`` as the authors build it (MECLabTUDA/M3D-NCA, branch unsupervised_training,
src/utils/BaselineConfigs.py, EXP_UNet2D), every other argument at its default: 5 encoding
blocks (4 pooling levels and a bottom block), 64 channels in the first layer doubling per level,
two 3x3 convolutions with bias and ReLU per block, no normalisation, 2x2 max pooling, 2x2
stride-2 transposed convolutions that keep the channel count (Upsample2x), skip features
concatenated first, a 1x1 convolution head giving logits. ``small`` (3 encoding blocks, 7
first-layer channels) is the same family with 26,664 parameters, about Med-NCA's 26,432.

Selected by the config, ``"model": {"kind": "unet", "unet_blocks": 5, "unet_channels": 64}``;
model.init_params / predict_logits / train_logits dispatch here. The UNet is deterministic: the
random draws Med-NCA takes are accepted and ignored.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from nca_jax import conv, mlp
from nca_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """num_encoding_blocks: pooling levels + 1 (the bottom block); first_channels: channels of
    the first level (doubled at every level below)."""

    num_encoding_blocks: int = 5
    first_channels: int = 64
    # the convolutions and the upsampling as matmuls (`nca_jax.conv`: same parameters and
    # values), for a trainable TFLite file whose ops LiteRT's XNNPACK delegate runs
    im2col: bool = False


PAPER_UNET = UNetConfig(5, 64)  # 36,950,273 parameters
SMALL_UNET = UNetConfig(3, 7)  # 26,664 parameters


def _torch_like_bias(fan_in: int):
    """PyTorch's default bias init, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# PyTorch's default kernel init (kaiming_uniform with a = sqrt(5)) is U(+-1/sqrt(fan_in))
_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Conv(nn.Module):
    """nn.Conv's parameters (kernel (k, k, Cin, features), bias) and function, 'same' size
    with zero padding, for k = 3 or 1, computed as matmuls (`nca_jax.conv`)."""

    features: int
    size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin, k = x.shape[-1], self.size
        kernel = self.param("kernel", _KERNEL, (k, k, cin, self.features))
        bias = self.param("bias", _torch_like_bias(k * k * cin), (self.features,))
        if k == 1:
            return conv.conv1x1(x, kernel, bias)
        return conv.conv3x3_columns(x, kernel, bias, pad_mode="constant")


class DoubleConv(nn.Module):
    """Two 3x3 convolutions with bias, each followed by ReLU."""

    features: int
    im2col: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(2):
            if self.im2col:
                x = conv.relu(Conv(self.features, 3, name=f"conv{i}")(x))
                continue
            fan_in = 9 * x.shape[-1]
            x = nn.Conv(
                self.features,
                (3, 3),
                padding="SAME",
                kernel_init=_KERNEL,
                bias_init=_torch_like_bias(fan_in),
                name=f"conv{i}",
            )(x)
            x = nn.relu(x)
        return x


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2, (B, H, W, C) -> (B, H/2, W/2, C), as a reshape and a max:
    the same values as nn.max_pool, and a gradient TFLite can run (max_pool's gradient is a
    select-and-scatter, which it cannot)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Upsample2x(nn.Module):
    """A 2x2, stride-2 transposed convolution with bias, (B, H, W, C) -> (B, 2H, 2W, features),
    written as one matmul per pixel: out[2i + u, 2j + v] = x[i, j] @ kernel[u, v] + bias. Same
    parameters and function as flax's ConvTranspose with the kernel flipped (tested), but its
    gradient is a matmul, which TFLite runs (the transposed convolution's gradient does not
    legalise to builtin ops)."""

    features: int
    im2col: bool = False  # the matmul through mlp.matmul (a delegated gradient in TFLite)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", _KERNEL, (2, 2, c, self.features))
        bias = self.param("bias", _torch_like_bias(4 * self.features), (self.features,))
        b, h, w, _ = x.shape
        if self.im2col:
            k = kernel.transpose(2, 0, 1, 3).reshape(c, 4 * self.features)  # (c, u v o)
            y = mlp.matmul(x.reshape(b * h * w, c), k).reshape(b, h, w, 2, 2, self.features)
            y = y.transpose(0, 1, 3, 2, 4, 5)  # (b, i, u, j, v, o)
        else:
            y = jnp.einsum("bijc,uvco->biujvo", x, kernel)
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias


class UNet(nn.Module):
    """(B, H, W, 1) image -> (B, H, W) lung logits; H and W divisible by
    2 ** (num_encoding_blocks - 1)."""

    cfg: UNetConfig = PAPER_UNET

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        depth = self.cfg.num_encoding_blocks - 1
        f = self.cfg.first_channels
        skips = []
        m = self.cfg.im2col
        for level in range(depth):
            x = DoubleConv(f * 2**level, m, name=f"down{level}")(x)
            skips.append(x)
            x = max_pool2(x)
        x = DoubleConv(f * 2**depth, m, name="bottom")(x)
        for level in reversed(range(depth)):
            c = x.shape[-1]
            x = Upsample2x(c, m, name=f"upsample{level}")(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = DoubleConv(f * 2**level, m, name=f"up{level}")(x)
        if m:
            out = Conv(1, 1, name="head")(x)
        else:
            out = nn.Conv(
                1, (1, 1), kernel_init=_KERNEL, bias_init=_torch_like_bias(f), name="head"
            )(x)
        return out[..., 0]


def count_unet_params(cfg: UNetConfig, size: int = 256) -> int:
    """Parameter count of UNet(cfg), from shapes only (nothing is allocated)."""
    shapes = jax.eval_shape(
        lambda: UNet(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 1), jnp.float32))
    )
    return sum(int(jnp.prod(jnp.array(x.shape))) for x in jax.tree_util.tree_leaves(shapes))


def unet_config(mc: ModelConfig) -> UNetConfig:
    """The UNet of a model config; model.perceive "im2col" computes it as matmuls."""
    return UNetConfig(mc.unet_blocks, mc.unet_channels, mc.perceive == "im2col")


def init_unet(mc: ModelConfig, key: jax.Array) -> dict:
    """Fresh UNet parameters for the model config (the spatial size does not matter)."""
    side = 2 ** (mc.unet_blocks - 1)
    x = jnp.zeros((1, side, side, 1), jnp.float32)
    return UNet(unet_config(mc)).init(key, x)["params"]


def unet_logits(params: dict, image: jax.Array, mc: ModelConfig) -> jax.Array:
    """image (B, H, W, 1) -> lung logits (B, H, W)."""
    return UNet(unet_config(mc)).apply({"params": params}, image)
