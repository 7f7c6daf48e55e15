import json
import subprocess
import sys
from pathlib import Path

import pytest

from nca_jax.phantoms import write_phantom_folder

ROOT = Path(__file__).resolve().parent.parent


def _command(script: str, tmp_path: Path, data: Path, splits: Path) -> list[str]:
    """The experiment's command line with its protocol, work, data, splits and results under
    tmp_path."""
    return [
        sys.executable,
        str(ROOT / "experiments" / script),
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
        "refresh": [1],
        "uncertainty_images": 2,
        "uncertainty_samples": 2,
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    cmd = _command("cross_site.py", tmp_path, data, splits)
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
    unc = json.loads((tmp_path / "results" / "cross_site_uncertainty.json").read_text())
    assert {(u["train_site"], u["method"]) for u in unc} == {
        (s, m) for s in ("shenzhen", "montgomery") for m in ("med-nca", "vwsl")
    }
    md = (tmp_path / "results" / "cross_site.md").read_text()
    assert "Measured unit wall times" in md and "target refresh" in md and "Table 3" in md
    ref = json.loads((tmp_path / "results" / "cross_site_refresh.json").read_text())
    assert {(r["train_site"], r["refresh_every"], r["method"]) for r in ref} == {
        ("shenzhen", 1, "vwsl"),
        ("montgomery", 1, "vwsl"),
    }
    # a second invocation reuses every unit (resumable) and gives the same rows
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r2.returncode == 0
    assert json.loads((tmp_path / "results" / "cross_site.json").read_text()) == rows


@pytest.mark.slow
def test_capture_experiment_runs_and_resumes_on_phantoms(tmp_path, tiny_cfg):
    from nca_jax.data import load_folder
    from nca_jax.training import train_and_evaluate

    data, splits = tmp_path / "data", tmp_path / "splits"
    splits.mkdir()
    write_phantom_folder(data / "shenzhen", n=4, seed=10, size=32)
    write_phantom_folder(data / "montgomery", n=6, seed=11, size=32)
    names = sorted(p.stem for p in (data / "montgomery" / "images").iterdir())
    (splits / "montgomery_test.txt").write_text("\n".join(names[:3]) + "\n")
    (splits / "montgomery_train.txt").write_text("\n".join(names[3:]) + "\n")
    run = tmp_path / "source"
    train_and_evaluate(tiny_cfg, load_folder(data / "shenzhen", size=32), run, progress=False)
    proto = {
        "source_run": str(run),
        "train_site": "shenzhen",
        "test_site": "montgomery",
        "presets": ["severe"],
        "n_finetune": [3, 1],
        "finetune": {"epochs": 1, "batch_size": 2, "samples": 2, "gamma": 100.0},
        "eval_samples": 1,
        "uncertainty_images": 2,
        "uncertainty_samples": 2,
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    cmd = _command("capture_experiment.py", tmp_path, data, splits)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "capture.json").read_text())
    keys = {"train_site", "test_site", "preset", "method", "n_finetune_images", "seed"}
    assert all(keys | {"dice_mean", "dice_std", "n"} <= set(row) for row in rows)
    assert {(r["preset"], r["method"], r["n_finetune_images"]) for r in rows} == {
        ("none", "med-nca", 0),
        ("severe", "med-nca", 0),
        ("severe", "vwsl", 3),
        ("severe", "vwsl", 1),
    }
    assert all(r["n"] == 3 for r in rows)
    captured = tmp_path / "work" / "captured-montgomery-severe-s0"
    assert len(list((captured / "masks").iterdir())) == 6  # masks captured, never committed
    assert not (
        tmp_path
        / "results"
        / "runs"
        / "capture-vwsl-shenzhen-to-montgomery-severe-n3"
        / "uncertainty"
    ).exists()
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r2.returncode == 0
    assert json.loads((tmp_path / "results" / "capture.json").read_text()) == rows


@pytest.mark.slow
def test_time_to_dice_curves_and_cpu_projection(tmp_path):
    """Two tiny variants (one with a curriculum) on a phantom 'shenzhen'; the CPU projection is
    steps x the bench's seconds per step of each epoch's (batch, NCA steps)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import time_to_dice

    data, splits = tmp_path / "data", tmp_path / "splits"
    splits.mkdir()
    write_phantom_folder(data / "shenzhen", n=6, seed=3, size=32)
    names = sorted(p.stem for p in (data / "shenzhen" / "images").iterdir())
    (splits / "shenzhen_train.txt").write_text("\n".join(names[:4]) + "\n")
    (splits / "shenzhen_val.txt").write_text("\n".join(names[4:]) + "\n")
    tiny = {"channels": 8, "hidden": 16, "steps": 4, "patch": 8}
    train = {"batch_size": 2, "image_size": 32, "epochs": 3, "eval_every": 1, "lr": 5e-3}
    proto = {
        "targets": [0.0, 1.01],
        "variants": {
            "plain": {"model": tiny, "train": train},
            "curr": {
                "model": tiny,
                "train": {**train, "curriculum_epochs": 1, "curriculum_steps": 2},
            },
        },
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    bench = []
    for steps, per in ((4, 2.0), (2, 1.0)):
        bench.append(tmp_path / f"b{steps}.json")
        bench[-1].write_text(
            json.dumps({"steps": steps, "per_batch": {"2": {"train_step_s": per}}})
        )
    args = _command("time_to_dice.py", tmp_path, data, splits)[2:]
    assert time_to_dice.main([*args, "--cpu-bench", *map(str, bench)]) == 0
    rows = {
        r["variant"]: r
        for r in json.loads((tmp_path / "results" / "time_to_dice.json").read_text())
    }
    assert [q["step"] for q in rows["plain"]["curve"]] == [2, 4, 6]
    assert [q["cpu_train_s"] for q in rows["plain"]["curve"]] == [4.0, 8.0, 12.0]
    assert [q["cpu_train_s"] for q in rows["curr"]["curve"]] == [2.0, 6.0, 10.0]
    for q in rows["plain"]["curve"]:  # validated every epoch: wall = train + validation
        assert q["wall_s"] > q["train_s"] > 0
    assert rows["plain"]["reach_0"]["step"] == 2 and rows["plain"]["reach_1.01"] is None
    assert "not reached" in (tmp_path / "results" / "time_to_dice.md").read_text()
    assert (tmp_path / "results" / "figures" / "time_to_dice.png").stat().st_size > 0
    # finished runs are not trained again; a missing bench entry gives no projection
    assert time_to_dice.main([*args, "--publish-only"]) == 0
    rows = json.loads((tmp_path / "results" / "time_to_dice.json").read_text())
    assert all(q["cpu_train_s"] is None for r in rows for q in r["curve"])


@pytest.mark.slow
def test_vwsl_study_runs_resumes_and_reports_every_method_and_selection(tmp_path):
    data, splits = tmp_path / "data", tmp_path / "splits"
    splits.mkdir()
    for i, site in enumerate(("shenzhen", "montgomery")):
        write_phantom_folder(data / site, n=8, seed=20 + i, size=32)
        names = sorted(p.stem for p in (data / site / "images").iterdir())
        ft = "finetune" if site == "shenzhen" else "train"
        parts = {"train": names[:2], "val": names[2:3], "test": names[3:5], ft: names[5:7]}
        for part, ns in parts.items():
            (splits / f"{site}_{part}.txt").write_text("\n".join(ns) + "\n")
    tiny = {"channels": 8, "hidden": 16, "steps": 2, "patch": 8}
    train = {"epochs": 2, "batch_size": 2, "image_size": 32, "eval_every": 1}
    ft = {
        "epochs": 2,
        "batch_size": 2,
        "samples": 2,
        "check_every": 0,
        "check_images": 2,
        "check_samples": 2,
    }
    proto = {
        "sources": {s: {"model": tiny, "train": train} for s in ("shenzhen", "montgomery")},
        "directions": [["shenzhen", "montgomery"], ["montgomery", "shenzhen"]],
        "methods": [
            {"name": "vwsl-authors", "finetune": ft, "seeds": [0, 1]},
            {
                "name": "vwsl-default",
                "reuse": "vwsl-authors",
                "finetune": {**ft, "check_every": 1},
                "seeds": [0, 1],
            },
            {
                "name": "pseudo-label",
                "finetune": {**ft, "method": "pseudo-label", "weight_kind": "none", "gamma": 0.0},
            },
            {"name": "entropy", "finetune": {**ft, "method": "entropy", "update": "norm"}},
        ],
        "eval_samples": 2,
        "oracle_samples": 1,
        "n_target_images": 2,
        "snapshot_every": 1,
        "label_free_every": 1,
        "image_size": 32,
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    cmd = _command("vwsl_study.py", tmp_path, data, splits)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "vwsl.json").read_text())
    keys = {
        "train_site",
        "test_site",
        "method",
        "selection",
        "seed",
        "n_target_images",
        "steps",
        "dice_mean",
        "dice_std",
        "n",
        "wall_s",
    }
    assert all(keys <= set(row) for row in rows), rows[0]
    got = {(r["train_site"], r["method"], r["selection"], r["seed"]) for r in rows}
    for src in ("shenzhen", "montgomery"):
        assert (src, "med-nca", "last", 0) in got
        for m, seeds in (
            ("vwsl-authors", (0, 1)),
            ("vwsl-default", (0, 1)),
            ("pseudo-label", (0,)),
            ("entropy", (0,)),
        ):
            for sel in ("last", "label-free", "oracle"):
                assert all((src, m, sel, s) in got for s in seeds), (src, m, sel)
    # vwsl-default reused the authors' runs: no run folder of its own
    assert not list((tmp_path / "work").glob("ft-vwsl-default-*"))
    lf = [r for r in rows if r["selection"] == "label-free"]
    assert all(r["verdict"] in ("adapted", "rolled back") for r in lf)
    roll = [r for r in lf if r["verdict"] == "rolled back"]
    base = {
        (r["train_site"], r["test_site"]): r["dice_mean"] for r in rows if r["method"] == "med-nca"
    }
    assert all(r["dice_mean"] == base[(r["train_site"], r["test_site"])] for r in roll)
    md = (tmp_path / "results" / "vwsl.md").read_text()
    assert "| shenzhen | montgomery | vwsl-authors | last |" in md
    # resumable: a second invocation computes nothing new and gives the same rows
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "vwsl.json").read_text()) == rows
    # a method that trains differently cannot reuse another's runs
    proto["methods"][1]["finetune"] = {**ft, "gamma": 5.0}
    (tmp_path / "p.json").write_text(json.dumps(proto))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: method vwsl-default cannot")
