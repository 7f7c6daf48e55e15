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

from nca_jax import mlp


def conv3x3_columns(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, *, pad_mode: str
) -> jax.Array:
    """A 3x3 convolution, stride 1, 'same' size: x (B, H, W, Cin), kernel (3, 3, Cin, Cout),
    bias (Cout,) -> (B, H, W, Cout). pad_mode: "reflect" (Med-NCA) or "constant" (zeros, the
    UNet's).

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
    r0, r1, r2 = (z[:, i : i + h, :, cout * i : cout * (i + 1)] for i in range(3))
    return r0 + r1 + r2 + bias


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
