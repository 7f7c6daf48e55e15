import json
import subprocess
import sys
from pathlib import Path

import pytest

from nca_jax.phantoms import write_phantom_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cross_site_runs_and_resumes_on_phantom_sites(tmp_path):
    data, splits = tmp_path / "data", tmp_path / "splits"
    splits.mkdir()
    for i, site in enumerate(("shenzhen", "montgomery")):
        write_phantom_folder(data / site, n=6, seed=10 + i, size=32)
        names = sorted(p.stem for p in (data / site / "images").iterdir())
        parts = {"train": names[:2], "val": names[2:3], "test": names[3:5], "finetune": names[5:]}
        for part, ns in parts.items():
            (splits / f"{site}_{part}.txt").write_text("\n".join(ns) + "\n")
    proto = {
        "train_config": {
            "model": {"channels": 8, "hidden": 16, "steps": 2, "patch": 8},
            "train": {"epochs": 1, "batch_size": 2, "image_size": 32},
        },
        "finetune": {"epochs": 1, "batch_size": 2, "samples": 2, "gamma": 100.0},
        "n_finetune": 2,
        "eval_samples": 2,
        "seeds": [0],
        "gammas": [0, 100],
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "cross_site.py"),
        "--protocol",
        str(tmp_path / "p.json"),
        "--work",
        str(tmp_path / "work"),
        "--data",
        str(data),
        "--splits",
        str(splits),
        "--results",
        str(tmp_path / "results"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "cross_site.json").read_text())
    keys = {"train_site", "test_site", "method", "gamma", "seed", "dice_mean", "dice_std", "n"}
    assert all(keys <= set(row) for row in rows)
    assert {(r["method"], r["gamma"]) for r in rows if r["train_site"] == "shenzhen"} == {
        ("med-nca", None),
        ("vwsl", 0),
        ("vwsl", 100),
    }
    assert (tmp_path / "results" / "runs" / "xsite-shenzhen-seed0" / "weights.npz").exists()
    # a second invocation reuses every unit (resumable) and gives the same rows
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r2.returncode == 0
    assert json.loads((tmp_path / "results" / "cross_site.json").read_text()) == rows
