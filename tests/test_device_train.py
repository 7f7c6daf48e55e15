"""The on-device stand-in (nca_jax.device_train): trains, fine-tunes and predicts through the
exported TFLite file alone, and every bad input ends in one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nca_jax import checkpoint as ckpt
from nca_jax.guard import prior_ok

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
    rec = json.loads((ft / "run.json").read_text())
    assert rec["steps"] == 2
    # the safety net (default: a check after the last epoch) decided, and said so last
    assert capsys.readouterr().out.strip().splitlines()[-1] == rec["verdict_line"]
    assert [c["epoch"] for c in rec["criterion"]["checks"]] == [1]
    _, kept = ckpt.load_run(ft)
    want = (
        ckpt.flatten_params(ckpt.load_run(run)[1])
        if rec["verdict"] == "rolled back"
        else dict(np.load(ft / "snapshots" / "epoch0001.npz"))
    )
    assert all(np.array_equal(ckpt.flatten_params(kept)[k], want[k]) for k in want)
    # checks every epoch with a prior share: each check's verdict applies the prior rule
    ft2 = tmp_path / "device-ft2"
    args = ("finetune", "--model", model, "--data", data, "--epochs", 2, "--out", ft2)
    extra = ("--weights", run / "weights.npz", "--check-every", 1, "--prior-share", 0.9)
    assert _stand_in(*args, *extra) == 0
    crit = json.loads((ft2 / "run.json").read_text())["criterion"]
    assert [c["epoch"] for c in crit["checks"]] == [1, 2] and "prior 0.9" in crit["rule"]
    for c in crit["checks"]:
        away = not prior_ok(c["area"], crit["source"]["area"], 0.9)
        assert away == any("moved away from the prior" in w for w in c["why_not"])
    rows = [json.loads(ln) for ln in (ft2 / "metrics.jsonl").read_text().splitlines()]
    assert all("check_area" in r and "check_quality" in r for r in rows)
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
        (("finetune", "--model", model, "--prior-share", "auto"), "no train_mask_share"),
        (("finetune", "--model", model, "--prior-share", "lungs"), "'auto', 'none' or a number"),
        (("finetune", "--model", model, "--prior-share", "1.5"), "prior_share must lie"),
    ]
    for args, msg in cases:
        full = list(args) + (["--data", data] if "--data" not in args else []) + ["--out", out]
        assert _stand_in(*full) == 2
        assert msg in capsys.readouterr().err
    assert not out.exists()


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
