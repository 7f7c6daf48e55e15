import json

import numpy as np
from PIL import Image

from nca_jax import evaluate
from nca_jax.phantoms import make_phantom_dataset, write_phantom_folder
from nca_jax.training import train_and_evaluate


def test_evaluate_writes_summary_and_pngs(tiny_cfg, tmp_path):
    train = make_phantom_dataset(8, seed=1, size=32)
    train_and_evaluate(tiny_cfg, train, tmp_path / "run", progress=False)
    data = write_phantom_folder(tmp_path / "data", n=3, seed=5, size=32)
    # one case whose ground truth is empty: Dice is 1 only if the prediction is empty too
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "masks" / "phantom_5_0002.png")
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--run",
                str(tmp_path / "run"),
                "--data",
                str(data),
                "--out",
                str(out),
                "--samples",
                "3",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    for k in ("dice_mean", "dice_std", "soft_dice_mean", "hd95_mean", "quality_mean", "n", "cases"):
        assert k in s
    assert s["n"] == 3 and len(s["cases"]) == 3 and s["samples"] == 3
    assert s["config"]["model"]["steps"] == tiny_cfg.model.steps
    empty = s["cases"][2]  # undefined HD95 is written as null (valid JSON), never NaN
    expected = (1.0, 0.0) if empty["fg_fraction"] == 0 else (0.0, None)
    assert (empty["dice"], empty["hd95"]) == expected
    assert s["hd95_undefined"] == sum(c["hd95"] is None for c in s["cases"])
    dices = [c["dice"] for c in s["cases"]]
    assert np.isclose(s["dice_mean"], np.mean(dices)) and np.isclose(s["dice_std"], np.std(dices))
    for suffix in ("pred", "std", "overlay"):
        assert (out / "cases" / f"phantom_5_0000_{suffix}.png").exists()

    # same seed -> same numbers; a weights file can replace the run's weights
    out2 = tmp_path / "eval2"
    evaluate.main(
        [
            "--run",
            str(tmp_path / "run"),
            "--data",
            str(data),
            "--out",
            str(out2),
            "--samples",
            "3",
            "--seed",
            "1",
            "--no-png",
            "--weights",
            str(tmp_path / "run" / "weights_last.npz"),
        ]
    )
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["weights"].endswith("weights_last.npz")
    # trained without validation: weights.npz IS the last epoch's, so the numbers are the same
    assert (tmp_path / "run" / "weights.npz").read_bytes() == (
        tmp_path / "run" / "weights_last.npz"
    ).read_bytes()
    assert s2["dice_mean"] == s["dice_mean"] and s2["weights_sha256"] == s["weights_sha256"]
