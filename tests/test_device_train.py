"""The on-device stand-in (nca_jax.device_train): trains, fine-tunes and predicts through the
exported TFLite file alone, and every bad input ends in one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nca_jax import checkpoint as ckpt

pytestmark = pytest.mark.slow  # needs the exported TFLite file (conftest's `exported`)


def _stand_in(*args):
    from nca_jax import device_train
    from nca_jax.cli import call_main

    return call_main(device_train.main, [str(a) for a in args])


def test_stand_in_trains_finetunes_predicts_and_weights_return_to_jax(exported, tmp_path, capsys):
    from nca_jax.phantoms import write_phantom_folder

    model = exported["path"]
    data = write_phantom_folder(tmp_path / "data", n=4, seed=3, size=32)
    run = tmp_path / "device-run"
    assert _stand_in("train", "--model", model, "--data", data, "--epochs", 2, "--out", run) == 0
    rec = json.loads((run / "run.json").read_text())
    assert rec["steps"] == 4 and rec["paper_training_h"] > 0
    cfg, params = ckpt.load_run(run)  # the device's weights come back into a JAX run
    assert cfg.model == exported["cfg"].model
    moved = ckpt.flatten_params(params)
    start = ckpt.flatten_params(exported["params"])
    assert any(np.abs(moved[k] - start[k]).max() > 1e-4 for k in start)
    # fine-tuning never opens a mask: make every mask unreadable
    for m in (data / "masks").iterdir():
        m.write_bytes(b"not an image")
    ft = tmp_path / "device-ft"
    args = ("finetune", "--model", model, "--data", data, "--epochs", 1, "--out", ft)
    assert _stand_in(*args, "--weights", run / "weights.npz") == 0
    assert json.loads((ft / "run.json").read_text())["steps"] == 2
    ckpt.load_run(ft)
    pred = tmp_path / "pred"
    args = ("predict", "--model", model, "--data", data, "--out", pred, "--threads", 2)
    assert _stand_in(*args) == 0
    assert len(list((pred / "pred").glob("*.png"))) == 4
    assert len(list((pred / "std").glob("*.png"))) == 4


def test_stand_in_bad_inputs_exit_2(exported, tmp_path, capsys):
    from nca_jax.phantoms import write_phantom_folder

    model = exported["path"]
    data = write_phantom_folder(tmp_path / "data", n=2, seed=3, size=32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(2))
    out = tmp_path / "o"
    cases = [
        (("predict", "--model", tmp_path / "none.tflite"), "no such model file"),
        (("predict", "--model", model, "--weights", bad), "do not fit the model"),
        (("train", "--model", model, "--data", tmp_path / "nodata"), "nodata"),
    ]
    for args, msg in cases:
        full = list(args) + (["--data", data] if "--data" not in args else []) + ["--out", out]
        assert _stand_in(*full) == 2
        assert msg in capsys.readouterr().err
    assert not (out / "weights.npz").exists()


def test_stand_in_predicts_with_a_frozen_file_and_refuses_to_train_it(exported, tmp_path, capsys):
    import dataclasses

    from conftest import EXPORT_SPEC

    from nca_jax import export as ex
    from nca_jax.phantoms import write_phantom_folder

    frozen = tmp_path / "frozen.tflite"
    spec = dataclasses.replace(EXPORT_SPEC, frozen=True, fixed_randomness=False)
    ex.export(exported["cfg"], exported["params"], spec, frozen)
    data = write_phantom_folder(tmp_path / "data", n=3, seed=3, size=32)
    pred = tmp_path / "pred"
    assert _stand_in("predict", "--model", frozen, "--data", data, "--out", pred) == 0
    assert len(list((pred / "std").glob("*.png"))) == 3
    run = tmp_path / "run"
    assert _stand_in("train", "--model", frozen, "--data", data, "--out", run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an inference-only (frozen) file has no 'train'" in err
    assert not run.exists()  # refused before anything was written
