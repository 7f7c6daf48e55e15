"""The label-free safety net (nca_jax/guard.py) and its use in finetune.py."""

import json
import math

import numpy as np
import pytest

from nca_jax.config import ConfigError, FinetuneConfig
from nca_jax.errors import RunError
from nca_jax.guard import (
    VERDICTS,
    choose,
    judge,
    label_free_check,
    moment_check,
    prior_ok,
    verdict_line,
)

SOURCE = {"area": 0.25, "quality": 0.20, "agreement": 0.90, "stray": 0.10}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Med-NCA trained long enough on phantoms to mark some lung (source area > 0)."""
    from nca_jax.config import ModelConfig, RunConfig, TrainConfig
    from nca_jax.phantoms import make_phantom_dataset
    from nca_jax.training import train_and_evaluate

    cfg = RunConfig(
        model=ModelConfig(channels=8, hidden=16, steps=4, patch=16),
        train=TrainConfig(epochs=30, batch_size=4, image_size=32, lr=1e-2, checkpoint_every=30),
    ).validate()
    out = tmp_path_factory.mktemp("run") / "run"
    train_and_evaluate(cfg, make_phantom_dataset(8, seed=1, size=32), out, progress=False)
    return out


def test_label_free_check_exact_values_on_a_tiny_input():
    # 2 images of 2 x 2 pixels, 3 samples
    probs = np.zeros((3, 2, 2, 2))
    probs[:, 0, 0, 0] = [0.9, 0.8, 0.1]  # median 0.8 -> foreground; masks 1, 1, 0
    probs[:, 1] = 0.0  # image 1: all empty in every sample
    c = label_free_check(probs)
    assert c["area"] == pytest.approx((1 / 4 + 0) / 2)
    # image 0: std of (0.9, 0.8, 0.1) / mean sum; image 1: 0 / 0 -> 0
    p = np.array([0.9, 0.8, 0.1])
    assert c["quality"] == pytest.approx((p.std() / p.mean() + 0.0) / 2)
    # image 0 pairs: (1,1) dice 1, (1,0) 0, (1,0) 0 -> 1/3; image 1: all empty -> 1
    assert c["agreement"] == pytest.approx((1 / 3 + 1) / 2)
    assert c["stray"] == 0.0  # one pixel: one part, nothing outside the two largest
    with pytest.raises(ValueError, match="S >= 2"):
        label_free_check(probs[:1])


def test_moment_check_is_the_check_from_the_mean_and_std_a_phone_gets():
    """The device's check (from `sample`'s mean and std maps): quality exactly as from the
    samples, area the 0.5-threshold of the mean, no agreement."""
    probs = np.zeros((3, 2, 2, 2))
    probs[:, 0, 0, 0] = [0.9, 0.8, 0.1]  # mean 0.6 -> foreground
    probs[:, 0, 1, 1] = [0.6, 0.6, 0.0]  # mean 0.4, median 0.6: only the median marks it
    c = moment_check(probs.mean(0), probs.std(0))
    assert set(c) == {"area", "quality", "stray"}
    assert c["area"] == pytest.approx((1 / 4 + 0) / 2)  # the median's share would be 2/4
    assert label_free_check(probs)["area"] == pytest.approx((2 / 4 + 0) / 2)
    assert c["quality"] == pytest.approx(label_free_check(probs)["quality"])
    with pytest.raises(ValueError, match="one shape"):
        moment_check(probs.mean(0), probs.std(0)[:1])
    assert verdict_line(choose([{"epoch": 2, **c}], c, FinetuneConfig())).startswith(
        "adapted: weights of epoch 2"
    )


def test_judge_catches_collapse_and_flood_and_no_gain():
    fc = FinetuneConfig()
    assert judge({"area": 0.24, "quality": 0.1, "agreement": 1}, SOURCE, fc) == []
    empty = judge({"area": 0.0, "quality": 0.0, "agreement": 1}, SOURCE, fc)
    assert len(empty) == 1 and "x0.00" in empty[0]
    flood = judge({"area": 0.40, "quality": 0.1, "agreement": 1}, SOURCE, fc)
    assert len(flood) == 1 and "x1.60" in flood[0]
    worse = judge({"area": 0.25, "quality": 0.21, "agreement": 1}, SOURCE, fc)
    assert len(worse) == 1 and "quality score" in worse[0]
    strict = FinetuneConfig(min_quality_gain=0.6)
    assert judge({"area": 0.25, "quality": 0.1, "agreement": 1}, SOURCE, strict)


def test_label_free_check_stray_is_of_the_median_mask():
    probs = np.zeros((3, 1, 8, 8))
    probs[:, 0, 0:3, 0:3] = 1.0  # 9 px in every sample
    probs[:, 0, 0:3, 5:8] = 1.0  # 9 px
    probs[:2, 0, 6, 6] = 1.0  # a fragment in 2 of 3 samples: in the median
    probs[:1, 0, 7, 0] = 1.0  # in 1 of 3: not in the median
    assert label_free_check(probs)["stray"] == pytest.approx(1 / 19)


def test_choose_keeps_the_latest_acceptable_check_or_rolls_back():
    fc = FinetuneConfig()
    good = {"area": 0.26, "quality": 0.15, "agreement": 0.95}
    empty = {"area": 0.01, "quality": 0.05, "agreement": 1.0}
    checks = [{"epoch": 20, **good}, {"epoch": 40, **good}, {"epoch": 60, **empty}]
    d = choose(checks, SOURCE, fc)
    assert d["verdict"] == "adapted" and d["epoch"] == 40
    assert [c["acceptable"] for c in d["criterion"]["checks"]] == [True, True, False]
    assert verdict_line(d).startswith("adapted: weights of epoch 40")
    d = choose([{"epoch": 20, **empty}], SOURCE, fc)
    assert d["verdict"] == "rolled back" and d["epoch"] is None
    assert verdict_line(d).startswith("rolled back: no acceptable label-free check")
    d = choose([{"epoch": 20, **empty}], SOURCE, FinetuneConfig(rollback=False))
    assert d["verdict"] == "adapted" and d["epoch"] == 20 and "although" in verdict_line(d)
    assert choose([], SOURCE, fc)["verdict"] == "rolled back"


def test_keep_until_failure_does_not_trust_a_recovery_after_a_failed_check():
    good = {"area": 0.26, "quality": 0.15, "agreement": 0.95, "stray": 0.05}
    bad = {**good, "area": 0.01}
    checks = [{"epoch": 20, **good}, {"epoch": 40, **bad}, {"epoch": 60, **good}]
    assert choose(checks, SOURCE, FinetuneConfig())["epoch"] == 60
    d = choose(checks, SOURCE, FinetuneConfig(keep="until-failure"))
    assert d["verdict"] == "adapted" and d["epoch"] == 20
    assert "before the first check" in d["criterion"]["rule"]
    d = choose(checks[1:], SOURCE, FinetuneConfig(keep="until-failure"))
    assert d["verdict"] == "rolled back" and d["epoch"] is None


def test_prior_rule_lets_the_lung_share_move_only_towards_the_prior():
    """prior_share P: a check passes only if |area - P| <= |source area - P|, on top of the
    band and the quality rule; off (P = 0) it changes nothing."""
    assert prior_ok(0.26, 0.30, 0.25) and prior_ok(0.24, 0.26, 0.25) and prior_ok(0.30, 0.30, 0.25)
    assert not prior_ok(0.31, 0.30, 0.25) and not prior_ok(0.23, 0.24, 0.25)
    src = {**SOURCE, "area": 0.30}
    good = {"area": 0.28, "quality": 0.19, "agreement": 0.9, "stray": 0.1}
    away = {**good, "area": 0.32}  # inside the x0.8-1.25 band, but moving away from 0.25
    with_prior = FinetuneConfig(prior_share=0.25)
    assert judge(away, src, FinetuneConfig()) == []
    why = judge(away, src, with_prior)
    assert len(why) == 1 and "moved away from the prior 25.0%" in why[0]
    assert judge(good, src, with_prior) == []
    checks = [{"epoch": 20, **good}, {"epoch": 40, **away}]
    assert choose(checks, src, FinetuneConfig())["epoch"] == 40
    d = choose(checks, src, with_prior)
    assert d["verdict"] == "adapted" and d["epoch"] == 20 and "prior 0.25" in d["criterion"]["rule"]
    d = choose([{"epoch": 20, **away}], src, with_prior)
    assert d["verdict"] == "rolled back" and "moved away from the prior" in verdict_line(d)


def _prior(value, run, warn=lambda m: None, *, config=None):
    """finetune.py's prior share for --prior-share `value` (None: not given) and an optional
    config file holding `config` as its finetune section."""
    from nca_jax import finetune_cli

    argv = ["--run", str(run), "--data", str(run), "--out", str(run / "out")]
    if value is not None:
        argv += ["--prior-share", value]
    if config is not None:
        (run / "ft.json").write_text(json.dumps({"finetune": config}))
        argv += ["--config", str(run / "ft.json")]
    return finetune_cli.build_config(finetune_cli.parse_args(argv), warn).prior_share


def test_prior_share_option_reads_the_source_runs_training_share(tmp_path, monkeypatch):
    monkeypatch.setattr("nca_jax.guard.PRIOR_BY_DEFAULT", False)
    (tmp_path / "run.json").write_text(json.dumps({"train_mask_share": 0.2517}))
    assert _prior("auto", tmp_path) == 0.2517
    assert _prior("0.26", tmp_path) == 0.26 and _prior(None, tmp_path) == 0.0
    assert _prior("none", tmp_path, config={"prior_share": 0.3}) == 0.0
    assert _prior(None, tmp_path, config={"prior_share": 0.3}) == 0.3  # the config's stands
    with pytest.raises(ConfigError, match="'auto', 'none' or a number"):
        _prior("lungs", tmp_path)
    with pytest.raises(ConfigError, match="prior_share must lie"):
        _prior("1.5", tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"finished": True}))
    with pytest.raises(ConfigError, match="run.json: no train_mask_share"):
        _prior("auto", tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"train_mask_share": True}))
    with pytest.raises(ConfigError, match="no train_mask_share"):
        _prior("auto", tmp_path)
    (tmp_path / "run.json").unlink()
    with pytest.raises(ConfigError, match="no train_mask_share"):
        _prior("auto", tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunError, match="run.json: not a readable run summary"):
        _prior("auto", tmp_path)


def test_the_prior_by_default_falls_back_with_a_warning_for_a_run_without_the_share(
    tmp_path, monkeypatch
):
    warned = []
    monkeypatch.setattr("nca_jax.guard.PRIOR_BY_DEFAULT", False)
    assert _prior(None, tmp_path, warned.append) == 0.0 and not warned
    monkeypatch.setattr("nca_jax.guard.PRIOR_BY_DEFAULT", True)
    assert _prior(None, tmp_path, warned.append) == 0.0
    assert len(warned) == 1 and "no anatomical prior" in warned[0]
    (tmp_path / "run.json").write_text(json.dumps({"train_mask_share": 0.25}))
    assert _prior(None, tmp_path, warned.append) == 0.25 and len(warned) == 1
    assert _prior("none", tmp_path) == 0.0
    assert _prior(None, tmp_path, config={"prior_share": 0.3}) == 0.3


@pytest.mark.parametrize(
    "field, value",
    [
        ("area_min_ratio", math.nan),
        ("area_max_ratio", -1.0),
        ("lr_decay", 0.0),
        ("lr_decay", math.inf),
        ("beta1", 1.0),
        ("method", "tent"),
        ("update", "some"),
        ("check_samples", 1),
        ("keep", "best"),
        ("prior_share", 1.0),
        ("prior_share", -0.1),
    ],
)
def test_bad_guard_and_method_fields_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        FinetuneConfig(**{field: value}).validate()


@pytest.mark.slow
def test_a_collapse_is_caught_and_rolled_back(tiny_run, tmp_path, capsys):
    """Entropy minimisation with a huge learning rate drives the tiny model to a constant
    mask; the prior catches it and weights.npz is the source's again, bit for bit."""
    from nca_jax import checkpoint as ckpt
    from nca_jax.finetuning import finetune
    from nca_jax.phantoms import make_phantom_dataset

    cfg, params = ckpt.load_run(tiny_run)
    data = make_phantom_dataset(4, seed=7, size=cfg.train.image_size)
    fc = FinetuneConfig(
        method="entropy",
        epochs=4,
        batch_size=4,
        lr=0.5,
        lr_decay=1.0,
        samples=2,
        check_every=2,
        check_images=4,
        check_samples=3,
        seed=0,
    )
    s = finetune(cfg, params, data, tmp_path / "ft", fc, progress=False)
    src = json.loads((tmp_path / "ft" / "guard.json").read_text())["source"]
    checks = s["criterion"]["checks"]
    assert [c["epoch"] for c in checks] == [2, 4]
    assert s["verdict"] == "rolled back", (src, checks)
    assert checks[-1]["area"] < 0.1 * src["area"]  # it did collapse ...
    assert any("lung share" in w for w in checks[-1]["why_not"])  # ... and the prior saw it
    _, final = ckpt.load_run(tmp_path / "ft")
    a, b = ckpt.flatten_params(final), ckpt.flatten_params(params)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert s["verdict_line"].startswith("rolled back:")
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["verdict"] == "rolled back"


@pytest.mark.slow
def test_finetune_cli_ends_with_the_verdict_line(tiny_run, tmp_path, capsys):
    from nca_jax import finetune_cli
    from nca_jax.phantoms import write_phantom_folder

    data = write_phantom_folder(tmp_path / "data", n=4, seed=4, size=32)
    out = tmp_path / "ft"
    argv = [
        "--run",
        str(tiny_run),
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--samples",
        "2",
        "--batch-size",
        "2",
        "--keep",
        "until-failure",
        "--prior-share",
        "auto",
        "--no-progress",
    ]
    assert finetune_cli.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    run = json.loads((out / "run.json").read_text())
    assert run["verdict"] in VERDICTS and last.startswith(run["verdict"] + ":")
    assert run["verdict_line"] == last and "before the first check" in run["criterion"]["rule"]
    saved = json.loads((out / "config.json").read_text())["finetune"]
    assert saved["keep"] == "until-failure"
    # train.py recorded its training masks' lung share; --prior-share auto took it from there
    from nca_jax.phantoms import make_phantom_dataset

    masks = make_phantom_dataset(8, seed=1, size=32).masks
    share = json.loads((tiny_run / "run.json").read_text())["train_mask_share"]
    assert share == pytest.approx(float(np.mean(masks > 0.5))) and saved["prior_share"] == share
    assert "prior" in run["criterion"]["rule"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert "check_area" in rows[-1] and "term_seg" in rows[-1] and "term_cons1" in rows[-1]
    assert 0.0 <= rows[-1]["check_stray"] <= 1.0
    assert (out / "snapshots" / "epoch0002.npz").exists()


def test_the_phone_stand_in_reads_the_prior_from_the_export_sidecar(tmp_path, monkeypatch, capsys):
    """device_train's --prior-share resolves like finetune.py's, from the sidecar that
    export_tflite.py writes beside the model; every bad value is a DeviceError."""
    from argparse import Namespace

    from nca_jax.device_train import guard_config
    from nca_jax.errors import DeviceError

    model, side = tmp_path / "m.tflite", tmp_path / "m.tflite.json"

    def prior(value):
        a = Namespace(model=str(model), prior_share=value, check_every=20, check_images=16)
        return guard_config(a).prior_share

    side.write_text(json.dumps({"train_mask_share": 0.26}))
    monkeypatch.setattr("nca_jax.guard.PRIOR_BY_DEFAULT", False)
    assert prior(None) == 0.0 and prior("auto") == 0.26 and prior("0.3") == 0.3
    monkeypatch.setattr("nca_jax.guard.PRIOR_BY_DEFAULT", True)
    assert prior(None) == 0.26 and prior("none") == 0.0
    side.write_text(json.dumps({"model": "med-nca"}))
    assert prior(None) == 0.0 and "no anatomical prior" in capsys.readouterr().err
    with pytest.raises(DeviceError, match="m.tflite.json: no train_mask_share"):
        prior("auto")
    with pytest.raises(DeviceError, match="'auto', 'none' or a number"):
        prior("lungs")
    with pytest.raises(DeviceError, match="prior_share must lie"):
        prior("1.5")
    side.write_text("{not json")
    with pytest.raises(DeviceError, match="not a readable export sidecar"):
        prior(None)
