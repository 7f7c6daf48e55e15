"""The UNet baselines (issue 16): the paper's parameter count exactly, the small one, shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax.unet import PAPER_UNET, SMALL_UNET, UNet, UNetConfig, count_unet_params


def test_the_papers_unet_has_the_papers_parameter_count():
    assert count_unet_params(PAPER_UNET) == 36_950_273  # Table 1 of the paper


def test_small_unet_is_about_med_ncas_size():
    assert count_unet_params(SMALL_UNET) == 26_664
    assert count_unet_params(UNetConfig(2, 16)) == 29_761  # one pooling level, 16 channels


def test_small_unet_maps_an_image_to_logits_of_its_size():
    model = UNet(SMALL_UNET)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    params = model.init(jax.random.key(1), x)
    y = model.apply(params, x)
    assert y.shape == (2, 32, 32) and bool(jnp.all(jnp.isfinite(y)))
    # deterministic: the same input gives the same logits; another image other logits
    np.testing.assert_array_equal(model.apply(params, x), y)
    assert float(jnp.abs(model.apply(params, x[::-1]) - y[::-1]).max()) < 1e-5
    assert float(jnp.abs(y[0] - y[1]).max()) > 1e-4
