"""nca_jax.conv: convolutions as matmuls are the convolutions, in value and gradient."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nca_jax import conv


def _lax_conv(x, kernel, bias, pad_mode):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=pad_mode)
    y = jax.lax.conv_general_dilated(
        padded, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_conv3x3_columns_is_the_convolution_in_value_and_gradient(pad_mode):
    kx, kk, kb, kg = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (2, 5, 7, 3))  # not square: rows and columns not mixed up
    kernel = jax.random.normal(kk, (3, 3, 3, 4))
    bias = jax.random.normal(kb, (4,))
    g = jax.random.normal(kg, (2, 5, 7, 4))
    got = conv.conv3x3_columns(x, kernel, bias, pad_mode=pad_mode)
    want = _lax_conv(x, kernel, bias, pad_mode)
    assert got.shape == (2, 5, 7, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda x, k, b: jnp.sum(f(x, k, b, pad_mode) * g)

    ours = jax.grad(loss(lambda x, k, b, m: conv.conv3x3_columns(x, k, b, pad_mode=m)), (0, 1, 2))
    ref = jax.grad(loss(_lax_conv), (0, 1, 2))
    for a, b in zip(ours(x, kernel, bias), ref(x, kernel, bias), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv3x3_columns_without_a_bias_is_the_convolution_with_zero_bias():
    x = jax.random.normal(jax.random.key(3), (1, 4, 6, 2))
    kernel = jax.random.normal(jax.random.key(4), (3, 3, 2, 3))
    got = conv.conv3x3_columns(x, kernel, None, pad_mode="reflect")
    np.testing.assert_allclose(got, _lax_conv(x, kernel, 0.0, "reflect"), rtol=1e-5, atol=1e-5)


def test_row_blocks_sum_equals_the_three_slices_in_value_and_gradient_exactly():
    # the depthwise convolution adds the same three numbers per output as the slices do
    z = jax.random.normal(jax.random.key(5), (2, 7, 5, 12))  # B, H+2, W, 3C with C = 4
    g = jax.random.normal(jax.random.key(6), (2, 5, 5, 4))
    got = conv.row_blocks_sum(z)
    want = z[:, 0:5, :, 0:4] + z[:, 1:6, :, 4:8] + z[:, 2:7, :, 8:12]
    assert got.shape == (2, 5, 5, 4)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        jax.vjp(conv.row_blocks_sum, z)[1](g)[0], jax.vjp(conv._row_blocks_sum_ref, z)[1](g)[0]
    )


def test_conv3x3_columns_on_a_tiny_input_by_hand():
    """One channel, a 1 x 2 image, zero padding: each output is its 3x3 window times the
    kernel, written out."""
    x = jnp.array([1.0, 2.0]).reshape(1, 1, 2, 1)
    kernel = jnp.arange(9.0).reshape(3, 3, 1, 1)  # k[i, j] = 3 i + j
    y = conv.conv3x3_columns(x, kernel, jnp.array([0.5]), pad_mode="constant")
    # output (0, 0): x[0, 0] at k[1, 1] = 4, x[0, 1] at k[1, 2] = 5; output (0, 1): x[0, 0]
    # at k[1, 0] = 3, x[0, 1] at k[1, 1] = 4
    np.testing.assert_allclose(y.ravel(), [1 * 4 + 2 * 5 + 0.5, 1 * 3 + 2 * 4 + 0.5])


def test_conv3x3_columns_names_a_wrong_kernel():
    with pytest.raises(ValueError, match=r"kernel must be \(3, 3, 2, Cout\)"):
        conv.conv3x3_columns(
            jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 3, 1)), jnp.zeros(1), pad_mode="constant"
        )


def test_conv1x1_is_the_convolution():
    kx, kk, kb = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (2, 3, 4, 5))
    kernel = jax.random.normal(kk, (1, 1, 5, 2))
    bias = jax.random.normal(kb, (2,))
    np.testing.assert_allclose(
        conv.conv1x1(x, kernel, bias),
        jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0]) + bias,
        rtol=1e-5,
        atol=1e-5,
    )


def test_relu_and_its_gradient_are_nn_relus_including_at_zero():
    x = jnp.array([-2.0, -1e-30, 0.0, 1e-30, 0.5, 3.0])
    np.testing.assert_array_equal(conv.relu(x), nn.relu(x))
    np.testing.assert_array_equal(
        jax.grad(lambda v: jnp.sum(conv.relu(v) * 2.0))(x),
        jax.grad(lambda v: jnp.sum(nn.relu(v) * 2.0))(x),
    )
    assert jax.grad(lambda v: jnp.sum(conv.relu(v)))(x).tolist() == [0, 0, 0, 1, 1, 1]
