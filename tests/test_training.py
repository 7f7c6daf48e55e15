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


def test_resume_equals_an_uninterrupted_run(tiny_cfg, phantoms, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, epochs=3))
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
        TrainingError, match=r"non-finite loss at step 2 .*last good checkpoint: step 2"
    ):
        train_and_evaluate(tiny_cfg, bad, tmp_path / "r", resume=True, progress=False)
    assert good == 2
    assert ckpt.checkpoint_manager(tmp_path / "r" / "checkpoints", 2).latest_step() == good
