"""Convolutions written as matmuls, for LiteRT's XNNPACK delegate.

A trainable .tflite file holds its weights as variables. LiteRT's XNNPACK delegate runs a
BATCH_MATMUL with variable operands, but leaves a CONV_2D with a variable filter, a
FULLY_CONNECTED with computed weights, and the GREATER / SELECT of a ReLU's gradient to
LiteRT's own, mostly single-threaded kernels. These functions compute the same values with ops
the delegate takes, and their gradients too (`mlp.matmul` multiplies by transposed weights
through `mlp.transposed`). Med-NCA's perception and the UNet baselines use them where
`model.perceive` is "im2col".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import mlp


def conv3x3_columns(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *, pad_mode: str
) -> jax.Array:
    """A 3x3 convolution, stride 1, 'same' size: x (B, H, W, Cin), kernel (3, 3, Cin, Cout),
    bias (Cout,) or None (no bias: no pass to add it) -> (B, H, W, Cout). pad_mode: "reflect"
    (Med-NCA) or "constant" (zeros, the UNet's).

    The padded input's three column shifts side by side, s (B, H+2, W, 3 Cin), times the
    kernel's three rows side by side, (3 Cin, 3 Cout): block i of the product, taken i rows
    down, is kernel row i's share of the convolution, and the three shares add up to it. The
    columns are a third of a full im2col's, and the one concatenation has three inputs (the
    delegate takes at most five)."""
    b, h, w, cin = x.shape
    cout = kernel.shape[-1]
    if kernel.shape != (3, 3, cin, cout):
        raise ValueError(f"kernel must be (3, 3, {cin}, Cout), got {kernel.shape}")
    kcat = jnp.concatenate([kernel[i].reshape(3 * cin, cout) for i in range(3)], axis=-1)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=pad_mode)
    s = jnp.concatenate([padded[:, :, j : j + w, :] for j in range(3)], axis=-1)
    z = mlp.matmul(s.reshape(b * (h + 2) * w, 3 * cin), kcat).reshape(b, h + 2, w, 3 * cout)
    out = row_blocks_sum(z)
    return out if bias is None else out + bias


def _row_blocks_sum_ref(z: jax.Array) -> jax.Array:
    """z (B, H+2, W, 3 C) -> (B, H, W, C): block i of the channels, taken i rows down, summed."""
    h, c = z.shape[1] - 2, z.shape[-1] // 3
    return sum(z[:, i : i + h, :, c * i : c * (i + 1)] for i in range(3))


@jax.custom_vjp
def row_blocks_sum(z: jax.Array) -> jax.Array:
    """`_row_blocks_sum_ref`'s function as one depthwise convolution with a constant kernel:
    z (B, H+2, W, 3 C) read as (B, H+2, 3 W, C) (channel block i of column w is column 3 w + i),
    a 3 x 3 window at stride (1, 3) whose diagonal is 1 (row i of the window, column 3 w + i).
    Same values (the window adds the three blocks in the same order). In LiteRT it is one
    delegated DEPTHWISE_CONV_2D that reads z once, where three slices and two additions wrote
    and read five arrays of the output's size. (A 3-tap window with dilation 3 W + 1 over the
    flattened rows computes the same with a third of the products, but ran slower in LiteRT.)
    The backward is the slices' own: each block of the gradient is g padded i rows down, the
    three side by side."""
    b, hp, w, c3 = z.shape
    c = c3 // 3
    # a numpy constant, so that the exported file holds it as one (the delegate takes a
    # depthwise convolution only with a constant filter)
    kernel = np.zeros((3, 3, 1, c), np.float32)
    kernel[[0, 1, 2], [0, 1, 2]] = 1.0
    return jax.lax.conv_general_dilated(
        z.reshape(b, hp, 3 * w, c),
        jnp.asarray(kernel, z.dtype),
        (1, 3),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


def _row_blocks_sum_fwd(z: jax.Array) -> tuple[jax.Array, None]:
    return row_blocks_sum(z), None


def _row_blocks_sum_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    pads = [((0, 0), (i, 2 - i), (0, 0), (0, 0)) for i in range(3)]
    return (jnp.concatenate([jnp.pad(g, p) for p in pads], axis=-1),)


row_blocks_sum.defvjp(_row_blocks_sum_fwd, _row_blocks_sum_bwd)


def conv1x1(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """A 1x1 convolution as one matmul: x (B, H, W, Cin), kernel (1, 1, Cin, Cout) ->
    (B, H, W, Cout)."""
    b, h, w, cin = x.shape
    cout = kernel.shape[-1]
    y = mlp.matmul(x.reshape(b * h * w, cin), kernel.reshape(cin, cout))
    return y.reshape(b, h, w, cout) + bias


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0), whose gradient masks with ceil(min(relu(x), 1)): exactly x > 0, in ops the
    delegate runs (CEIL, MINIMUM, MUL) where autodiff's GREATER and SELECT are not."""
    return jnp.maximum(x, 0.0)


def _relu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    r = jnp.maximum(x, 0.0)
    return r, r


def _relu_bwd(r: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (g * jnp.ceil(jnp.minimum(r, 1.0)),)


relu.defvjp(_relu_fwd, _relu_bwd)
