import json
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest

from experiments.capture_experiment import CaptureProtocol
from experiments.common import build, fields_of, load_json_protocol
from experiments.cross_site import CrossSiteProtocol
from experiments.table1 import Table1Protocol, budget_epochs, run_config, versus, versus_markdown
from experiments.time_to_dice import TimeToDiceProtocol, variant_config
from experiments.vwsl_study import Protocol as VwslProtocol
from nca_jax.errors import ConfigError
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


def _phantom_sites(tmp_path: Path, n: int, seed: int, extra=lambda site, names: {}):
    """Two 32-px phantom sites under tmp_path/data and their split files under tmp_path/splits:
    train = the first 2 names, val the 3rd, test the 4th and 5th, then extra(site, names)
    ({part: names}, laid over those). -> (data, splits)."""
    data, splits = tmp_path / "data", tmp_path / "splits"
    splits.mkdir()
    for i, site in enumerate(("shenzhen", "montgomery")):
        write_phantom_folder(data / site, n=n, seed=seed + i, size=32)
        names = sorted(p.stem for p in (data / site / "images").iterdir())
        parts = {"train": names[:2], "val": names[2:3], "test": names[3:5], **extra(site, names)}
        for part, ns in parts.items():
            (splits / f"{site}_{part}.txt").write_text("\n".join(ns) + "\n")
    return data, splits


@pytest.mark.slow
def test_cross_site_runs_and_resumes_on_phantom_sites(tmp_path):
    data, splits = _phantom_sites(tmp_path, 6, 10, lambda site, names: {"finetune": names[5:]})
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
    shenzhen = sorted(p.stem for p in (data / "shenzhen" / "images").iterdir())
    (splits / "shenzhen_train.txt").write_text("\n".join(shenzhen) + "\n")  # the prior's P
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
    proto["results_name"] = "cap_named"  # results/cap_named.{json,md}, capture.* untouched
    (tmp_path / "p.json").write_text(json.dumps(proto))
    cmd = _command("capture_experiment.py", tmp_path, data, splits)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "results" / "capture.json").exists()
    assert (tmp_path / "results" / "cap_named.md").exists()
    rows = json.loads((tmp_path / "results" / "cap_named.json").read_text())
    keys = {"train_site", "test_site", "preset", "method", "n_finetune_images", "seed"}
    assert all(keys | {"dice_mean", "dice_std", "n"} <= set(row) for row in rows)
    assert {(r["preset"], r["method"], r["n_finetune_images"]) for r in rows} == {
        ("none", "med-nca", 0),
        ("severe", "med-nca", 0),
        ("severe", "vwsl", 3),
        ("severe", "vwsl", 1),
    }
    assert all(r["n"] == 3 for r in rows)
    # issue 14's results contract: the capture is the test site; runs with the safety net's
    # checks (the default check_every) report its label-free choice and verdict
    assert {r["test_site"] for r in rows if r["preset"] == "severe"} == {"montgomery-severe"}
    assert {r["selection"] for r in rows if r["method"] == "med-nca"} == {"last"}
    vw = [r for r in rows if r["method"] == "vwsl" and r["selection"] == "label-free"]
    assert len(vw) == 2
    assert all(r["verdict"] in ("adapted", "rolled back") and r["steps"] > 0 for r in vw)
    # a run whose net kept its last epoch is also the `last` row (the same evaluation)
    last = [r for r in rows if r["selection"] == "last" and r["method"] == "vwsl"]
    kept_last = [r for r in vw if r["verdict"] == "adapted" and r["selected_epoch"] == 1]
    assert sorted(r["dice_mean"] for r in last) == sorted(r["dice_mean"] for r in kept_last)
    assert last, [(r["verdict"], r["selected_epoch"]) for r in vw]  # the test needs one
    captured = tmp_path / "work" / "captured-montgomery-severe-s0"
    assert len(list((captured / "masks").iterdir())) == 6  # masks captured, never committed
    kept = tmp_path / "results" / "runs" / "cap_named-vwsl-shenzhen-to-montgomery-severe-n3"
    assert (kept / "weights.npz").exists() and not (kept / "uncertainty").exists()
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r2.returncode == 0
    assert json.loads((tmp_path / "results" / "cap_named.json").read_text()) == rows
    # vwsl-default names finetune.py's defaults: any other finetune section is refused
    (tmp_path / "p.json").write_text(json.dumps({**proto, "method": "vwsl-default"}))
    r3 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r3.returncode == 2 and "vwsl-default needs finetune.py's defaults" in r3.stderr
    # --publish-only computes nothing: with the finished units it writes the same rows; with a
    # fresh work folder, only the rows of what exists (none), and it captures no image
    (tmp_path / "p.json").write_text(json.dumps(proto))
    r4 = subprocess.run([*cmd, "--publish-only"], capture_output=True, text=True, cwd=ROOT)
    assert r4.returncode == 0, r4.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "cap_named.json").read_text()) == rows
    # with the prior, finished runs are re-decided from their recorded checks: a rollback
    # scores exactly the source's weights (nothing is computed under --publish-only)
    (tmp_path / "p.json").write_text(json.dumps({**proto, "prior": True}))
    r6 = subprocess.run([*cmd, "--publish-only"], capture_output=True, text=True, cwd=ROOT)
    assert r6.returncode == 0, r6.stderr[-3000:]
    with_prior = json.loads((tmp_path / "results" / "cap_named.json").read_text())
    before = next(r for r in rows if r["preset"] == "severe" and r["method"] == "med-nca")
    assert [r for r in with_prior if r["selection"] == "last"] == [
        r for r in rows if r["selection"] == "last"
    ]  # the prior changes which weights are kept, not what VWSL's last epoch scored
    for r in with_prior:
        old = next(
            o
            for o in rows
            if (o["preset"], o["method"], o["n_finetune_images"], o["selection"])
            == (r["preset"], r["method"], r["n_finetune_images"], r["selection"])
        )
        if r.get("verdict") == "rolled back":
            assert r["dice_mean"] == before["dice_mean"]
        elif r["selection"] == "label-free":
            assert r["selected_epoch"] == old["selected_epoch"] and r == old
    (tmp_path / "p.json").write_text(json.dumps(proto))
    fresh = [str(tmp_path / "fresh") if c == str(tmp_path / "work") else c for c in cmd]
    r5 = subprocess.run([*fresh, "--publish-only"], capture_output=True, text=True, cwd=ROOT)
    assert r5.returncode == 0, r5.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "cap_named.json").read_text()) == []
    assert not list((tmp_path / "fresh").glob("captured-*"))


@pytest.mark.slow
def test_time_to_dice_curves_and_cpu_projection(tmp_path):
    """Three tiny variants (one with a curriculum, one with level 1's loss) on a phantom
    'shenzhen'; the CPU projection is steps x the bench's seconds per step of each epoch's
    (batch, NCA steps, level-1 loss on), never a bench of another kind of step."""
    from experiments import time_to_dice

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
            "deep": {"model": tiny, "train": {**train, "level1_loss_weight": 1.0}},
        },
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    bench = []
    for steps, per, deep in ((4, 2.0, None), (2, 1.0, 0.0), (4, 3.0, 1.0)):
        bench.append(tmp_path / f"b{steps}-{deep}.json")
        d = {"steps": steps, "per_batch": {"2": {"train_step_s": per}}}
        if deep is not None:  # JSONs before session 24 have no level1_loss_weight
            d["level1_loss_weight"] = deep
        bench[-1].write_text(json.dumps(d))
    args = _command("time_to_dice.py", tmp_path, data, splits)[2:]
    assert time_to_dice.main([*args, "--cpu-bench", *map(str, bench)]) == 0
    rows = {
        r["variant"]: r
        for r in json.loads((tmp_path / "results" / "time_to_dice.json").read_text())
    }
    assert [q["step"] for q in rows["plain"]["curve"]] == [2, 4, 6]
    assert [q["cpu_train_s"] for q in rows["plain"]["curve"]] == [4.0, 8.0, 12.0]
    assert [q["cpu_train_s"] for q in rows["curr"]["curve"]] == [2.0, 6.0, 10.0]
    assert [q["cpu_train_s"] for q in rows["deep"]["curve"]] == [6.0, 12.0, 18.0]
    for q in rows["plain"]["curve"]:  # validated every epoch: wall = train + validation
        assert q["wall_s"] > q["train_s"] > 0
    assert rows["plain"]["reach_0"]["step"] == 2 and rows["plain"]["reach_1.01"] is None
    md = (tmp_path / "results" / "time_to_dice.md").read_text()
    assert "not reached" in md and "level 1's loss x 1" in md
    assert "Projected for: a CPU the JSON does not name" in md
    assert (tmp_path / "results" / "figures" / "time_to_dice.png").stat().st_size > 0
    # without the level-1 bench the deep variant gets no projection, not the plain step's
    assert time_to_dice.main([*args, "--publish-only", "--cpu-bench", *map(str, bench[:2])]) == 0
    rows = {
        r["variant"]: r
        for r in json.loads((tmp_path / "results" / "time_to_dice.json").read_text())
    }
    assert rows["deep"]["curve"][0]["cpu_train_s"] is None
    assert rows["plain"]["curve"][0]["cpu_train_s"] == 4.0
    # finished runs are not trained again; a missing bench entry gives no projection
    assert time_to_dice.main([*args, "--publish-only"]) == 0
    rows = json.loads((tmp_path / "results" / "time_to_dice.json").read_text())
    assert all(q["cpu_train_s"] is None for r in rows for q in r["curve"])


@pytest.mark.slow
def test_vwsl_study_runs_resumes_and_reports_every_method_and_selection(tmp_path):
    data, splits = _phantom_sites(  # each site's unlabelled fine-tuning split
        tmp_path, 8, 20, lambda s, names: {"finetune" if s == "shenzhen" else "train": names[5:7]}
    )
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
    assert {r["device"] for r in rows if r["method"] != "med-nca"} == {"cpu"}
    # vwsl-default reused the authors' runs: no run folder of its own
    assert not list((tmp_path / "work").glob("ft-vwsl-default-*"))
    lf = [r for r in rows if r["selection"] == "label-free"]
    assert all(r["verdict"] in ("adapted", "rolled back") for r in lf)
    roll = [r for r in lf if r["verdict"] == "rolled back"]
    base = {
        (r["train_site"], r["test_site"]): r["dice_mean"] for r in rows if r["method"] == "med-nca"
    }
    assert all(r["dice_mean"] == base[(r["train_site"], r["test_site"])] for r in roll)
    # the last epoch's snapshot IS weights_last: its evaluation is reused, never repeated
    assert not list((tmp_path / "work" / "evals").glob("*-e0002-on-*-k2.json"))
    last = {
        (r["train_site"], r["method"], r["seed"]): r["dice_mean"]
        for r in rows
        if r["selection"] == "last" and r["method"] != "med-nca"
    }
    at_end = [r for r in rows if r["selection"] != "last" and r.get("selected_epoch") == 2]
    assert at_end  # the oracle or the safety net chose the last epoch somewhere
    for r in at_end:
        assert r["dice_mean"] == last[(r["train_site"], r["method"], r["seed"])]
    md = (tmp_path / "results" / "vwsl.md").read_text()
    assert "| shenzhen | montgomery | vwsl-authors | 2 | last |" in md
    # 2 seeds of vwsl-default: the acceptance bar (3 seeds) cannot be judged yet
    assert "## Acceptance (issue 14)" in md
    assert any(
        ln.startswith("| shenzhen -> montgomery | 2 |") and ("not yet" in ln or "| no (" in ln)
        for ln in md.splitlines()
    )
    # resumable: a second invocation computes nothing new and gives the same rows
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "vwsl.json").read_text()) == rows
    # a method that trains differently cannot reuse another's runs
    proto["methods"][1]["finetune"] = {**ft, "gamma": 5.0}
    (tmp_path / "p.json").write_text(json.dumps(proto))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: method vwsl-default cannot")


# the committed protocols each script reads
PROTOCOLS = {
    CrossSiteProtocol: ("cross_site_cpu", "cross_site_cpu15", "cross_site_gpu"),
    CaptureProtocol: ("capture_cpu", "capture_strong_cpu"),
    TimeToDiceProtocol: ("time_to_dice",),
    VwslProtocol: ("vwsl_cpu", "vwsl_gpu"),
    Table1Protocol: ("table1_cpu",),
}


@pytest.mark.parametrize("cls,name", [(cls, n) for cls, names in PROTOCOLS.items() for n in names])
def test_committed_protocols_load_and_every_key_is_read(cls, name):
    path = ROOT / "configs" / f"{name}.json"
    proto = cls.load(path)
    raw = json.loads(path.read_text())
    assert {k for k in raw if not k.startswith("_")} <= {f.name for f in fields(cls)}
    if cls is TimeToDiceProtocol:
        assert proto.comment == raw["_comment"]
        for n, v in proto.variants.items():  # each variant's run config is valid
            variant_config(v, n)


def test_every_committed_protocol_is_checked():
    """Every configs/*.json that is not a run config (model / train / finetune sections) is a
    protocol listed above."""
    checked = {n for names in PROTOCOLS.values() for n in names}
    protocols = {
        p.stem
        for p in (ROOT / "configs").glob("*.json")
        if {k for k in json.loads(p.read_text()) if not k.startswith("_")}
        - {"model", "train", "finetune"}
    }
    assert protocols == checked


@pytest.mark.parametrize("cls,name", [(c, ns[0]) for c, ns in PROTOCOLS.items()])
def test_protocols_reject_an_unknown_key_naming_file_and_key(tmp_path, cls, name):
    raw = json.loads((ROOT / "configs" / f"{name}.json").read_text())
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**raw, "eval_sampels": 3}))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['eval_sampels'\]") as e:
        cls.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_protocols_reject_unknown_nested_keys_and_bad_types(tmp_path):
    path = tmp_path / "p.json"
    raw = json.loads((ROOT / "configs" / "cross_site_cpu.json").read_text())
    for bad, msg in (
        ({"finetune": {**raw["finetune"], "gama": 1.0}}, r"\[finetune\]: unknown.*'gama'"),
        ({"train_config": {"train": {"epoch": 1}}}, r"\[train_config\] \[train\]: unknown"),
        ({"n_finetune": "8"}, r"n_finetune must be of type int, got '8'"),
        ({"seeds": [0, True]}, r"seeds must be of type tuple\[int, \.\.\.\]"),
        ({"gamma_source": "shenzen"}, r"gamma_source must be one of"),
    ):
        path.write_text(json.dumps({**raw, **bad}))
        with pytest.raises(ConfigError, match=msg):
            CrossSiteProtocol.load(path)
    ttd = json.loads((ROOT / "configs" / "time_to_dice.json").read_text())
    ttd["variants"]["paper"]["abuot"] = "x"
    path.write_text(json.dumps(ttd))
    with pytest.raises(ConfigError, match=r"\[variants.paper\]: unknown field\(s\) \['abuot'\]"):
        TimeToDiceProtocol.load(path)
    path.write_text(json.dumps({"variants": {}, "comment": "x"}))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['comment'\]"):
        TimeToDiceProtocol.load(path)
    t1 = json.loads((ROOT / "configs" / "table1_cpu.json").read_text())
    for bad, msg in (
        (0, r"phone_threads must be a whole number >= 1, got 0"),
        (1.5, r"phone_threads must be of type int \| None, got 1.5"),
        (True, r"phone_threads must be of type int \| None, got True"),
    ):
        path.write_text(json.dumps({**t1, "phone_threads": bad}))
        with pytest.raises(ConfigError, match=msg):
            Table1Protocol.load(path)
    cap = json.loads((ROOT / "configs" / "capture_cpu.json").read_text())
    path.write_text(json.dumps({**cap, "presets": ["sever"]}))
    with pytest.raises(ConfigError, match=r"unknown preset\(s\) \['sever'\]"):
        CaptureProtocol.load(path)
    del cap["source_run"]
    path.write_text(json.dumps(cap))
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['source_run'\]"):
        CaptureProtocol.load(path)


def test_json_protocol_errors_are_one_line_naming_the_file(tmp_path):
    for text, msg in (
        (None, "no such protocol file"),
        ("{", "not a readable protocol"),
        ("[1]", "expected a JSON object"),
    ):
        path = tmp_path / "p.json"
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError, match=msg) as e:
            load_json_protocol(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_build_defaults_comments_and_tuples():
    @dataclass(frozen=True)
    class P:
        n: int
        xs: tuple[float, ...] = (1.0,)
        stop: float | None = None

    p = build(P, {"_note": "ignored", "n": 2, "xs": [0, 2.5]}, "w")
    assert p == P(2, (0, 2.5)) and isinstance(p.xs, tuple)
    assert fields_of(P, {"_c": 1, "n": 1}, "w") == {"n": 1}
    with pytest.raises(ConfigError, match=r"w: stop must be of type float \| None"):
        build(P, {"n": 1, "stop": "no"}, "w")
    with pytest.raises(ConfigError, match=r"w: expected a JSON object"):
        fields_of(P, [1], "w")


@pytest.mark.slow
def test_scripts_run_as_files_and_as_modules_without_sys_path_inserts(tmp_path):
    """The experiments are a package: `python experiments/X.py` and `python -m experiments.X`
    both import experiments.common from anywhere, with no sys.path insert or hand-made
    argparse.Namespace left in experiments/ or this file."""
    insert, namespace = "sys.path" + ".insert", "argparse.Namespace" + "("
    for path in [*(ROOT / "experiments").glob("*.py"), Path(__file__)]:
        text = path.read_text()
        assert insert not in text and namespace not in text, path
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"variants": {}, "stop_at": 0.9, "target": [0.5]}))
    for cmd in (
        [sys.executable, str(ROOT / "experiments" / "time_to_dice.py")],
        [sys.executable, "-m", "experiments.time_to_dice"],
    ):
        r = subprocess.run(
            [*cmd, "--protocol", str(bad)], capture_output=True, text=True, cwd=tmp_path
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip() == f"error: {bad}: unknown field(s) ['target']"


def test_table1_budget_becomes_whole_epochs_per_model():
    """60 minutes at 2.5 s per step and 12 steps per epoch is 120 epochs; a model slower than
    the budget still gets one epoch; the run config carries the epochs, the seed and as many
    validations (each with a checkpoint) as the protocol asks."""
    assert budget_epochs(2.5, 12, 60.0) == 120
    assert budget_epochs(2.51, 12, 60.0) == 119
    assert budget_epochs(1000.0, 12, 60.0) == 1
    p = Table1Protocol.load(ROOT / "configs" / "table1_cpu.json")
    calib = {"models": {"med-nca": {"step_s": 2.5}, "unet": {"step_s": 15.0}}}
    cfg = run_config(p, "med-nca", 1, calib)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (120, 4, 1)
    assert cfg.train.eval_every == cfg.train.checkpoint_every == 120 // p.validations
    unet = run_config(p, "unet", 0, calib)
    assert (unet.model.kind, unet.train.loss, unet.train.lr) == ("unet", "dice_focal", 1e-4)
    assert unet.train.epochs == 20 and unet.train.eval_every == 1
    with pytest.raises(ConfigError, match="no step time for model 'unet-small'"):
        run_config(p, "unet-small", 0, calib)


def test_table1_versus_reads_each_seed_against_twice_its_standard_error():
    """Med-NCA minus each other model, on the seeds both trained; a seed is ahead or behind only
    outside 2 x sqrt(std_a^2/n_a + std_b^2/n_b); VWSL-study rows are not compared."""

    def row(model, train, test, seed, dice, std=0.1, n=25, hd95=10.0):
        return {
            "model": model,
            "train_site": train,
            "test_site": test,
            "seed": seed,
            "dice_mean": dice,
            "dice_std": std,
            "n": n,
            "hd95_mean": hd95,
        }

    rows = [
        row("med-nca", "shenzhen", "shenzhen", 0, 0.90),
        row("med-nca", "shenzhen", "shenzhen", 1, 0.91),
        row("unet", "shenzhen", "shenzhen", 0, 0.80, hd95=4.0),
        row("unet", "shenzhen", "shenzhen", 1, 0.85, hd95=6.0),
        row("unet", "shenzhen", "shenzhen", 2, 0.10),  # no Med-NCA seed 2: not compared
        row("med-nca", "shenzhen", "montgomery", 0, 0.70),
        row("med-nca", "shenzhen", "montgomery", 1, 0.60),
        row("unet", "shenzhen", "montgomery", 0, 0.65),  # +0.05 < 2 x 0.0283: noise
        row("unet", "shenzhen", "montgomery", 1, 0.70),  # -0.10: behind
        row("unet-small", "shenzhen", "montgomery", 0, 0.69),
        row("med-nca", "montgomery", "montgomery", 0, 0.80),
        row("unet-small", "montgomery", "montgomery", 0, 0.95, std=0.01, n=100),
        row("med-nca+vwsl", "shenzhen", "montgomery", 0, 0.99),
    ]
    vs = versus(rows)
    got = {(v["train_site"], v["test_site"], v["against"]): v for v in vs}
    assert list(got) == [
        ("shenzhen", "shenzhen", "unet"),
        ("shenzhen", "montgomery", "unet"),
        ("shenzhen", "montgomery", "unet-small"),
        ("montgomery", "montgomery", "unet-small"),
    ]
    a = got[("shenzhen", "shenzhen", "unet")]
    assert a["seeds"] == [0, 1] and a["reading"] == "ahead on every seed"
    assert a["dice_delta"] == pytest.approx([0.10, 0.06])
    assert a["dice_delta_2se"] == pytest.approx([2 * (0.02 / 25) ** 0.5] * 2)
    assert a["dice_delta_mean"] == pytest.approx(0.08)
    assert a["hd95_delta_mean"] == pytest.approx(5.0)
    assert got[("shenzhen", "montgomery", "unet")]["reading"] == "mixed"
    assert got[("shenzhen", "montgomery", "unet-small")]["reading"] == "within noise"
    behind = got[("montgomery", "montgomery", "unet-small")]
    assert behind["reading"] == "behind on every seed"
    assert behind["dice_delta_2se"] == pytest.approx([2 * (0.01 / 25 + 0.0001 / 100) ** 0.5])
    md = "\n".join(
        versus_markdown(
            rows,
            {"med-nca": 100, "unet": 1000},
            {
                "med-nca": {"tflite_bytes": 2e6, "tflite_infer_s": 2.0, "tflite_train_s": 1.0},
                "unet": {"tflite_bytes": 8e6, "tflite_infer_s": 1.0, "tflite_train_s": 3.0},
            },
        )
    )
    assert "| shenzhen | shenzhen | unet | 0,1 | +0.100 ± 0.057, +0.060 ± 0.057 |" in md
    assert "| unet | 10.00 | 4.00 | 0.50 | 3.00 |" in md
    assert versus([r for r in rows if r["model"] != "med-nca"]) == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--sites", "Montgomery", r"no site\(s\) \['Montgomery'\]; its sites are \['shenzhen'"),
        ("--models", "unet-tiny", r"no model\(s\) \['unet-tiny'\]"),
    ],
)
def test_table1_names_an_unknown_site_or_model_before_any_work(tmp_path, flag, value, message):
    """A mistyped site (the protocol's are lower case) stops at once with the known ones, not
    with a missing split file after compiling."""
    from experiments.table1 import main

    args = ["--protocol", str(ROOT / "configs" / "table1_cpu.json"), flag, value]
    with pytest.raises(ConfigError, match=message):
        main([*args, "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_table1_trains_every_model_tests_both_sites_times_the_phone_and_resumes(tmp_path):
    data, splits = _phantom_sites(tmp_path, 6, 30)
    train = {"batch_size": 2, "image_size": 32}
    proto = {
        "models": {
            "med-nca": {
                "model": {"channels": 8, "hidden": 16, "steps": 2, "patch": 8},
                "train": train,
            },
            "unet-small": {
                "model": {"kind": "unet", "unet_blocks": 2, "unet_channels": 4},
                "train": train,
            },
        },
        "calibration": str(tmp_path / "calib.json"),
        "budget_minutes": 1e-6,  # below one epoch: each model trains exactly 1
        "seeds": [0],
        "n_train": 2,
        "eval_samples": 2,
        "phone_size": 32,
        "phone_reps": 1,
        "phone_threads": 2,
        "vwsl": str(tmp_path / "vwsl.json"),
    }
    (tmp_path / "p.json").write_text(json.dumps(proto))
    vwsl = {
        "train_site": "shenzhen",
        "test_site": "montgomery",
        "method": "vwsl-default",
        "selection": "label-free",
        "seed": 0,
        "dice_mean": 0.5,
        "dice_std": 0.1,
        "n": 2,
    }
    (tmp_path / "vwsl.json").write_text(json.dumps([vwsl, {**vwsl, "selection": "oracle"}]))
    cmd = _command("table1.py", tmp_path, data, splits)
    r = subprocess.run(
        [*cmd, "--calibrate", str(tmp_path / "calib.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    calib = json.loads((tmp_path / "calib.json").read_text())
    assert set(calib["models"]) == {"med-nca", "unet-small"}
    assert {n: c["params"] for n, c in calib["models"].items()} == {
        "med-nca": 3456,
        "unet-small": 1921,
    }
    r = subprocess.run([*cmd, "--phone"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    early = json.loads((tmp_path / "results" / "table1.json").read_text())
    assert [x["model"] for x in early] == ["med-nca+vwsl"]  # --phone trained nothing
    for m in ("med-nca", "unet-small"):  # the inference-only file a phone predicts with
        fz = json.loads((tmp_path / "work" / f"phone-frozen-{m}.json").read_text())
        assert fz["threads"] == 2 and fz["tflite_infer_s"] > 0 and fz["jax_infer_s"] > 0
        assert "tflite_train_s" not in fz and fz["batch"] == 1 and fz["size"] == 32
        trainable = json.loads((tmp_path / "work" / f"phone-{m}.json").read_text())
        assert fz["tflite_bytes"] < trainable["tflite_bytes"]  # no optimizer, no train graph
        assert trainable["threads"] == 2 and trainable["cpu_model"] == fz["cpu_model"] != ""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "results" / "table1.json").read_text())
    mine = [x for x in rows if x["model"] != "med-nca+vwsl"]
    assert {(x["model"], x["train_site"], x["test_site"]) for x in mine} == {
        (m, s, t)
        for m in ("med-nca", "unet-small")
        for s in ("shenzhen", "montgomery")
        for t in ("shenzhen", "montgomery")
    }
    assert all(x["epochs"] == 1 and x["n"] == 2 and x["tflite_train_s"] > 0 for x in mine)
    assert {x["device"] for x in mine} == {"cpu"}  # minutes on an accelerator are marked
    for x in mine:  # the budget used, in calibrated CPU minutes, and the measured minutes
        step_s = calib["models"][x["model"]]["step_s"]
        assert x["train_minutes"] == pytest.approx(x["steps"] * step_s / 60)
        assert x["measured_train_minutes"] > 0
    assert all(x["best_epoch"] == 0 for x in mine)  # one epoch: its only validation
    assert {x["samples"] for x in mine if x["model"] == "unet-small"} == {1}  # deterministic
    assert {x["samples"] for x in mine if x["model"] == "med-nca"} == {2}
    # only vwsl-default with label-free selection is taken from the VWSL study
    assert [(x["model"], x["dice_mean"]) for x in rows if x not in mine] == [("med-nca+vwsl", 0.5)]
    md = (tmp_path / "results" / "table1.md").read_text()
    assert "| shenzhen | unet-small |" in md and "| shenzhen | med-nca+vwsl |" in md
    assert " (1 of 1) |" in md  # each seed's best validation Dice and its epoch
    assert "| unet-small | 1,921 |" in md  # the phone column alone
    assert "px, 2 LiteRT threads;" in md  # the protocol's thread count for trainable files
    versus_rows = json.loads((tmp_path / "results" / "table1_versus.json").read_text())
    assert len(versus_rows) == 4  # med-nca against unet-small, train x test site
    assert "## med-nca against each UNet" in md and "| unet-small | 0.56 |" in md
    assert "frozen infer s (JAX)" in md and "frozen infer s (x)" in md
    assert ", 2 threads |" in md  # each model's frozen file in the phone table
    # resumable: a second invocation computes nothing and gives the same rows
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "table1.json").read_text()) == rows


def test_vwsl_study_takes_contract_rows_of_captures_and_judges_the_bars(tmp_path):
    """Capture rows with a selection (issue 14's contract) join vwsl.json, legacy rows do not;
    the acceptance table judges 3 seeds per direction (+1.5 mean, no run below -0.5) and the
    moderate captures (+5 mean)."""
    from experiments.vwsl_study import Protocol, acceptance, capture_rows

    def r(tgt, method, sel, seed, dice, n=50):
        return {
            "train_site": "shenzhen",
            "test_site": tgt,
            "method": method,
            "selection": sel,
            "seed": seed,
            "dice_mean": dice,
            "n_target_images": n,
        }

    cap = [
        r("montgomery-moderate", "med-nca", "last", 0, 0.60, 0),
        r("montgomery-moderate", "vwsl-default", "label-free", 0, 0.66, 5),
        r("montgomery-moderate", "vwsl-default", "label-free", 1, 0.64, 5),
    ]
    for c in cap:
        c["preset"] = "moderate"
    legacy = {k: v for k, v in cap[0].items() if k != "selection"}
    clean = {**cap[0], "test_site": "montgomery", "preset": "none"}  # the study scores it
    (tmp_path / "cap.json").write_text(json.dumps([*cap, legacy, clean]))
    p = Protocol(
        sources={},
        methods=(),
        directions=(("shenzhen", "montgomery"),),
        captures=(str(tmp_path / "cap.json"), str(tmp_path / "absent.json")),
    )
    assert capture_rows(p) == cap
    rows = [
        r("montgomery", "med-nca", "last", 0, 0.800, 0),
        r("montgomery", "vwsl-default", "label-free", 0, 0.820),
        r("montgomery", "vwsl-default", "label-free", 1, 0.818),
        r("montgomery", "vwsl-default", "label-free", 2, 0.812),
        *cap,
    ]
    table = "\n".join(acceptance(rows, p))
    assert "| shenzhen -> montgomery | 3 | +1.67 | +1.20 | yes | 0 |" in table
    assert (
        "| shenzhen -> montgomery-moderate (5 images; bar +5) | 2 | +5.00 | +4.00 | yes |" in table
    )
    rows[3]["dice_mean"] = 0.794  # one run loses 0.6 points: the bar is missed
    assert "| 3 | +1.07 | -0.60 | no |" in "\n".join(acceptance(rows, p))


def test_vwsl_study_names_each_run_fine_tuned_on_an_accelerator():
    """Runs fine-tuned off this CPU are named with their direction and seed, once each (all
    selections of a run share its device); a table of CPU runs says nothing."""
    from experiments.vwsl_study import accelerator_lines

    def r(seed, device, sel="last"):
        return {
            "method": "vwsl-authors",
            "train_site": "a",
            "test_site": "b",
            "seed": seed,
            "selection": sel,
            "device": device,
        }

    rows = [r(0, "cpu"), r(1, None), r(2, "H200"), r(2, "H200", "oracle")]
    assert accelerator_lines(rows) == [
        "",
        "Fine-tuned on an accelerator (same protocol; wall times are its own): "
        "vwsl-authors a -> b seed 2 on H200.",
    ]
    assert accelerator_lines(rows[:2]) == []


def test_vwsl_spread_lines_summarise_each_checked_run_once():
    """The 'what the variance maps show' lines: source -> last check spread and Dice, and the
    correlation over the checks; a reused run is listed once, a run without checks not at all."""
    from experiments.vwsl_study import spread_lines

    run = {
        "run": "ft-a",
        "source_check": {"quality": 0.20, "area": 0.3, "agreement": 0.8},
        "points": [
            {"epoch": 0, "dice": 0.70},
            {"epoch": 10, "dice": 0.71},
            {"epoch": 20, "dice": 0.72, "check_quality": 0.18},
            {"epoch": 40, "dice": 0.74, "check_quality": 0.15},
        ],
    }
    unchecked = {"run": "ft-b", "source_check": None, "points": [{"epoch": 0, "dice": 0.7}]}
    lines = spread_lines([run, dict(run), unchecked])
    runs = [ln for ln in lines if ln.startswith("- ")]
    assert runs == [
        "- ft-a: spread 0.2000 (source) -> 0.1500 (epoch 40, -25%); Dice 0.700 -> 0.740; "
        "correlation of spread and Dice over the checks -0.99"
    ]
    assert spread_lines([unchecked]) == []


def test_rollout_vjp_prototype_gives_autodiffs_gradients():
    """The (slower) whole-rollout VJP prototype of results/README.md computes the same gradients
    as autodiff through model.rollout, on a tiny level (weights whose gradient batch norm makes
    zero are compared in absolute terms)."""
    import jax
    import jax.numpy as jnp

    from experiments.prototypes.rollout_vjp import losses, problem
    from nca_jax.config import ModelConfig

    cfg = ModelConfig(channels=8, hidden=16, steps=4)
    args = problem(cfg, 2, 12)
    ref, new = losses(cfg)
    a = jax.grad(ref, argnums=(0, 1))(*args)
    b = jax.grad(new, argnums=(0, 1))(*args)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(a))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert float(jnp.max(jnp.abs(x - y))) <= 1e-5 * scale


def test_source_val_probe_scores_the_median_mask_and_tallies_agreement():
    """median_dice thresholds the per-pixel median of the samples (not each sample); the table
    compares each snapshot with epoch 0 of the same run and key seed."""
    from experiments.source_val_probe import markdown, median_dice

    probs = np.zeros((3, 1, 2, 2))
    probs[:, 0, 0, 0] = [0.9, 0.8, 0.1]  # median 0.8: in the mask
    probs[:, 0, 0, 1] = [0.9, 0.1, 0.1]  # median 0.1: out
    labels = np.array([[[1, 1], [0, 0]]], bool)
    assert median_dice(probs, labels) == pytest.approx(2 * 1 / (1 + 2))

    rows = [
        {"run": "r", "seed": 0, "epoch": 0, "dev_dice": 0.80, "src_dice": 0.90},
        {"run": "r", "seed": 0, "epoch": 20, "dev_dice": 0.78, "src_dice": 0.89},  # both down
        {"run": "r", "seed": 0, "epoch": 40, "dev_dice": 0.82, "src_dice": 0.88},  # opposite
        {"run": "r", "seed": 1, "epoch": 0, "dev_dice": 0.70, "src_dice": 0.50},
        {"run": "r", "seed": 1, "epoch": 20, "dev_dice": 0.71, "src_dice": 0.51},  # both up
    ]
    md = markdown(rows, images=1, samples=3, seeds=[0, 1])
    assert "| r | 0 | 20 | 0.7800 | 0.8900 | -2.00 | -1.00 | yes |" in md
    assert "| r | 0 | 40 | 0.8200 | 0.8800 | +2.00 | -2.00 | no |" in md
    assert "| r | 1 | 20 | 0.7100 | 0.5100 | +1.00 | +1.00 | yes |" in md
    assert "in 2 of 3 snapshots" in md


def test_source_val_probe_borrows_epoch_0_only_from_the_same_target_and_key():
    from experiments.source_val_probe import markdown, target_of

    a, b = "ft-vwsl-authors-shenzhen-to-montgomery-s0", "ft-pseudo-label-shenzhen-to-montgomery-s2"
    assert target_of(a) == target_of(b) == "montgomery"
    assert target_of("ft-entropy-montgomery-to-shenzhen-s1") == "shenzhen"
    rows = [
        {"run": a, "seed": 0, "epoch": 0, "dev_dice": 0.5, "src_dice": 0.9},
        {"run": b, "seed": 0, "epoch": 100, "dev_dice": 0.4, "src_dice": 0.8},
    ]
    assert f"| {b} | 0 | 100 | 0.4000 | 0.8000 | -10.00 | -10.00 | yes |" in markdown(
        rows, 1, 1, [0]
    )
    other = [
        {
            "run": "ft-x-montgomery-to-shenzhen-s0",
            "seed": 0,
            "epoch": 0,
            "dev_dice": 0.5,
            "src_dice": 0.9,
        },
        rows[1],
    ]
    with pytest.raises(ValueError, match="no epoch-0 row"):
        markdown(other, 1, 1, [0])


def test_prior_share_rule_keeps_only_checks_that_move_towards_the_source_sites_share():
    """The anatomical-prior candidate (experiments/prior_share_probe.py): a check passes when its
    lung share is no farther from the prior than the source model's; with the default net both
    must pass; no passing check = rolled back (None)."""
    from experiments.prior_share_probe import decide, prior_ok

    assert prior_ok(0.26, 0.30, 0.25) and prior_ok(0.24, 0.26, 0.25)
    assert not prior_ok(0.31, 0.30, 0.25)  # moves away from the prior: rejected
    assert not prior_ok(0.23, 0.24, 0.25)  # under-segmenting further: rejected
    checks = [
        {"epoch": 20, "area": 0.28, "acceptable": True},
        {"epoch": 40, "area": 0.26, "acceptable": False},
        {"epoch": 60, "area": 0.31, "acceptable": True},
    ]
    assert decide(checks, 0.30, 0.25) == {"default": 60, "prior": 40, "default+prior": 20}
    growing = [{"epoch": 20, "area": 0.305, "acceptable": True}]
    assert decide(growing, 0.30, 0.25) == {"default": 20, "prior": None, "default+prior": None}


def test_prior_share_probe_judges_a_capture_unit_only_where_its_weights_were_scored(tmp_path):
    """A capture unit's test Dice exists for the net's choice only: a rule that keeps that epoch
    gets its gain, rolling back gets 0, any other epoch gets None (not scored)."""
    from experiments.prior_share_probe import capture_rows

    checks = [
        {"epoch": 20, "area": 0.28, "acceptable": True},
        {"epoch": 40, "area": 0.32, "acceptable": True},
    ]
    unit = {"verdict": "adapted", "criterion": {"source": {"area": 0.30}, "checks": checks}}
    (tmp_path / "vwsl-moderate-n16-s0.json").write_text(json.dumps(unit))
    (tmp_path / "eval-moderate-before-s0.json").write_text(json.dumps({"dice_mean": 0.60}))
    (tmp_path / "eval-moderate-vwsl-n16-s0.json").write_text(json.dumps({"dice_mean": 0.58}))
    (row,) = capture_rows(tmp_path, prior=0.25)
    assert row["kept"] == {"default": 40, "prior": 20, "default+prior": 20}
    assert row["gain"]["default"] == pytest.approx(-2.0) and row["gain"]["prior"] is None
    assert row["gain_last"] == pytest.approx(-2.0)
    checks[0]["area"] = 0.31  # now every check moves away from the prior: rolled back
    (tmp_path / "vwsl-moderate-n16-s0.json").write_text(json.dumps(unit))
    assert capture_rows(tmp_path, prior=0.25)[0]["gain"]["default+prior"] == 0.0


def test_rechoose_applies_another_rule_to_the_checks_a_decision_recorded():
    """A net that differs only in its rule (here the prior) re-decides from the recorded
    figures; the same rule gives the same decision."""
    from experiments.common import rechoose
    from nca_jax.config import FinetuneConfig
    from nca_jax.guard import choose

    src = {"area": 0.30, "quality": 0.20, "agreement": 0.9, "stray": 0.1}
    checks = [
        {"epoch": 20, "area": 0.28, "quality": 0.19, "agreement": 0.9, "stray": 0.1},
        {"epoch": 40, "area": 0.32, "quality": 0.18, "agreement": 0.9, "stray": 0.1},
    ]
    d = choose(checks, src, FinetuneConfig())
    assert d["epoch"] == 40 and rechoose(d, FinetuneConfig()) == d
    with_prior = rechoose(d, FinetuneConfig(prior_share=0.25))
    assert with_prior["epoch"] == 20 and with_prior["criterion"]["source"] == src


def test_vwsl_study_methods_take_the_prior_from_the_default_unless_told(monkeypatch):
    """Method.prior None follows finetune.py's default (guard.PRIOR_BY_DEFAULT); the prior is
    a safety-net field, so a method with it still reuses the runs of one without."""
    from experiments import vwsl_study as vs

    proto = VwslProtocol(sources={}, methods=(), directions=())
    plain, told = vs.Method(name="a"), vs.Method(name="b", prior=True)
    monkeypatch.setattr(vs, "PRIOR_BY_DEFAULT", False)
    assert vs.finetune_config(plain, 0, proto, "", 0.252).prior_share == 0.0
    assert vs.finetune_config(told, 0, proto, "", 0.252).prior_share == 0.252
    monkeypatch.setattr(vs, "PRIOR_BY_DEFAULT", True)
    a = vs.finetune_config(plain, 0, proto, "", 0.252)
    assert a.prior_share == 0.252
    assert vs.training_fields(a) == vs.training_fields(vs.finetune_config(told, 0, proto, "", 0))
    assert vs.check_tag(a) == "default"  # the same checks: only the rule differs


def test_record_train_share_adds_train_pys_share_to_an_older_run(tmp_path, tiny_cfg):
    """experiments/record_train_share.py: the share train.py would have recorded (mask pixels
    > 0.5 of the training split at the run's size), added to run.json with the rest kept; a
    split of another size than the run's n_train is refused, naming the file."""
    from experiments.common import load_site
    from experiments.record_train_share import record_share
    from nca_jax.config import save_config
    from nca_jax.errors import RunError

    data, splits, run = tmp_path / "data", tmp_path / "splits", tmp_path / "run"
    write_phantom_folder(data / "shenzhen", n=4, seed=3, size=32)
    names = sorted(p.stem for p in (data / "shenzhen" / "images").iterdir())
    splits.mkdir()
    (splits / "shenzhen_train.txt").write_text("\n".join(names[:3]) + "\n")
    (splits / "shenzhen_val.txt").write_text(names[3] + "\n")
    run.mkdir()
    save_config(tiny_cfg, run / "config.json")
    (run / "run.json").write_text(json.dumps({"n_train": 3, "best_epoch": 7}))
    share = record_share(run, data, splits, "shenzhen", "shenzhen_train")
    masks = load_site(data, splits, "shenzhen", "shenzhen_train", 32).masks
    assert share == float(np.mean(masks > 0.5)) and 0.0 < share < 1.0
    summary = json.loads((run / "run.json").read_text())
    assert summary["train_mask_share"] == share and summary["best_epoch"] == 7
    with pytest.raises(RunError, match="run.json: n_train 3 but shenzhen_val has 1"):
        record_share(run, data, splits, "shenzhen", "shenzhen_val")
    with pytest.raises(RunError, match="run.json: missing"):
        record_share(tmp_path / "nothing", data, splits, "shenzhen", "shenzhen_train")


def test_litert_infer_chunks_prototype_computes_the_scans_mlp():
    """The written-out blocks of the LiteRT prototype (results/README.md, session 27) give the
    library's chunked forward exactly, with a last block shorter than the others and with more
    than four blocks (the concatenation in groups)."""
    import jax

    from experiments.prototypes.litert_infer_chunks import unrolled_chunks_fwd
    from nca_jax import mlp

    k = jax.random.split(jax.random.key(0), 4)
    xc, wf = jax.random.normal(k[0], (300, 6)), jax.random.normal(k[1], (6, 8))
    c, w2 = jax.random.normal(k[2], (8,)), jax.random.normal(k[3], (8, 3))
    for chunk in (32, 128, 300):
        got = unrolled_chunks_fwd(xc, wf, c, w2, chunk)
        ref = mlp._chunks_fwd(xc, wf, c, w2, chunk)
        assert got.shape == (300, 3)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-5)


def test_litert_infer_fired_prototype_equals_the_librarys_fired_mlp():
    """The prototype's fired-rows MLP in LiteRT-friendly ops (results/README.md, session 27) is
    the library's MLP times the fire mask (a Bernoulli(0.5) mask, fewer than the slots), with
    the library's gradients, and the plain MLP without a mask."""
    import jax
    import jax.numpy as jnp

    from experiments.prototypes.litert_infer_fired import slots_only_mlp
    from nca_jax import mlp

    k = jax.random.split(jax.random.key(0), 5)
    n = 2048
    x = jax.random.normal(k[0], (n, 6)) + 3.0
    w1, w2 = jax.random.normal(k[1], (6, 8)), jax.random.normal(k[2], (8, 3))
    scale, shift = jax.random.uniform(k[3], (8,)) + 0.5, jax.random.normal(k[4], (8,))
    fired = jax.random.bernoulli(jax.random.key(1), 0.5, (n,)).astype(np.float32)
    assert mlp.fired_capacity(n, 0.5) < n  # the slots are used
    every = mlp.cell_mlp_folded(x, w1, 0.0, scale, shift, w2, 1e-5)
    got = slots_only_mlp(x, w1, 0.0, scale, shift, w2, 1e-5, chunk=0, fired=fired)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(every * fired[:, None]), rtol=1e-5, atol=1e-5
    )
    got = slots_only_mlp(x, w1, 0.0, scale, shift, w2, 1e-5, chunk=0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(every), rtol=1e-6)
    # its backward: the gradients of the library's fired path (gathered rows, chunks of 256)
    t = jax.random.normal(jax.random.key(2), (n, 3))

    def loss(f, x, w1, scale, shift, w2):
        out = f(x, w1, jnp.zeros(8), scale, shift, w2, 1e-5, chunk=256, fired=fired)
        return jnp.sum(jnp.tanh(out) * t)

    args = (x, w1, scale, shift, w2)
    want = jax.grad(lambda *a: loss(mlp.folded_mlp, *a), argnums=range(5))(*args)
    have = jax.grad(lambda *a: loss(slots_only_mlp, *a), argnums=range(5))(*args)
    for h, w in zip(have, want, strict=True):
        np.testing.assert_allclose(np.asarray(h), np.asarray(w), rtol=2e-4, atol=2e-4)
