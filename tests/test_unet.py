"""The UNet baselines (issue 16): the paper's parameter count exactly, the small one, shapes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nca_jax.unet import PAPER_UNET, SMALL_UNET, UNet, UNetConfig, count_unet_params


def test_the_papers_unet_has_the_papers_parameter_count():
    assert count_unet_params(PAPER_UNET) == 36_950_273  # Table 1 of the paper


def test_small_unet_is_about_med_ncas_size():
    assert count_unet_params(SMALL_UNET) == 26_664
    assert count_unet_params(UNetConfig(2, 16)) == 29_761  # one pooling level, 16 channels


@pytest.mark.slow  # compiles the UNet twice
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


def _unet_cfg(**train):
    from nca_jax.config import ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(kind="unet", unet_blocks=2, unet_channels=4),
        train=TrainConfig(
            **{"epochs": 3, "batch_size": 4, "image_size": 32, "lr": 3e-3, "eval_every": 1, **train}
        ),
    ).validate()


def test_config_selects_the_unet_and_checks_its_fields():
    import pytest

    from nca_jax.config import ConfigError, ModelConfig, RunConfig, TrainConfig
    from nca_jax.model import count_params, init_params

    cfg = _unet_cfg()
    params = init_params(cfg.model, key=jax.random.key(0))
    assert count_params(params) == count_unet_params(UNetConfig(2, 4))
    with pytest.raises(ConfigError, match="model.kind must be one of"):
        ModelConfig(kind="transunet").validate()
    with pytest.raises(ConfigError, match="divisible by 16"):
        RunConfig(model=ModelConfig(kind="unet"), train=TrainConfig(image_size=40)).validate()


@pytest.mark.slow  # three training runs and an evaluation
def test_unet_trains_resumes_bit_identically_and_evaluates_deterministically(tmp_path):
    """train.py's path for a UNet config: the loss falls, a cut run resumed equals the
    uninterrupted one, and evaluation predicts once with no quality score and no std maps."""
    from nca_jax import checkpoint as ckpt
    from nca_jax.evaluate import evaluate
    from nca_jax.phantoms import make_phantom_dataset
    from nca_jax.training import train_and_evaluate

    cfg = _unet_cfg()
    data = make_phantom_dataset(8, seed=1, size=32)
    full = train_and_evaluate(cfg, data, tmp_path / "full", val=data, progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").open()]
    assert losses[-1] < losses[0]
    train_and_evaluate(cfg, data, tmp_path / "cut", val=data, progress=False, stop_after_epochs=1)
    train_and_evaluate(cfg, data, tmp_path / "cut", val=data, progress=False, resume=True)
    a = ckpt.flatten_params(ckpt.load_run(tmp_path / "full")[1])
    b = ckpt.flatten_params(ckpt.load_run(tmp_path / "cut")[1])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert full["finished"]
    _, params = ckpt.load_run(tmp_path / "full")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    s = evaluate(cfg, params, data, samples=10, png_dir=pngs)
    assert s["samples"] == 1 and s["deterministic"] and s["quality_mean"] is None
    assert all(c["quality"] is None for c in s["cases"]) and 0.0 <= s["dice_mean"] <= 1.0
    assert not list(pngs.glob("*_std.png")) and list(pngs.glob("*_pred.png"))


def test_upsample_is_flaxs_transposed_convolution_with_the_kernel_flipped():
    import flax.linen as nn

    from nca_jax.unet import Upsample2x

    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
    up = Upsample2x(6)
    p = up.init(jax.random.key(1), x)
    ref = nn.ConvTranspose(6, (2, 2), strides=(2, 2), padding="VALID")
    flipped = {"params": {"kernel": p["params"]["kernel"][::-1, ::-1], "bias": p["params"]["bias"]}}
    np.testing.assert_allclose(up.apply(p, x), ref.apply(flipped, x), atol=1e-5)


def test_unet_as_matmuls_is_the_same_model_in_parameters_values_and_gradients():
    """model.perceive "im2col" (a trainable TFLite file's UNet: convolutions, upsampling and
    head as matmuls, nca_jax.conv) has the same parameter tree and initial values, the same
    logits and the same gradients as the convolutions."""
    import dataclasses

    x = jax.random.uniform(jax.random.key(3), (2, 8, 12, 1))
    target = (jax.random.uniform(jax.random.key(4), (2, 8, 12)) > 0.5).astype(jnp.float32)
    cfg = UNetConfig(2, 3)
    ref, mat = UNet(cfg), UNet(dataclasses.replace(cfg, im2col=True))
    p_ref, p_mat = ref.init(jax.random.key(5), x), mat.init(jax.random.key(5), x)
    assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_mat)
    leaves = jax.tree_util.tree_leaves
    for a, b in zip(leaves(p_ref), leaves(p_mat), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(mat.apply(p_ref, x), ref.apply(p_ref, x), rtol=1e-5, atol=1e-5)

    def loss(model):
        return lambda p: jnp.mean(jnp.square(jax.nn.sigmoid(model.apply(p, x)) - target))

    g_ref, g_mat = jax.grad(loss(ref))(p_ref), jax.grad(loss(mat))(p_ref)
    for a, b in zip(leaves(g_ref), leaves(g_mat), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(a).max()) > 1e-4 for a in leaves(g_ref))


def test_max_pool2_is_flaxs_max_pool():
    import flax.linen as nn

    from nca_jax.unet import max_pool2

    x = jax.random.normal(jax.random.key(2), (2, 8, 6, 3))
    np.testing.assert_array_equal(max_pool2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_evaluate_animate_refuses_a_unet_in_one_line(tmp_path, capsys):
    from nca_jax import checkpoint as ckpt
    from nca_jax import evaluate
    from nca_jax.cli import call_main
    from nca_jax.config import save_config
    from nca_jax.model import init_params

    cfg = _unet_cfg()
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.json")
    ckpt.save_weights(init_params(cfg.model, key=jax.random.key(0)), run / "weights.npz")
    out = tmp_path / "eval"
    code = call_main(evaluate.main, ["--run", str(run), "--out", str(out), "--animate"])
    assert code == 2 and "a unet has none" in capsys.readouterr().err
    assert not out.exists()
