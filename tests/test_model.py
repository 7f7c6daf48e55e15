import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised_params

from nca_jax import mlp
from nca_jax import model as m
from nca_jax.config import ConfigError, ModelConfig


def test_parameter_count_is_the_papers():
    params = m.init_params(ModelConfig(), key=jax.random.key(0))
    assert m.count_params(params) == 26_432
    assert m.count_params(params["level1"]) == 13_216


def test_untrained_automaton_is_identity_on_hidden_channels():
    cfg = ModelConfig(channels=4, hidden=8, steps=3)
    params = m.init_params(cfg, key=jax.random.key(0))
    img = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
    s0 = m.seed_state(img, 4)
    s = m.rollout(params["level1"], s0, cfg=cfg, key=jax.random.key(2))
    np.testing.assert_array_equal(s, s0)


def _reflect_conv3x3(x, kernel, bias):
    """Reference: x (H, W, Ci), kernel (3, 3, Ci, Co) -> (H, W, Co) with reflect padding."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="reflect")
    h, w, _ = x.shape
    out = np.zeros((h, w, kernel.shape[-1]))
    for i in range(h):
        for j in range(w):
            out[i, j] = np.einsum("abc,abcd->d", xp[i : i + 3, j : j + 3], kernel) + bias
    return out


def test_one_step_exact_values_with_hand_set_weights():
    cfg = ModelConfig(channels=2, hidden=3, steps=1, bn_eps=1e-5)
    rng = np.random.default_rng(0)
    p = {
        "perceive": {
            "conv0": {"kernel": rng.normal(size=(3, 3, 2, 2)), "bias": np.array([0.1, -0.2])},
            "conv1": {"kernel": rng.normal(size=(3, 3, 2, 2)), "bias": np.array([0.0, 0.3])},
        },
        "dense_in": {"kernel": rng.normal(size=(6, 3)), "bias": np.array([0.5, -0.5, 0.0])},
        "norm": {"scale": np.array([1.0, 2.0, 0.5]), "bias": np.array([0.0, 0.1, -0.1])},
        "dense_out": {"kernel": rng.normal(size=(3, 2))},
    }
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    image = rng.uniform(size=(1, 3, 4, 1)).astype(np.float32)
    state = np.concatenate([image, rng.normal(size=(1, 3, 4, 1))], -1).astype(np.float32)
    mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 0]], np.float32)[None, :, :, None]

    got = m.nca_step(p, jnp.asarray(state), cfg=cfg, mask=jnp.asarray(mask))

    # numpy reference, written from the definition
    pn = jax.tree_util.tree_map(np.asarray, p)
    x = state[0].astype(np.float64)
    c0 = _reflect_conv3x3(x, pn["perceive"]["conv0"]["kernel"], pn["perceive"]["conv0"]["bias"])
    c1 = _reflect_conv3x3(x, pn["perceive"]["conv1"]["kernel"], pn["perceive"]["conv1"]["bias"])
    feats = np.concatenate([x, c0, c1], -1)
    h = feats @ pn["dense_in"]["kernel"] + pn["dense_in"]["bias"]
    mu, var = h.reshape(-1, 3).mean(0), h.reshape(-1, 3).var(0)
    h = (h - mu) / np.sqrt(var + 1e-5) * pn["norm"]["scale"] + pn["norm"]["bias"]
    delta = np.maximum(h, 0) @ pn["dense_out"]["kernel"]
    want = x + delta * mask[0]
    want[..., 0] = image[0, ..., 0]
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-5, atol=1e-5)


def test_key_is_required():
    cfg = ModelConfig(channels=4, hidden=8, steps=2)
    params = m.init_params(cfg, key=jax.random.key(0))
    img = jnp.zeros((1, 8, 8, 1))
    with pytest.raises(TypeError, match="key="):
        m.nca_step(params["level1"], m.seed_state(img, 4), cfg=cfg)
    with pytest.raises(TypeError, match="key="):
        m.predict_logits(params, jnp.zeros((1, 8, 8)), cfg=cfg)


def _tiny(steps=3):
    return ModelConfig(channels=6, hidden=12, steps=steps, patch=8, downscale=4)


def test_same_key_same_output_other_keys_differ():
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (2, 16, 16))
    f = jax.jit(lambda k: m.predict_logits(params, img, cfg=cfg, key=k))
    a, b, c = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-4


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_observed_update_fraction_matches_fire_rate(rate):
    cfg = ModelConfig(channels=4, hidden=8, steps=1, fire_rate=rate)
    params = randomised_params(cfg)["level1"]
    img = jax.random.uniform(jax.random.key(3), (4, 64, 64, 1))
    state = m.seed_state(img, 4)
    new = m.nca_step(params, state, cfg=cfg, key=jax.random.key(9))
    changed = jnp.any(jnp.abs(new[..., 1:] - state[..., 1:]) > 0, axis=-1)
    frac = float(jnp.mean(changed))
    # 16,384 cells: the standard error is about 0.004
    assert abs(frac - rate) < 0.02, frac


def test_mask_is_per_cell_and_not_rescaled():
    cfg = ModelConfig(channels=4, hidden=8, steps=1)
    params = randomised_params(cfg)["level1"]
    img = jax.random.uniform(jax.random.key(3), (1, 8, 8, 1))
    state = m.seed_state(img, 4)
    ones = m.nca_step(params, state, cfg=cfg, mask=jnp.ones((1, 8, 8, 1)))
    half = m.nca_step(params, state, cfg=cfg, key=jax.random.key(4))
    fired = jnp.all(half == ones, axis=-1)
    kept = jnp.all(half[..., 1:] == state[..., 1:], axis=-1)
    assert bool(jnp.all(fired | kept))  # every cell either takes the full update or keeps its state


def test_key_path_equals_explicit_randomness_path():
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (2, 16, 16))
    mask = (img > 0.5).astype(jnp.float32)
    key = jax.random.key(11)
    r = m.draw_randomness(key, cfg, 2, 16, train=False)
    np.testing.assert_array_equal(
        m.predict_logits(params, img, cfg=cfg, key=key),
        m.predict_logits(params, img, cfg=cfg, randomness=r),
    )
    rt = m.draw_randomness(key, cfg, 2, 16, train=True)
    a = m.train_logits(params, img, mask, cfg=cfg, key=key)
    b = m.train_logits(params, img, mask, cfg=cfg, randomness=rt)
    for x, y in zip(a, b, strict=True):  # the same draws: other draws move values by ~0.1
        # XLA may order the folded norm's statistics differently in the two graphs: the last
        # float bit can differ (1.8e-7 seen), nothing more
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    other = m.train_logits(params, img, mask, cfg=cfg, key=jax.random.key(12))
    assert np.abs(np.asarray(other[0]) - np.asarray(a[0])).max() > 1e-2


def test_channel0_stays_the_image_and_shapes():
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (3, 16, 16))
    s = m.predict_state(params, img, cfg=cfg, key=jax.random.key(0))
    assert s.shape == (3, 16, 16, 6)
    np.testing.assert_array_equal(s[..., 0], img)
    logits, target = m.train_logits(params, img, img > 0.5, cfg=cfg, key=jax.random.key(0))
    assert logits.shape == target.shape == (3, 8, 8)


def test_training_patch_is_a_crop_of_the_label():
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (2, 16, 16))
    label = jnp.arange(2 * 16 * 16, dtype=jnp.float32).reshape(2, 16, 16)
    key = jax.random.key(3)
    _, patch = m.train_logits(params, img, label, cfg=cfg, key=key)
    yx = np.asarray(m.draw_patch_corners(key, cfg, 2, 16))
    for b in range(2):
        y, x = yx[b]
        np.testing.assert_array_equal(patch[b], label[b, y : y + 8, x : x + 8])


def test_vmap_over_ten_keys_equals_a_loop():
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (1, 16, 16))
    key = jax.random.key(7)
    from nca_jax.predict import ALL, make_predict

    got = make_predict(cfg, 10, ALL)(params, img, key, jnp.zeros((1,), jnp.int32))
    keys = m.sample_keys(jax.random.fold_in(key, 0), 10)  # image 0's sample keys
    loop = jnp.stack(
        [jax.nn.sigmoid(m.predict_logits(params, img, cfg=cfg, key=keys[i])) for i in range(10)]
    )
    assert got.shape == (10, 1, 16, 16)
    np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(got, axis=0).max()) > 0  # the samples really differ


def test_batch_norm_pooling_trap():
    """Predicting two images in one batch pools batch-norm statistics: it is NOT the same as
    predicting them one at a time (documented behaviour of Med-NCA)."""
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (2, 16, 16))
    r = m.draw_randomness(jax.random.key(1), cfg, 2, 16, train=False)
    both = m.predict_logits(params, img, cfg=cfg, randomness=r)
    r0 = m.Randomness(r.masks1[:, :1], r.masks2[:, :1])
    first = m.predict_logits(params, img[:1], cfg=cfg, randomness=r0)
    assert float(jnp.max(jnp.abs(both[:1] - first))) > 1e-4


def test_downscale_upscale():
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(m.downscale(x, 2)[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    up = m.upscale(jnp.array([[1.0, 2.0]]).reshape(1, 1, 2, 1), 2)
    np.testing.assert_array_equal(up[0, :, :, 0], [[1, 1, 2, 2], [1, 1, 2, 2]])


@pytest.mark.slow
def test_fast_backward_equals_autodiff_of_the_flax_rule():
    """apply_rule (hand-written backward, the norm not folded) = UpdateRule.apply, channel 0's
    update zeroed as a step uses it, in value and in gradient."""
    cfg = ModelConfig(channels=6, hidden=10, fold_norm=False)
    base = randomised_params(cfg, seed=3)["level1"]  # every leaf perturbed (norm scale, shift)
    noise = jax.random.normal(jax.random.key(4), (len(jax.tree_util.tree_leaves(base)),))
    leaves, tree = jax.tree_util.tree_flatten(base)
    params = tree.unflatten([x + 0.3 * e for x, e in zip(leaves, noise, strict=True)])
    state = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    cot = jax.random.normal(jax.random.key(2), (2, 5, 7, 6))
    rule = m.update_rule(cfg)
    keep = m._update_channels(cfg)
    ref_out, ref_vjp = jax.vjp(lambda p, s: rule.apply({"params": p}, s) * keep, params, state)
    out, vjp = jax.vjp(lambda p, s: m.apply_rule(p, s, cfg), params, state)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    got, want = jax.tree_util.tree_leaves(vjp(cot)), jax.tree_util.tree_leaves(ref_vjp(cot))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_perception_equals_the_convolutions_in_value_and_gradient():
    """perceive "im2col" (the TFLite export's: one matmul over three shifted windows) is the
    same rule as "conv": same features, update and gradients, reflect padding included (an
    asymmetric 5 x 7 state, so a swapped window order or axis would show)."""
    cfg = ModelConfig(channels=6, hidden=10, fold_norm=False)
    params = randomised_params(cfg, seed=5)["level1"]
    state = jax.random.normal(jax.random.key(8), (2, 5, 7, 6))
    cot = jax.random.normal(jax.random.key(9), (2, 5, 7, 6))
    feats = m.Perceive(6).apply({"params": params["perceive"]}, state)
    np.testing.assert_allclose(
        m.perceive_im2col(params["perceive"], state), feats, rtol=1e-5, atol=1e-5
    )
    outs, grads = [], []
    for impl in ("conv", "im2col"):
        c = dataclasses.replace(cfg, perceive=impl)
        out, vjp = jax.vjp(lambda p, s, c=c: m.apply_rule(p, s, c), params, state)
        outs.append(out)
        grads.append(jax.tree_util.tree_leaves(vjp(cot)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[1], grads[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_folded_norm_equals_autodiff_of_the_flax_rule():
    """fold_norm (the batch norm folded into the first dense layer through the input's
    covariance) is the same rule: same update and gradients as UpdateRule.apply, with both
    perception forms; the dense layer's and the convolutions' biases, which the norm cancels,
    get exactly 0."""
    cfg = ModelConfig(channels=6, hidden=10)
    params = randomised_params(cfg, seed=6)["level1"]  # norm scale and shift perturbed too
    state = jax.random.normal(jax.random.key(10), (2, 5, 7, 6))
    cot = jax.random.normal(jax.random.key(11), (2, 5, 7, 6))
    rule = m.update_rule(cfg)
    keep = m._update_channels(cfg)
    ref_out, ref_vjp = jax.vjp(lambda p, s: rule.apply({"params": p}, s) * keep, params, state)
    want = ref_vjp(cot)
    for impl in ("conv", "im2col"):
        c = dataclasses.replace(cfg, fold_norm=True, perceive=impl)
        out, vjp = jax.vjp(lambda p, s, c=c: m.apply_rule(p, s, c), params, state)
        np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
        got = vjp(cot)
        for a, b in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        assert not np.any(got[0]["dense_in"]["bias"])
        assert not np.any(got[0]["perceive"]["conv0"]["bias"])
        assert not np.any(got[0]["perceive"]["conv1"]["bias"])


@pytest.mark.parametrize("impl", ["conv", "im2col"])
def test_centred_perception_is_the_features_less_their_mean(impl):
    """perceive_centred (what the folded MLP takes) = Perceive's features less their mean over
    all cells: the convolutions' biases cancel, every column's mean is 0."""
    cfg = ModelConfig(channels=6, hidden=10, perceive=impl)
    params = randomised_params(cfg, seed=7)["level1"]["perceive"]
    state = 3.0 + jax.random.normal(jax.random.key(12), (2, 5, 7, 6))
    feats = m.Perceive(6).apply({"params": params}, state)
    got = m.perceive_centred(params, state, cfg)
    assert got.shape == (70, 18)
    want = (feats - jnp.mean(feats, axis=(0, 1, 2))).reshape(70, 18)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(jnp.mean(got, axis=0)).max()) < 1e-5


@pytest.mark.parametrize("impl", ["conv", "im2col"])
def test_the_update_ignores_the_states_mean_to_rounding(impl):
    """The norm makes the update a function of the centred state: a state 300 units off 0 with
    a spread of 1 (hidden channels far from 0) gives the update of the same state at 0, to
    within what float32 keeps of the spread, because the folded path centres the features
    before any product (fed uncentred, the covariance's cancellation costs about 1e-2 here)."""
    cfg = ModelConfig(channels=6, hidden=10, perceive=impl)
    params = randomised_params(cfg, seed=8)["level1"]
    state = jax.random.normal(jax.random.key(13), (2, 5, 7, 6))
    near = m.apply_rule(params, state, cfg)
    far = m.apply_rule(params, state + 300.0, cfg)
    np.testing.assert_allclose(far, near, rtol=0, atol=3e-4)


def test_folded_norm_keeps_its_precision_on_offset_inputs():
    """Inputs far from 0 with a small spread (a bright, flat image region): the folded MLP
    centres them before any product, so it stays within 1e-4 of a float64 reference, where
    the plain one loses digits to h - mean(h) (about 1e-3 here)."""
    ks = jax.random.split(jax.random.key(0), 5)
    x = 50.0 + 0.01 * jax.random.normal(ks[0], (4096, 12))
    w1 = jax.random.normal(ks[1], (12, 8))
    scale = 1.0 + jax.random.normal(ks[2], (8,)) * 0.1
    shift = 0.1 * jax.random.normal(ks[3], (8,))
    w2 = jax.random.normal(ks[4], (8, 3))
    x64, w164 = np.asarray(x, np.float64), np.asarray(w1, np.float64)
    h = (x64 - x64.mean(0)) @ w164
    pre = h / np.sqrt(h.var(0) + 1e-5) * np.asarray(scale) + np.asarray(shift)
    want = np.maximum(pre, 0) @ np.asarray(w2, np.float64)
    args = (x, w1, jnp.zeros(8), scale, shift, w2, 1e-5)
    folded = np.abs(np.asarray(mlp.cell_mlp_folded(*args)) - want).max()
    plain = np.abs(np.asarray(mlp.cell_mlp(*args)) - want).max()
    assert folded < 1e-4 < plain


@pytest.mark.parametrize("chunk", [7, 35, 64])  # 70 cells: a padded last chunk, none, one
def test_chunked_mlp_equals_the_folded_rule_in_value_and_gradient(chunk):
    """model.mlp_chunk (the folded MLP a chunk of cells at a time, the backward recomputing
    each chunk) is the same rule as the folded one and as UpdateRule.apply, whether the cells
    split into whole chunks or the last one is padded; the norm-cancelled bias gets exactly 0."""
    cfg = ModelConfig(channels=6, hidden=10)
    params = randomised_params(cfg, seed=7)["level1"]
    state = jax.random.normal(jax.random.key(12), (2, 5, 7, 6))  # 70 cells
    cot = jax.random.normal(jax.random.key(13), (2, 5, 7, 6))
    rule = m.update_rule(cfg)
    keep = m._update_channels(cfg)
    ref_out, ref_vjp = jax.vjp(lambda p, s: rule.apply({"params": p}, s) * keep, params, state)
    c = dataclasses.replace(cfg, mlp_chunk=chunk)
    out, vjp = jax.vjp(lambda p, s: m.apply_rule(p, s, c), params, state)
    whole = dataclasses.replace(cfg, mlp_chunk=0)
    fold_out, fold_vjp = jax.vjp(lambda p, s: m.apply_rule(p, s, whole), params, state)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, fold_out, rtol=1e-6, atol=1e-6)
    got = vjp(cot)
    for want, tol in ((ref_vjp(cot), 1e-4), (fold_vjp(cot), 1e-5)):
        for a, b in zip(
            jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    assert not np.any(got[0]["dense_in"]["bias"])


def test_chunked_mlp_is_a_loop_over_chunks_only_where_there_are_several():
    x = jnp.ones((70, 18))
    args = (x, jnp.ones((18, 10)), jnp.zeros(10), jnp.ones(10), jnp.zeros(10), jnp.ones((10, 6)))
    for chunk, loops in ((7, True), (64, True), (70, False), (128, False), (0, False)):
        jaxpr = str(jax.make_jaxpr(lambda *a, k=chunk: mlp.folded_mlp(*a, 1e-5, chunk=k))(*args))
        assert ("scan" in jaxpr) == loops, chunk


def test_mlp_chunk_auto_is_the_cpu_chunk_on_cpu_and_an_option_is_checked():
    assert ModelConfig().mlp_chunk == -1
    assert mlp.resolve_chunk(-1) == (mlp.CPU_CHUNK if jax.default_backend() == "cpu" else 0)
    assert (mlp.resolve_chunk(0), mlp.resolve_chunk(512)) == (0, 512)
    with pytest.raises(ConfigError, match="model.mlp_chunk must be -1 .auto. or >= 0"):
        ModelConfig(mlp_chunk=-2).validate()
    with pytest.raises(ConfigError, match="mlp_chunk > 0 needs model.fold_norm"):
        ModelConfig(mlp_chunk=1024, fold_norm=False).validate()
    ModelConfig(mlp_chunk=1024).validate()
    ModelConfig(fold_norm=False).validate()  # auto: no chunks without the fold


def test_fired_capacity_is_far_above_the_binomial_count_and_at_most_all_cells():
    assert mlp.fired_capacity(65_536, 0.5) == 33_792  # 32,768 + 8 x 128, a multiple of 256
    assert mlp.fired_capacity(1024, 0.5) == 768
    assert mlp.fired_capacity(512, 0.5) == 512  # too few cells to save anything
    assert mlp.fired_capacity(4096, 1.0) == 4096
    # the slots in as few chunks of at most `chunk` as possible, split evenly (multiples of 8)
    assert (mlp._slot_chunk(2304, 2048), mlp._slot_chunk(768, 160)) == (1152, 160)
    assert (mlp._slot_chunk(768, 0), mlp._slot_chunk(100, 2048)) == (768, 100)
    assert mlp.resolve_fired(-1, 2048) and not mlp.resolve_fired(-1, 0)
    assert mlp.resolve_fired(1, 0) and not mlp.resolve_fired(0, 2048)
    with pytest.raises(ConfigError, match=r"model.mlp_fired must be -1 \(auto\), 0 or 1"):
        ModelConfig(mlp_fired=2).validate()


def _fired_case(seed: int = 0):
    cfg = ModelConfig(channels=6, hidden=10)
    params = randomised_params(cfg, seed=7)["level1"]
    k = jax.random.split(jax.random.key(seed), 3)
    state = jax.random.normal(k[0], (1, 32, 32, 6))  # 1024 cells: 768 slots for the fired
    fired = m.fire_mask(k[1], (1, 32, 32), 0.5)
    cot = jax.random.normal(k[2], (1, 32, 32, 6))
    return cfg, params, state, fired, cot


@pytest.mark.parametrize("chunk", [0, 160])  # all 768 slots at once; 5 x 160, the last padded
def test_mlp_on_the_fired_cells_equals_every_cell_masked_in_value_and_gradient(chunk):
    """model.mlp_fired (the MLP's matmuls only on the gathered fired rows, the norm's
    statistics on all) is the all-cells rule times the fire mask, in value and gradient; the
    unfired cells' updates are exactly 0."""
    cfg, params, state, fired, cot = _fired_case()
    outs, grads = [], []
    for on in (0, 1):
        c = dataclasses.replace(cfg, mlp_chunk=chunk, mlp_fired=on)

        def rule(p, s, c=c):
            return m.apply_rule(p, s, c, fired=fired) * fired

        out, vjp = jax.vjp(rule, params, state)
        outs.append(out)
        grads.append(vjp(cot))
        jaxpr = str(jax.make_jaxpr(rule)(params, state))
        assert ("gather" in jaxpr and "cond" in jaxpr) == bool(on)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    direct = m.apply_rule(params, state, dataclasses.replace(cfg, mlp_fired=1), fired=fired)
    assert not np.any(np.asarray(direct)[np.asarray(fired[..., 0]) == 0])
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mlp_on_the_fired_cells_takes_every_cell_when_more_fire_than_it_has_slots():
    cfg, params, state, _, cot = _fired_case(1)
    fired = jnp.ones((1, 32, 32, 1)).at[0, 0, 0, 0].set(0.0)  # 1023 fired, 768 slots
    on, off = (dataclasses.replace(cfg, mlp_fired=f) for f in (1, 0))
    got, vjp = jax.vjp(lambda p, s: m.apply_rule(p, s, on, fired=fired), params, state)
    want, vjp0 = jax.vjp(lambda p, s: m.apply_rule(p, s, off, fired=fired) * fired, params, state)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert int(jnp.sum(jnp.abs(want).sum(-1) > 0)) > 768  # more updates than the slots hold
    for a, b in zip(*(jax.tree_util.tree_leaves(g(cot)) for g in (vjp, vjp0)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_nca_steps_on_the_fired_cells_equal_every_cell_with_the_same_key():
    cfg, params, state, _, _ = _fired_case(2)
    key = jax.random.key(4)
    c2 = dataclasses.replace(cfg, steps=2)

    def loss(p, c):
        return jnp.sum(m.rollout(p, state, cfg=c, key=key) ** 2)

    vals = [jax.value_and_grad(loss)(params, dataclasses.replace(c2, mlp_fired=f)) for f in (0, 1)]
    np.testing.assert_allclose(vals[1][0], vals[0][0], rtol=1e-6)
    for a, b in zip(*(jax.tree_util.tree_leaves(v[1]) for v in vals), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_perceive_option_is_checked():
    with pytest.raises(ConfigError, match="model.perceive must be one of"):
        ModelConfig(perceive="fft").validate()
    with pytest.raises(ConfigError, match="needs model.fast_backward"):
        ModelConfig(perceive="im2col", fast_backward=False).validate()


@pytest.mark.slow  # three compilations of a gradient
def test_scan_unrolled_and_python_loop_rollouts_agree():
    """The three ways of running the steps (lax.scan, the fully unrolled scan used in training,
    the Python loop the TFLite export needs) give the same states and the same gradients."""
    cfg = _tiny(steps=4)
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(7), (2, 16, 16))
    key = jax.random.key(11)

    def out(unroll):
        return m.predict_logits(params, img, cfg=cfg, key=key, unroll=unroll)

    ref = jax.jit(lambda: out(False))()
    for u in (True, "python"):
        np.testing.assert_allclose(jax.jit(lambda u=u: out(u))(), ref, rtol=1e-5, atol=1e-5)

    def loss(p, unroll):
        return jnp.mean(m.predict_logits(p, img, cfg=cfg, key=key, unroll=unroll) ** 2)

    g_ref = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    for u in (True, "python"):
        g = jax.jit(jax.grad(lambda p, u=u: loss(p, u)))(params)
        for a, b in zip(
            jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(ref).max()) > 0  # the steps did something


def test_matmul_with_the_kept_transpose_has_the_plain_matmuls_value_and_gradient():
    """mlp.matmul (the im2col perception's product, its backward through mlp.transposed) is
    x @ w in value and in both gradients."""
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, (37, 9)), jax.random.normal(kw, (9, 5))
    cot = jax.random.normal(kg, (37, 5))
    got, pull = jax.vjp(mlp.matmul, x, w)
    want, pull_ref = jax.vjp(lambda a, b: a @ b, x, w)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for g, r in zip(pull(cot), pull_ref(cot), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mlp.transposed(w), w.T)
