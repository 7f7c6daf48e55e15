"""The fused CPU kernels of one NCA step and its backward (nca_jax/fused.py, csrc/nca_step.cc)
against the XLA step and gradient they replace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nca_jax import fused, model
from nca_jax.config import ConfigError, ModelConfig
from nca_jax.predict import ALL, make_predict

USABLE, WHY = fused.kernel_status()
needs_kernel = pytest.mark.skipif(not USABLE, reason=f"fused kernel not usable here: {WHY}")


def _params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Fresh parameters with random dense_out (an untrained automaton is the identity) and
    non-trivial norm scale / shift and biases (which the kernel must cancel)."""
    p = model.init_params(cfg, key=jax.random.key(seed))
    ks = iter(jax.random.split(jax.random.key(seed + 100), 16))
    for lv in ("level1", "level2"):
        q = p[lv]
        shape = q["dense_out"]["kernel"].shape
        q["dense_out"]["kernel"] = 0.05 * jax.random.normal(next(ks), shape)
        q["dense_in"]["bias"] = jax.random.normal(next(ks), (cfg.hidden,))
        q["norm"]["scale"] = 1 + 0.3 * jax.random.normal(next(ks), (cfg.hidden,))
        q["norm"]["bias"] = 0.3 * jax.random.normal(next(ks), (cfg.hidden,))
        for c in ("conv0", "conv1"):
            q["perceive"][c]["bias"] = jax.random.normal(next(ks), (cfg.channels,))
    return p


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 16, 16), (2, 7, 13), (1, 2, 29)])
def test_step_equals_xla_step(shape):
    """Every width's tile remainders (12 + 1, 24 + 4 + 1), odd heights, two images sharing
    statistics, random fire mask, a state off 0: the new state to float rounding."""
    cfg = ModelConfig()
    p = _params(cfg)["level2"]
    k1, k2 = jax.random.split(jax.random.key(1))
    state = 3.0 + jax.random.normal(k1, (*shape, cfg.channels))
    mask = model.fire_mask(k2, shape, 0.5)
    ref = model.nca_step(p, state, cfg=dataclasses.replace(cfg, fused_forward=0), mask=mask)
    got = jax.jit(lambda s, m: model.nca_step(p, s, cfg=cfg, mask=m, fused=True))(state, mask)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[..., 0], state[..., 0])  # the image is kept exactly
    unfired = np.asarray(mask[..., 0]) == 0
    np.testing.assert_array_equal(np.asarray(got)[unfired], np.asarray(state)[unfired])


@needs_kernel
def test_prediction_equals_xla_and_same_key_same_output():
    cfg = ModelConfig(steps=6)
    off = dataclasses.replace(cfg, fused_forward=0)
    p = _params(cfg)
    img = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32)), jnp.float32)
    assert fused.resolve(cfg) and not fused.resolve(off)
    a = jax.jit(lambda k: model.predict_logits(p, img, cfg=cfg, key=k))
    ref = model.predict_logits(p, img, cfg=off, key=jax.random.key(3))
    got = a(jax.random.key(3))
    assert float(jnp.std(ref)) > 0.1  # the steps do work
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_array_equal(got, a(jax.random.key(3)))
    assert float(jnp.max(jnp.abs(got - a(jax.random.key(4))))) > 1e-2


@needs_kernel
def test_vmapped_samples_equal_a_loop_each_with_its_own_statistics():
    """make_predict with all samples side by side (a vmap: the kernel's groups, the seed state
    broadcast) against one sample at a time, and against XLA."""
    cfg = ModelConfig(steps=5)
    p = _params(cfg, 1)
    img = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 32, 32)), jnp.float32)
    key, index = jax.random.key(9), jnp.arange(2)
    together = make_predict(cfg, 3, ALL)(p, img, key, index)
    alone = make_predict(cfg, 3, 1)(p, img, key, index)
    xla = make_predict(dataclasses.replace(cfg, fused_forward=0), 3, ALL)(p, img, key, index)
    assert together.shape == (3, 2, 32, 32)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together, xla, atol=1e-4)


def _assert_trees_close(got, ref, rtol: float = 2e-5) -> None:
    """Every leaf of got within rtol of the largest magnitude of ref's leaf (gradients with
    exact zeros in places, which a plain rtol cannot take)."""
    for (path, r), g in zip(
        jax.tree_util.tree_leaves_with_path(ref), jax.tree_util.tree_leaves(got), strict=True
    ):
        r, g = np.asarray(r), np.asarray(g)
        assert r.shape == g.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            g, r, atol=rtol * max(float(np.abs(r).max()), 1e-6), err_msg=jax.tree_util.keystr(path)
        )


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 16, 16), (2, 7, 13), (1, 2, 29), (2, 3, 5)])
def test_step_gradient_equals_xla(shape):
    """The backward kernel against the XLA step's (hand-written) gradient, every weight and
    the state: tile remainders, two images sharing statistics, the reflection's borders (3
    and 2 rows: the folded-back cells meet), a state off 0. The conv and dense_in biases get
    exactly 0 in both (the norm cancels them)."""
    cfg = ModelConfig()
    off = dataclasses.replace(cfg, fused_forward=0)
    p = _params(cfg)["level2"]
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    state = 3.0 + jax.random.normal(k1, (*shape, cfg.channels))
    mask = model.fire_mask(k2, shape, 0.5)
    w = jax.random.normal(k3, (*shape, cfg.channels))

    def loss(q, s, use):
        return jnp.sum(jnp.sin(model.nca_step(q, s, cfg=off, mask=mask, fused=use)) * w)

    ref = jax.grad(loss, (0, 1))(p, state, False)
    got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(p, state, True)
    _assert_trees_close(got, ref)
    assert float(jnp.abs(got[0]["perceive"]["conv0"]["kernel"]).max()) > 0.1  # it does flow
    assert float(jnp.abs(got[0]["perceive"]["conv0"]["bias"]).max()) == 0.0


@needs_kernel
def test_training_gradient_equals_xla_and_fused_train_resolves():
    """A whole training loss (both levels, patch crop, dice + BCE) through model.train_logits
    with fused_train 1 against 0: the gradient of every parameter to float rounding."""
    from nca_jax.losses import segmentation_loss

    cfg = ModelConfig(steps=5, patch=8, fused_train=1)
    off = dataclasses.replace(cfg, fused_train=0)
    assert fused.resolve(cfg, train=True) and not fused.resolve(off, train=True)
    assert not fused.resolve(dataclasses.replace(cfg, fused_train=-1, fast_backward=False), True)
    p = _params(cfg, 2)
    rng = np.random.default_rng(2)
    img = jnp.asarray(rng.uniform(size=(2, 32, 32)), jnp.float32)
    lab = jnp.asarray(rng.uniform(size=(2, 32, 32)) > 0.5, jnp.float32)

    def loss(q, c):
        out, m = model.train_logits(q, img, lab, cfg=c, key=jax.random.key(5))
        return segmentation_loss(out, m, kind="dice_bce")

    ref = jax.grad(loss)(p, off)
    got = jax.jit(jax.grad(loss), static_argnums=1)(p, cfg)
    _assert_trees_close(got, ref, rtol=1e-4)
    assert float(jnp.abs(got["level1"]["dense_in"]["kernel"]).max()) > 0  # level 1 learns too


@needs_kernel
def test_vmapped_gradient_equals_a_loop():
    """vmap of the step's gradient over states (the backward's groups, one gradient each)
    against one state at a time."""
    cfg = ModelConfig()
    p = _params(cfg)["level1"]
    states = 1.0 + jax.random.normal(jax.random.key(3), (3, 1, 6, 9, cfg.channels))
    mask = model.fire_mask(jax.random.key(4), (1, 6, 9), 0.5)

    def loss(q, s):
        return jnp.sum(model.nca_step(q, s, cfg=cfg, mask=mask, fused=True) ** 2)

    together = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), in_axes=(None, 0)))(p, states)
    for n in range(3):
        alone = jax.grad(loss, (0, 1))(p, states[n])
        _assert_trees_close(jax.tree_util.tree_map(lambda x, n=n: x[n], together), alone, 1e-6)


@needs_kernel
def test_prediction_gradient_equals_xla():
    cfg = ModelConfig(steps=2)
    p = _params(cfg)
    img = jnp.asarray(np.random.default_rng(3).uniform(size=(1, 16, 16)), jnp.float32)

    def loss(q, c):
        return model.predict_logits(q, img, cfg=c, key=jax.random.key(0)).sum()

    off = dataclasses.replace(cfg, fused_forward=0)
    _assert_trees_close(jax.grad(loss)(p, cfg), jax.grad(loss)(p, off), rtol=1e-4)


def test_resolve_auto_off_for_other_sizes_and_forced_on_errors():
    small = ModelConfig(channels=8, hidden=16)
    assert fused.supported(small) is not None
    assert not fused.resolve(small)  # auto: XLA's steps
    assert not fused.resolve(dataclasses.replace(small, fused_forward=0))
    with pytest.raises(ConfigError, match="fused_forward is 1 but.*channels 16 and hidden 128"):
        fused.resolve(dataclasses.replace(small, fused_forward=1))
    with pytest.raises(ConfigError, match="fused_train is 1 but.*channels 16 and hidden 128"):
        fused.resolve(dataclasses.replace(small, fused_train=1), train=True)
    with pytest.raises(ConfigError, match="fused_forward must be"):
        ModelConfig(fused_forward=2).validate()
    with pytest.raises(ConfigError, match="fused_train must be"):
        ModelConfig(fused_train=2).validate()


def test_build_reports_a_missing_or_failing_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(ConfigError, match="no C\\+\\+ compiler 'no-such-compiler-xyz'"):
        fused.build(tmp_path)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(ConfigError, match="could not compile"):
        fused.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
