"""The fine-tuning baselines beside VWSL (pseudo-labels, TENT-style entropy) and the AdaBN fact."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised_params

from nca_jax.config import FinetuneConfig, RunConfig
from nca_jax.model import BatchStatsNorm, draw_patch_corners, train_logits
from nca_jax.training import TrainState, make_optimizer
from nca_jax.vwsl import (
    KEY_A1,
    KEY_A2,
    KEY_B1,
    KEY_B2,
    binary_entropy,
    finetune_loss,
    targets_from_probs,
    vwsl_terms,
)


def test_binary_entropy_exact_values():
    assert float(binary_entropy(jnp.array([0.5]))) == pytest.approx(math.log(2))
    p = 0.2
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(binary_entropy(jnp.array([0.2, 0.8]))) == pytest.approx(expected, rel=1e-6)
    assert float(binary_entropy(jnp.array([0.0, 1.0]))) < 2e-5  # clipped, finite


def test_weight_kind_none_gives_unit_weights():
    probs = np.array([[[0.9, 0.1]], [[0.7, 0.3]], [[0.2, 0.2]]])  # (S=3, N=1, W=2)
    t, w = targets_from_probs(probs, "median", "none")
    np.testing.assert_array_equal(t, [[1.0, 0.0]])
    np.testing.assert_array_equal(w, [[1.0, 1.0]])


def _batch(cfg: RunConfig, seed: int = 0):
    size = cfg.train.image_size
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.random((2, size, size)), jnp.float32)
    targets = jnp.asarray(rng.random((2, size, size)) > 0.5, jnp.float32)
    weights = jnp.asarray(rng.random((2, size, size)), jnp.float32)
    return images, targets, weights


@pytest.mark.slow
def test_pseudo_label_loss_is_vwsl_seg_of_the_same_run_with_unit_weights(tiny_cfg):
    params = randomised_params(tiny_cfg.model)
    images, targets, weights = _batch(tiny_cfg)
    key = jax.random.key(3)
    fc = FinetuneConfig(method="pseudo-label")
    loss, terms = finetune_loss(
        params, images, targets, weights, cfg=tiny_cfg.model, fc=fc, key=key
    )
    keys = tuple(jax.random.fold_in(key, t) for t in (KEY_A1, KEY_B1, KEY_A2, KEY_B2))
    yx = draw_patch_corners(key, tiny_cfg.model, 2, images.shape[1])
    ref = vwsl_terms(
        params,
        images,
        targets,
        jnp.ones_like(weights),
        cfg=tiny_cfg.model,
        keys=keys,
        patch_yx=yx,
    )
    assert float(loss) == pytest.approx(float(ref["seg"]), rel=1e-6)
    assert set(terms) == {"seg"}
    # the weights are ignored: other weights, same loss
    loss2, _ = finetune_loss(
        params, images, targets, weights * 0.1, cfg=tiny_cfg.model, fc=fc, key=key
    )
    assert float(loss2) == float(loss)


def test_entropy_loss_with_every_cell_firing_is_the_entropy_of_one_run(tiny_cfg):
    """fire_rate 1: both level-2 runs are the same deterministic rollout, so the term is the
    binary entropy of the training forward's patch probabilities."""
    mc = dataclasses.replace(tiny_cfg.model, fire_rate=1.0)
    params = randomised_params(mc)
    images, targets, weights = _batch(tiny_cfg, 1)
    key = jax.random.key(4)
    fc = FinetuneConfig(method="entropy")
    loss, terms = finetune_loss(params, images, targets, weights, cfg=mc, fc=fc, key=key)
    logits, _ = train_logits(params, images, targets, cfg=mc, key=key)
    expected = binary_entropy(jax.nn.sigmoid(logits))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert set(terms) == {"entropy"}


def test_update_norm_changes_only_the_batch_norm_scale_and_shift(tiny_cfg):
    from nca_jax.finetuning import make_finetune_step

    params = randomised_params(tiny_cfg.model)
    fc = FinetuneConfig(method="entropy", update="norm", lr=1e-2, lr_decay=1.0)
    cfg = dataclasses.replace(tiny_cfg, finetune=fc)
    images, targets, weights = _batch(tiny_cfg, 2)
    state = TrainState(params, make_optimizer(fc).init(params), jnp.zeros((), jnp.int32))
    before = jax.tree_util.tree_map(np.asarray, params)
    batch = {"images": images, "targets": targets, "weights": weights}
    new, info = make_finetune_step(cfg)(state, batch, jax.random.key(0))
    assert bool(info["finite"]) and "entropy" in info["terms"]
    changed = {
        jax.tree_util.keystr(p): not np.array_equal(a, np.asarray(b))
        for (p, a), b in zip(
            jax.tree_util.tree_leaves_with_path(before),
            jax.tree_util.tree_leaves(new.params),
            strict=True,
        )
    }
    assert any(changed.values())
    for name, did in changed.items():
        assert did == ("'norm'" in name), name


def test_batch_norm_reestimates_statistics_on_every_batch_as_adabn_does():
    """Med-NCA keeps no running statistics: each batch is normalised with its own mean and
    variance, so a new site's per-feature shift and scale are removed at inference, which is
    what AdaBN's re-estimation on target data does. Nothing else to adapt."""
    norm = BatchStatsNorm()
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
    variables = norm.init(jax.random.key(1), x)
    assert set(variables) == {"params"}  # no batch_stats collection: nothing stored
    assert set(variables["params"]) == {"scale", "bias"}
    shifted = x * jnp.array([2.0, 0.5, 3.0]) + jnp.array([1.0, -4.0, 0.3])  # a "new site"
    np.testing.assert_allclose(norm.apply(variables, shifted), norm.apply(variables, x), atol=1e-4)
    y = norm.apply(variables, shifted)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_pseudo_label_and_vwsl_share_the_segmentation_loss(tiny_cfg):
    """gamma 0 and unit weights: VWSL's loss is the pseudo-label loss."""
    params = randomised_params(tiny_cfg.model)
    images, targets, _ = _batch(tiny_cfg, 5)
    ones = jnp.ones_like(targets)
    key = jax.random.key(9)
    v, _ = finetune_loss(
        params, images, targets, ones, cfg=tiny_cfg.model, fc=FinetuneConfig(gamma=0.0), key=key
    )
    p, _ = finetune_loss(
        params,
        images,
        targets,
        ones,
        cfg=tiny_cfg.model,
        fc=FinetuneConfig(method="pseudo-label"),
        key=key,
    )
    assert float(v) == pytest.approx(float(p), rel=1e-6)


@pytest.mark.slow
def test_balanced_gamma_equalises_the_two_gradient_norms(tiny_cfg, tmp_path):
    """gamma_rule 'balance': gamma x |grad consistency| = |grad seg| on the first batch at the
    source weights; the run trains with it (loss = seg + gamma x consistency, per epoch)."""
    import json

    from nca_jax.finetuning import finetune
    from nca_jax.phantoms import make_phantom_dataset
    from nca_jax.vwsl import balanced_gamma, vwsl_terms

    mc = tiny_cfg.model
    params = randomised_params(mc)
    images, targets, weights = _batch(tiny_cfg, 7)
    key = jax.random.key(8)
    g = balanced_gamma(params, images, targets, weights, cfg=mc, fc=FinetuneConfig(), key=key)
    keys = tuple(jax.random.fold_in(key, t) for t in (KEY_A1, KEY_B1, KEY_A2, KEY_B2))
    yx = draw_patch_corners(key, mc, 2, images.shape[1])

    def part(name):
        def f(p):
            t = vwsl_terms(p, images, targets, weights, cfg=mc, keys=keys, patch_yx=yx)
            return t["seg"] if name == "seg" else t["cons1"] + t["cons2"]

        grads = jax.grad(f)(params)
        return float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(grads))))

    assert g > 0 and g * part("cons") == pytest.approx(part("seg"), rel=1e-3)

    data = make_phantom_dataset(4, seed=3, size=tiny_cfg.train.image_size)
    fc = FinetuneConfig(epochs=1, batch_size=2, samples=2, gamma_rule="balance", check_every=0)
    s = finetune(
        tiny_cfg, params, data, tmp_path / "ft", fc, progress=False, uncertainty_after=False
    )
    used = json.loads((tmp_path / "ft" / "gamma.json").read_text())["gamma"]
    assert s["gamma_used"] == used != fc.gamma
    row = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[0])
    total = row["term_seg"] + used * (row["term_cons1"] + row["term_cons2"])
    assert row["loss"] == pytest.approx(total, rel=1e-5)


def test_entropy_draws_no_targets_it_would_not_read_and_trains_the_same(
    tiny_cfg, tmp_path, monkeypatch
):
    """TENT-style entropy ignores the VWSL targets: without the uncertainty maps it draws no
    predictions before training, and its weights are exactly those of a run that drew them.
    Both runs start from the same JAX arrays: fine-tuning must not consume the caller's."""
    from nca_jax import finetuning
    from nca_jax.checkpoint import load_weights
    from nca_jax.phantoms import make_phantom_dataset

    params = randomised_params(tiny_cfg.model)
    data = make_phantom_dataset(4, seed=3, size=tiny_cfg.train.image_size)
    fc = FinetuneConfig(
        method="entropy", update="norm", epochs=2, batch_size=2, samples=2, check_every=0
    )
    real, calls = finetuning.sample, []

    def counting(*a, **k):
        calls.append(k.get("desc"))
        return real(*a, **k)

    monkeypatch.setattr(finetuning, "sample", counting)
    finetuning.finetune(
        tiny_cfg, params, data, tmp_path / "lean", fc, progress=False, uncertainty_after=False
    )
    assert calls == []
    finetuning.finetune(tiny_cfg, params, data, tmp_path / "full", fc, progress=False)
    assert calls == ["VWSL targets", "uncertainty"]
    lean = load_weights(tmp_path / "lean" / "weights_last.npz", tiny_cfg)
    full = load_weights(tmp_path / "full" / "weights_last.npz", tiny_cfg)
    for a, b in zip(jax.tree_util.tree_leaves(lean), jax.tree_util.tree_leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)
    # the caller's JAX arrays survived both runs (the steps donate a copy, not them)
    assert float(params["level1"]["dense_out"]["kernel"].sum()) != 0.0
