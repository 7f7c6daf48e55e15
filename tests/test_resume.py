"""Resuming runs safely (issue 15, defect classes 2 and 6): the best weights survive a resume of
a finished run, a run killed before its first checkpoint restarts, a missing folder is refused
without creating anything, and a run that could never resume is refused up front."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from nca_jax import checkpoint as ckpt
from nca_jax.config import ConfigError, FinetuneConfig, TrainConfig
from nca_jax.phantoms import make_phantom_dataset
from nca_jax.training import train_and_evaluate


@pytest.fixture(scope="module")
def phantoms():
    return make_phantom_dataset(8, seed=1, size=32)


def _same(a, b) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def test_resuming_a_finished_run_keeps_the_best_weights(tiny_cfg, phantoms, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, epochs=3))
    run = tmp_path / "r"
    first = train_and_evaluate(cfg, phantoms, run, val=phantoms, progress=False)
    kept = tmp_path / "best.npz"
    shutil.copy(run / "weights.npz", kept)
    again = train_and_evaluate(cfg, phantoms, run, val=phantoms, resume=True, progress=False)
    assert _same(run / "weights.npz", kept)
    summary = json.loads((run / "run.json").read_text())
    assert summary["best_epoch"] == first["best_epoch"] == again["best_epoch"]
    assert summary["weights"] == first["weights"]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarts_on_resume(tiny_cfg, phantoms, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, epochs=2))
    full = train_and_evaluate(cfg, phantoms, tmp_path / "full", progress=False)
    run = tmp_path / "killed"
    train_and_evaluate(cfg, phantoms, run, progress=False, stop_after_epochs=1)
    shutil.rmtree(run / "checkpoints")  # as if killed before the first save finished
    (run / "checkpoints").mkdir()
    with pytest.raises(ckpt.RunError, match="already holds a run"):
        train_and_evaluate(cfg, phantoms, run, progress=False)  # no silent overwrite
    done = train_and_evaluate(cfg, phantoms, run, resume=True, progress=False)
    assert done["finished"] and done["steps"] == full["steps"]
    assert _same(run / "weights.npz", tmp_path / "full" / "weights.npz")
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_resume_of_a_missing_folder_creates_nothing(tiny_cfg, phantoms, tmp_path):
    with pytest.raises(ckpt.RunError, match="nothing to resume"):
        train_and_evaluate(tiny_cfg, phantoms, tmp_path / "none", resume=True, progress=False)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
def test_a_run_that_could_never_resume_is_refused(cls):
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        cls(keep_checkpoints=0).validate()


@pytest.mark.slow
def test_finetune_killed_before_its_first_checkpoint_restarts(tmp_path):
    from nca_jax.config import ModelConfig, RunConfig
    from nca_jax.finetuning import finetune

    cfg = RunConfig(
        model=ModelConfig(channels=8, hidden=16, steps=2, patch=8),
        train=TrainConfig(epochs=1, batch_size=2, image_size=32),
    ).validate()
    train_and_evaluate(
        cfg, make_phantom_dataset(4, seed=1, size=32), tmp_path / "src", progress=False
    )
    _, params = ckpt.load_run(tmp_path / "src")
    data = make_phantom_dataset(4, seed=3, size=32)
    fc = FinetuneConfig(
        epochs=2, batch_size=2, samples=2, check_every=1, check_images=2, check_samples=2
    )
    full = finetune(cfg, params, data, tmp_path / "full", fc, progress=False)
    ft = tmp_path / "ft"
    finetune(cfg, params, data, ft, fc, progress=False, stop_after_epochs=1)
    shutil.rmtree(ft / "checkpoints")
    with pytest.raises(ckpt.RunError, match="nothing to resume"):
        finetune(cfg, params, data, tmp_path / "nope", fc, resume=True, progress=False)
    assert not (tmp_path / "nope").exists()
    done = finetune(cfg, params, data, ft, fc, resume=True, progress=False)
    assert done["finished"] and done["verdict"] == full["verdict"]
    assert _same(ft / "weights_last.npz", tmp_path / "full" / "weights_last.npz")


@pytest.mark.slow
@pytest.mark.parametrize("refresh", [0, 1])
def test_finetune_resume_equals_an_uninterrupted_run(tmp_path, refresh):
    """Cut after one epoch and resumed: the same weights and metrics as without the cut. Fixed
    targets are recomputed on resume, so the checkpoint holds no per-image arrays."""
    from nca_jax.config import ModelConfig, RunConfig
    from nca_jax.finetuning import finetune

    cfg = RunConfig(
        model=ModelConfig(channels=8, hidden=16, steps=2, patch=8),
        train=TrainConfig(epochs=1, batch_size=2, image_size=32),
    ).validate()
    train_and_evaluate(
        cfg, make_phantom_dataset(4, seed=1, size=32), tmp_path / "src", progress=False
    )
    _, params = ckpt.load_run(tmp_path / "src")
    data = make_phantom_dataset(4, seed=3, size=32)
    fc = FinetuneConfig(
        epochs=3,
        batch_size=2,
        samples=2,
        check_every=2,
        check_images=2,
        check_samples=2,
        refresh_every=refresh,
        lr=1e-3,
    )
    full = finetune(cfg, params, data, tmp_path / "full", fc, progress=False)
    cut = tmp_path / "cut"
    finetune(cfg, params, data, cut, fc, progress=False, stop_after_epochs=1)
    meta = " ".join(f.read_text(errors="ignore") for f in (cut / "checkpoints").rglob("*METADATA*"))
    assert meta and (("targets" in meta) == (refresh > 0))  # per-image arrays only if refreshed
    done = finetune(cfg, params, data, cut, fc, resume=True, progress=False)
    assert done["verdict"] == full["verdict"] and done["steps"] == full["steps"]
    for name in ("weights_last.npz", "weights.npz"):
        assert _same(cut / name, tmp_path / "full" / name), name

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(ln).items() if not k.endswith("_s")} for ln in lines]

    assert rows(cut) == rows(tmp_path / "full")
