import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nca_jax import checkpoint as ckpt
from nca_jax.data import Dataset
from nca_jax.losses import segmentation_loss
from nca_jax.model import train_logits
from nca_jax.phantoms import make_phantom_dataset
from nca_jax.training import TrainingError, init_state, make_train_step, train_and_evaluate


@pytest.fixture(scope="module")
def phantoms():
    return make_phantom_dataset(8, seed=1, size=32)


def _fixed_loss(cfg, params, data):
    logits, target = train_logits(
        params, data.images[:4], data.masks[:4], cfg=cfg.model, key=jax.random.key(123)
    )
    return float(segmentation_loss(logits, target))


def test_training_lowers_the_loss(tiny_cfg, phantoms):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, epochs=1))
    state = init_state(cfg)
    before = _fixed_loss(cfg, state.params, phantoms)
    step = make_train_step(cfg)
    imgs, masks = jnp.asarray(phantoms.images), jnp.asarray(phantoms.masks)
    for i in range(25):
        idx = np.arange(4) + 4 * (i % 2)
        state, info = step(state, {"images": imgs[idx], "masks": masks[idx]}, jax.random.key(0))
        assert bool(info["finite"])
    after = _fixed_loss(cfg, state.params, phantoms)
    assert int(state.step) == 25
    assert after < before - 0.05, (before, after)


def test_empty_patch_labels_skip_the_update(tiny_cfg, phantoms):
    state = init_state(tiny_cfg)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    step = make_train_step(tiny_cfg)
    zeros = jnp.zeros((4, 32, 32))
    batch = {"images": jnp.asarray(phantoms.images[:4]), "masks": zeros}
    state, info = step(state, batch, jax.random.key(0))
    assert bool(info["skipped"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, state.params)
    assert int(state.step) == 1


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_equals_an_uninterrupted_run(tiny_cfg, phantoms, tmp_path, ema):
    cfg = dataclasses.replace(
        tiny_cfg, train=dataclasses.replace(tiny_cfg.train, epochs=3, ema_decay=ema)
    )
    full = train_and_evaluate(cfg, phantoms, tmp_path / "full", val=phantoms, progress=False)
    part = train_and_evaluate(
        cfg, phantoms, tmp_path / "part", val=phantoms, progress=False, stop_after_epochs=2
    )
    assert not part["finished"] and not (tmp_path / "part" / "weights.npz").exists()
    resumed = train_and_evaluate(
        cfg, phantoms, tmp_path / "part", val=phantoms, resume=True, progress=False
    )
    assert resumed["steps"] == full["steps"] == 3 * 2
    for name in ("weights_last.npz", "weights.npz"):
        a = np.load(tmp_path / "full" / name)
        b = np.load(tmp_path / "part" / name)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])

    def rows(run):
        out = [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["epoch"], r["step"], r["loss"], r.get("val_dice")) for r in out]

    assert rows("full") == rows("part")
    assert (tmp_path / "full" / "training_curve.png").stat().st_size > 0
    assert ckpt.load_run(tmp_path / "full")[0] == cfg


def test_resume_needs_the_same_config_and_new_runs_do_not_overwrite(tiny_cfg, phantoms, tmp_path):
    train_and_evaluate(tiny_cfg, phantoms, tmp_path / "r", progress=False, stop_after_epochs=1)
    other = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, lr=1e-4))
    with pytest.raises(ckpt.RunError, match="differs"):
        train_and_evaluate(other, phantoms, tmp_path / "r", resume=True, progress=False)
    with pytest.raises(ckpt.RunError, match="already holds a run"):
        train_and_evaluate(tiny_cfg, phantoms, tmp_path / "r", progress=False)
    with pytest.raises(ckpt.RunError, match="nothing to resume"):
        train_and_evaluate(tiny_cfg, phantoms, tmp_path / "new", resume=True, progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, phantoms, tmp_path):
    train_and_evaluate(tiny_cfg, phantoms, tmp_path / "r", progress=False, stop_after_epochs=1)
    good = ckpt.checkpoint_manager(tmp_path / "r" / "checkpoints", 2).latest_step()
    bad_images = phantoms.images.copy()
    bad_images[:] = np.nan
    bad = Dataset(phantoms.names, bad_images, phantoms.masks, "nan-images")
    with pytest.raises(
        TrainingError,
        match=r"non-finite loss, gradient or weights at step 2 .*last good checkpoint: step 2",
    ):
        train_and_evaluate(tiny_cfg, bad, tmp_path / "r", resume=True, progress=False)
    assert good == 2
    assert ckpt.checkpoint_manager(tmp_path / "r" / "checkpoints", 2).latest_step() == good


@pytest.mark.parametrize("parallel", [1, 3, 8, None])
def test_predict_parallel_or_sequential_gives_the_same_probabilities(tiny_cfg, parallel):
    """Groups of `parallel` predictions one after another (CPU default: 1) equal the vmap over
    all of them: same keys per image and sample, so the same values."""
    from conftest import randomised_params

    from nca_jax.predict import ALL, make_predict, predict_dataset

    params = randomised_params(tiny_cfg.model)
    images = make_phantom_dataset(3, seed=4, size=32).images
    key = jax.random.key(3)
    ref = predict_dataset(make_predict(tiny_cfg.model, 4, ALL), params, images, key, chunk=3)
    got = predict_dataset(make_predict(tiny_cfg.model, 4, parallel), params, images, key, chunk=2)
    assert got.shape == ref.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the samples differ


def test_predict_parallel_must_be_positive(tiny_cfg):
    from nca_jax.predict import make_predict

    with pytest.raises(ValueError, match="parallel must be >= 1"):
        make_predict(tiny_cfg.model, 4, 0)


def _train(cfg, **fields):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **fields)).validate()


def test_schedules_warm_up_then_decay_exactly():
    from nca_jax.config import TrainConfig
    from nca_jax.training import make_optimizer_schedule

    paper = make_optimizer_schedule(TrainConfig(lr=1e-3, lr_decay=0.5))
    assert [float(paper(i)) for i in range(3)] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    warm = make_optimizer_schedule(TrainConfig(lr=1e-3, lr_decay=0.5, warmup_steps=4))
    got = [float(warm(i)) for i in range(7)]
    assert got == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 5e-4, 2.5e-4])
    cos = make_optimizer_schedule(
        TrainConfig(lr=1e-3, schedule="cosine", decay_steps=10, warmup_steps=2)
    )
    assert float(cos(2)) == pytest.approx(1e-3)
    assert float(cos(7)) == pytest.approx(5e-4)  # half way down the cosine
    assert float(cos(12)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_curriculum_epochs_train_with_fewer_nca_steps(tiny_cfg, phantoms, tmp_path):
    """One curriculum epoch at 2 NCA steps equals one epoch of a 2-step model; then the full
    number of steps takes over (the model and the inference stay the same)."""
    cur = _train(tiny_cfg, epochs=1, curriculum_epochs=1, curriculum_steps=2)
    short = dataclasses.replace(
        _train(tiny_cfg, epochs=1), model=dataclasses.replace(tiny_cfg.model, steps=2)
    )
    train_and_evaluate(cur, phantoms, tmp_path / "cur", progress=False)
    train_and_evaluate(short, phantoms, tmp_path / "short", progress=False)
    full = _train(tiny_cfg, epochs=1)
    train_and_evaluate(full, phantoms, tmp_path / "full", progress=False)
    a, b = np.load(tmp_path / "cur" / "weights.npz"), np.load(tmp_path / "short" / "weights.npz")
    c = np.load(tmp_path / "full" / "weights.npz")
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a.files)


def test_stop_at_val_dice_ends_early_and_resumes(tiny_cfg, phantoms, tmp_path):
    cfg = _train(tiny_cfg, epochs=3)
    s = train_and_evaluate(
        cfg, phantoms, tmp_path / "r", val=phantoms, progress=False, stop_at_val_dice=0.0
    )
    assert not s["finished"] and s["epochs_done"] == 1
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["eval_s"] > 0
    s = train_and_evaluate(cfg, phantoms, tmp_path / "r", val=phantoms, resume=True, progress=False)
    assert s["finished"] and s["steps"] == 3 * 2


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"schedule": "step"}, "schedule must be"),
        ({"schedule": "cosine"}, "needs train.decay_steps"),
        ({"warmup_steps": -1}, "must be >= 0"),
        ({"curriculum_epochs": 2}, "go together"),
        ({"level1_loss_weight": -0.5}, "level1_loss_weight must be >= 0"),
        ({"ema_decay": 1.0}, r"ema_decay must lie in \[0, 1\)"),
        ({"ema_decay": -0.1}, r"ema_decay must lie in \[0, 1\)"),
    ],
)
def test_bad_time_to_quality_options_are_refused(tiny_cfg, fields, message):
    from nca_jax.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _train(tiny_cfg, **fields)


def test_level1_loss_adds_the_weighted_loss_of_level_1_on_the_whole_image(tiny_cfg, phantoms):
    """Deep supervision: loss = patch loss + w x loss(level-1 logits upsampled, whole mask),
    from ONE forward (level 1's draws are those of the patch loss); w = 0 is the authors'."""
    from conftest import randomised_params

    from nca_jax.model import _level1_to_full, as_nhwc
    from nca_jax.training import supervised_loss

    params = randomised_params(tiny_cfg.model)
    imgs, masks = jnp.asarray(phantoms.images[:4]), jnp.asarray(phantoms.masks[:4])
    key = jax.random.key(5)
    base, _ = supervised_loss(params, imgs, masks, cfg=tiny_cfg, key=key)
    logits, target = train_logits(params, imgs, masks, cfg=tiny_cfg.model, key=key)
    np.testing.assert_array_equal(base, segmentation_loss(logits, target))
    deep_cfg = _train(tiny_cfg, level1_loss_weight=0.25)
    deep, _ = supervised_loss(params, imgs, masks, cfg=deep_cfg, key=key)
    # level 1 by hand, with the draws train_logits gives it (fold_in(key, LEVEL_KEY = 1))
    state = _level1_to_full(
        params, as_nhwc(imgs), tiny_cfg.model, True, key=jax.random.fold_in(key, 1)
    )
    aux = segmentation_loss(state[..., 1], masks)
    assert float(aux) > 0.1
    np.testing.assert_allclose(float(deep), float(base) + 0.25 * float(aux), rtol=1e-6)
    # the extra term reaches level 1's weights directly: their gradient changes
    g0 = jax.grad(lambda p: supervised_loss(p, imgs, masks, cfg=tiny_cfg, key=key)[0])(params)
    g1 = jax.grad(lambda p: supervised_loss(p, imgs, masks, cfg=deep_cfg, key=key)[0])(params)
    k0 = g0["level1"]["dense_out"]["kernel"]
    k1 = g1["level1"]["dense_out"]["kernel"]
    assert float(jnp.abs(k1 - k0).max()) > 1e-4


def test_level1_loss_is_refused_for_a_unet(tiny_cfg):
    from nca_jax.config import ConfigError, ModelConfig, RunConfig

    cfg = RunConfig(
        model=ModelConfig(kind="unet", unet_blocks=2, unet_channels=4),
        train=dataclasses.replace(tiny_cfg.train, level1_loss_weight=1.0),
    )
    with pytest.raises(ConfigError, match="a UNet has no level 1"):
        cfg.validate()


def test_param_ema_averages_the_weights_after_each_step_exactly():
    import optax

    from nca_jax.training import param_ema

    opt = optax.chain(optax.sgd(1.0), param_ema(0.5))
    params = {"w": jnp.array([1.0, 2.0])}
    state = opt.init(params)
    for _ in range(2):  # gradient 1: the weights go 1 -> 0 -> -1 (and 2 -> 1 -> 0)
        updates, state = opt.update({"w": jnp.ones(2)}, state, params)
        params = optax.apply_updates(params, updates)
    # ema: 1 -> 0.5 x 1 + 0.5 x 0 = 0.5 -> 0.5 x 0.5 + 0.5 x (-1) = -0.25 (and 2 -> 1.5 -> 0.75)
    np.testing.assert_array_equal(state[-1].ema["w"], [-0.25, 0.75])
    np.testing.assert_array_equal(params["w"], [-1.0, 0.0])  # the updates pass unchanged
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update({"w": jnp.ones(2)}, state)


def test_without_ema_the_optimizer_state_is_the_plain_optimizers(tiny_cfg):
    """ema_decay 0 adds nothing to the checkpointed state: runs from before it resume."""
    from nca_jax.training import make_optimizer

    state = init_state(tiny_cfg)
    plain = make_optimizer(tiny_cfg.train).init(state.params)
    assert jax.tree_util.tree_structure(state.opt_state) == jax.tree_util.tree_structure(plain)


def test_with_ema_a_run_validates_and_saves_the_average_of_its_weights(
    tiny_cfg, phantoms, tmp_path
):
    """One step (batch 8 of 8 images): the saved weights are 0.5 x initial + 0.5 x trained
    when ema_decay = 0.5, while the trained weights are those of the same run without it."""
    tc = dataclasses.replace(tiny_cfg.train, epochs=1, batch_size=8)
    plain = dataclasses.replace(tiny_cfg, train=tc)
    avg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tc, ema_decay=0.5))
    train_and_evaluate(plain, phantoms, tmp_path / "plain", val=phantoms, progress=False)
    s = train_and_evaluate(avg, phantoms, tmp_path / "avg", val=phantoms, progress=False)
    assert s["steps"] == 1 and s["best_epoch"] == 0
    p0 = ckpt.flatten_params(init_state(plain).params)
    with np.load(tmp_path / "plain" / "weights_last.npz") as f:
        p1 = {k: f[k] for k in f.files}
    assert any(not np.array_equal(p0[k], p1[k]) for k in p1)  # the step changed the weights
    for name in ("weights_last.npz", "weights.npz"):
        with np.load(tmp_path / "avg" / name) as f:
            for k in p1:
                np.testing.assert_allclose(f[k], 0.5 * p0[k] + 0.5 * p1[k], rtol=1e-6, atol=1e-7)
