"""Weights files, run folders and orbax checkpoints: round trips and every bad file."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nca_jax import checkpoint as ckpt
from nca_jax.config import ModelConfig, RunConfig, TrainConfig, save_config
from nca_jax.errors import RunError
from nca_jax.model import init_params


def _cfg() -> RunConfig:
    return RunConfig(
        model=ModelConfig(channels=6, hidden=12, steps=3, patch=8, downscale=4),
        train=TrainConfig(batch_size=2, image_size=32),
    ).validate()


def test_flatten_is_sorted_and_round_trips():
    params = init_params(_cfg().model, key=jax.random.key(0))
    flat = ckpt.flatten_params(params)
    assert list(flat) == sorted(flat) and all("/" in k for k in flat)
    again = ckpt.flatten_params(ckpt.unflatten_params(flat))
    assert list(again) == list(flat)
    for k in flat:
        np.testing.assert_array_equal(again[k], flat[k])


def test_weights_round_trip_exactly_and_leave_no_temporary(tmp_path):
    cfg = _cfg()
    params = init_params(cfg.model, key=jax.random.key(1))
    path = tmp_path / "w.npz"
    ckpt.save_weights(params, path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]
    back = ckpt.flatten_params(ckpt.load_weights(path, cfg))
    for k, v in ckpt.flatten_params(params).items():
        np.testing.assert_array_equal(back[k], v)


def _write(path, flat):
    np.savez(path, **flat)
    return path


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: f.pop(next(iter(f))), "weights do not fit the model (missing"),
        (lambda f: f.update({"extra/kernel": np.zeros(1, np.float32)}), "unexpected"),
        (
            lambda f: f.update({k: np.zeros((1, 1), np.float32) for k in list(f)[:1]}),
            "the model needs",
        ),
        (lambda f: f.update({k: f[k] * np.nan for k in list(f)[:1]}), "non-finite values"),
    ],
)
def test_bad_weights_files_name_the_file_and_the_problem(tmp_path, breakage, message):
    cfg = _cfg()
    flat = ckpt.flatten_params(init_params(cfg.model, key=jax.random.key(0)))
    breakage(flat)
    path = _write(tmp_path / "bad.npz", flat)
    with pytest.raises(RunError, match="bad.npz") as e:
        ckpt.load_weights(path, cfg)
    assert message in str(e.value)


def test_unreadable_and_missing_weights(tmp_path):
    cfg = _cfg()
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(RunError, match="junk.npz: not a readable weights"):
        ckpt.load_weights(tmp_path / "junk.npz", cfg)
    with pytest.raises(RunError, match="nope.npz: no such weights file"):
        ckpt.load_weights(tmp_path / "nope.npz", cfg)


def test_pickled_object_arrays_are_refused(tmp_path):
    cfg = _cfg()
    flat = ckpt.flatten_params(init_params(cfg.model, key=jax.random.key(0)))
    k = next(iter(flat))
    flat[k] = np.array([{"a": 1}], dtype=object)
    np.savez(tmp_path / "pickle.npz", **flat)
    with pytest.raises(RunError, match="not a readable weights"):
        ckpt.load_weights(tmp_path / "pickle.npz", cfg)


def test_load_run_errors(tmp_path):
    with pytest.raises(RunError, match="no such directory"):
        ckpt.load_run(tmp_path / "missing")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunError, match="no config.json"):
        ckpt.load_run(run)
    cfg = _cfg()
    save_config(cfg, run / "config.json")
    with pytest.raises(RunError, match="not a trained run"):
        ckpt.load_run(run)
    ckpt.save_weights(init_params(cfg.model, key=jax.random.key(2)), run / "weights.npz")
    got_cfg, _ = ckpt.load_run(run)
    assert got_cfg == cfg
    (run / "config.json").write_text('{"model": {"channels": "six"}}')
    with pytest.raises(RunError, match="config.json"):
        ckpt.load_run(run)


def test_checkpoint_round_trip_latest_and_keep(tmp_path):
    mngr = ckpt.checkpoint_manager(tmp_path / "ck", keep=2)
    like = {"a": np.zeros(3, np.float32), "n": np.zeros((), np.int32)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(
            mngr, step, {"a": np.full(3, step, np.float32), "n": np.full((), step, np.int32)}
        )
    assert mngr.latest_step() == 3 and sorted(mngr.all_steps()) == [2, 3]  # keep=2
    got = ckpt.restore_checkpoint(mngr, like)
    np.testing.assert_array_equal(got["a"], np.full(3, 3.0))
    assert int(ckpt.restore_checkpoint(mngr, like, step=2)["n"]) == 2
    mngr.close()
    assert ckpt.has_checkpoint(tmp_path / "ck") and not ckpt.has_checkpoint(tmp_path / "none")
    assert not (tmp_path / "none").exists()  # asking creates nothing
    empty = ckpt.checkpoint_manager(tmp_path / "empty", keep=1)
    with pytest.raises(RunError, match="no checkpoint to resume from"):
        ckpt.restore_checkpoint(empty, like)
    empty.close()


def test_atomic_copy(tmp_path):
    (tmp_path / "a").write_bytes(b"123")
    ckpt.atomic_copy(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"123"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
