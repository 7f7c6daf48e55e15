import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised_params
from PIL import Image

from nca_jax import finetune_cli, model
from nca_jax.cli import run_cli
from nca_jax.config import FinetuneConfig
from nca_jax.finetuning import area_warning
from nca_jax.losses import segmentation_loss
from nca_jax.phantoms import make_phantom_dataset, write_phantom_folder
from nca_jax.training import train_and_evaluate
from nca_jax.vwsl import make_targets, targets_from_probs, vwsl_loss, vwsl_terms


def test_vmap_targets_equal_a_loop_over_the_same_keys(tiny_cfg):
    mc = tiny_cfg.model
    params = randomised_params(mc)
    images = make_phantom_dataset(3, seed=2, size=32).images
    fc = FinetuneConfig(samples=4, target_reduce="mean")
    key = jax.random.key(9)
    t, w = make_targets(params, images, cfg=mc, fc=fc, key=key, chunk=2)
    probs = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        jax.nn.sigmoid(
                            model.predict_logits(
                                params,
                                images[i : i + 1],
                                cfg=mc,
                                key=jax.random.fold_in(jax.random.fold_in(key, i), j),
                            )
                        )
                    )[0]
                    for i in range(3)
                ]
            )
            for j in range(4)
        ]
    )
    t2, w2 = targets_from_probs(probs, "mean", "std")
    np.testing.assert_allclose(w, w2, atol=1e-5)
    agree = np.abs(probs.mean(0) - 0.5) > 1e-4  # away from the threshold: exactly equal
    np.testing.assert_array_equal(t[agree], t2[agree])
    assert w.min() < 1.0  # the samples really differ somewhere


def test_weight_map_in_unit_interval_and_one_where_samples_agree():
    rng = np.random.default_rng(0)
    probs = rng.uniform(size=(10, 2, 8, 8)).astype(np.float32)
    probs[:, 0, :4] = 0.9  # all samples agree here
    probs[:5, 1, 0, 0], probs[5:, 1, 0, 0] = 0.0, 1.0  # maximal disagreement: std 0.5
    for kind in ("std", "var"):
        t, w = targets_from_probs(probs, "median", kind)
        assert w.min() >= 0 and w.max() <= 1
        np.testing.assert_array_equal(w[0, :4], 1.0)
        assert w[1, 0, 0] == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_array_equal(t[0, :4], 1.0)
    t_med, _ = targets_from_probs(np.array([[0.0], [0.0], [0.9]]), "median")
    t_mean, _ = targets_from_probs(np.array([[0.0], [0.6], [0.99]]), "mean")
    assert t_med[0] == 0.0 and t_mean[0] == 1.0


def test_consistency_zero_for_equal_keys_positive_otherwise(tiny_cfg):
    mc = tiny_cfg.model
    params = randomised_params(mc)
    d = make_phantom_dataset(2, seed=3, size=32)
    yx = jnp.zeros((2, 2), jnp.int32)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    same = vwsl_terms(
        params,
        d.images,
        d.masks,
        jnp.ones_like(d.masks),
        cfg=mc,
        keys=(k1, k1, k2, k2),
        patch_yx=yx,
    )
    diff = vwsl_terms(
        params,
        d.images,
        d.masks,
        jnp.ones_like(d.masks),
        cfg=mc,
        keys=(k1, k2, k1, k2),
        patch_yx=yx,
    )
    assert float(same["cons1"]) == 0.0 and float(same["cons2"]) == 0.0
    assert float(diff["cons1"]) > 0 and float(diff["cons2"]) > 0


def test_level2_consistency_uses_level2_weights(tiny_cfg):
    """The authors' second level-2 run used the level-1 weights. Here both level-2 runs use
    level 2's: with level 2 zeroed (the identity) they agree exactly while level 1's differ."""
    mc = tiny_cfg.model
    params = randomised_params(mc)
    d = make_phantom_dataset(2, seed=3, size=32)
    yx = jnp.zeros((2, 2), jnp.int32)
    keys = tuple(jax.random.key(i) for i in range(4))
    zero2 = jax.tree_util.tree_map(jnp.zeros_like, params["level2"])
    p = {"level1": params["level1"], "level2": zero2}
    terms = vwsl_terms(p, d.images, d.masks, jnp.ones_like(d.masks), cfg=mc, keys=keys, patch_yx=yx)
    # a zero level 2 is the identity: both level-2 runs equal, whatever level 1 does
    assert float(terms["cons2"]) == 0.0 and float(terms["cons1"]) > 0


def test_weighted_loss_with_unit_weights_equals_unweighted():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 8, 8)), jnp.float32)
    target = jnp.asarray(rng.uniform(size=(2, 8, 8)) > 0.5, jnp.float32)
    for kind in ("dice_bce", "dice_focal"):
        a = segmentation_loss(logits, target, jnp.ones_like(target), kind=kind)
        b = segmentation_loss(logits, target, kind=kind)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_vwsl_loss_gamma_zero_is_the_weighted_segmentation_loss(tiny_cfg):
    mc = tiny_cfg.model
    params = randomised_params(mc)
    d = make_phantom_dataset(2, seed=3, size=32)
    w = jnp.ones_like(d.masks)
    l0, terms = vwsl_loss(
        params, d.images, d.masks, w, cfg=mc, fc=FinetuneConfig(gamma=0.0), key=jax.random.key(0)
    )
    l1, _ = vwsl_loss(
        params, d.images, d.masks, w, cfg=mc, fc=FinetuneConfig(gamma=10.0), key=jax.random.key(0)
    )
    assert float(l0) == pytest.approx(float(terms["seg"]))
    assert float(l1) == pytest.approx(
        float(terms["seg"] + 10 * (terms["cons1"] + terms["cons2"])), rel=1e-5
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from nca_jax.config import ModelConfig, RunConfig, TrainConfig

    cfg = RunConfig(
        model=ModelConfig(channels=8, hidden=16, steps=4, patch=16),
        train=TrainConfig(epochs=1, batch_size=4, image_size=32),
    ).validate()
    out = tmp_path_factory.mktemp("run") / "run"
    train_and_evaluate(cfg, make_phantom_dataset(4, seed=1, size=32), out, progress=False)
    return out


def _ft(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: finetune_cli.main(argv))
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.slow
def test_finetune_never_opens_a_mask(tiny_run, tmp_path, monkeypatch, capsys):
    data = write_phantom_folder(tmp_path / "data", n=3, seed=4, size=32)
    for p in (data / "masks").iterdir():
        p.write_bytes(b"unreadable")
    opened = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    out = tmp_path / "ft"
    code, err = _ft(
        [
            "--run",
            str(tiny_run),
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--samples",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    assert opened and not any("masks" in p for p in opened)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["finetune"]["epochs"] == 1 and cfg["finetune"]["source_run"] == str(tiny_run)
    u = json.loads((out / "uncertainty.json").read_text())
    assert set(u["phantom_4_0000"]) == {
        "quality_before",
        "quality_after",
        "foreground_before",
        "foreground_after",
    }
    s = json.loads((out / "run.json").read_text())
    fg = [r["foreground_after"] for r in u.values()]
    assert s["foreground_after_mean"] == pytest.approx(sum(fg) / len(fg))
    assert (out / "uncertainty" / "phantom_4_0000_std_before.png").exists()
    assert (out / "weights.npz").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--gamma", "-1"], "gamma"),
        (["--gamma", "nan"], "gamma"),
        (["--lr", "inf"], "lr"),
        (["--lr", "-0.1"], "lr"),
    ],
)
def test_finetune_bad_hyperparameters(tiny_run, tmp_path, capsys, extra, expected):
    data = write_phantom_folder(tmp_path / "data", n=2, seed=4, size=32)
    code, err = _ft(
        ["--run", str(tiny_run), "--data", str(data), "--out", str(tmp_path / "ft"), *extra], capsys
    )
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft").exists()


def test_finetune_bad_folders_and_runs(tiny_run, tmp_path, capsys):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    code, err = _ft(
        ["--run", str(tiny_run), "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "ft")],
        capsys,
    )
    assert code == 2 and "no image files" in err
    data = write_phantom_folder(tmp_path / "data", n=2, seed=4, size=32)
    (tmp_path / "untrained").mkdir()
    (tmp_path / "untrained" / "config.json").write_text((tiny_run / "config.json").read_text())
    code, err = _ft(
        ["--run", str(tmp_path / "untrained"), "--data", str(data), "--out", str(tmp_path / "ft")],
        capsys,
    )
    assert code == 2 and "not a trained run" in err
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_vwsl_raises_dice_on_a_domain_shifted_toy(tmp_path):
    """Train on phantoms, shift the target domain's intensities (gamma 0.35), fine-tune with VWSL
    on the shifted images WITHOUT their masks, score against the hidden masks."""
    from nca_jax import checkpoint as ckpt
    from nca_jax.config import ModelConfig, RunConfig, TrainConfig
    from nca_jax.data import Dataset
    from nca_jax.finetuning import finetune
    from nca_jax.predict import make_predict, predict_dataset
    from nca_jax.training import validation_dice

    cfg = RunConfig(
        model=ModelConfig(channels=16, hidden=64, steps=10, patch=16),
        train=TrainConfig(epochs=40, batch_size=8, image_size=64, lr=3e-3),
    ).validate()
    train_and_evaluate(
        cfg, make_phantom_dataset(32, seed=1, size=64), tmp_path / "run", progress=False
    )
    _, params = ckpt.load_run(tmp_path / "run")
    target = make_phantom_dataset(16, seed=9, size=64)
    y = target.images**0.35
    y = (y - y.min(axis=(1, 2), keepdims=True)) / np.ptp(y, axis=(1, 2), keepdims=True)
    shifted = Dataset(target.names, y.astype(np.float32), None, "shifted phantoms")
    predict = make_predict(cfg.model, 5)

    def score(p):
        probs = predict_dataset(predict, p, shifted.images, jax.random.key(5))
        return validation_dice(probs, target.masks)

    fc = FinetuneConfig(epochs=10, batch_size=8, lr=1e-3, gamma=1.0, samples=10, check_every=0)
    finetune(cfg, params, shifted, tmp_path / "ft", fc, progress=False, uncertainty_after=False)
    _, tuned = ckpt.load_run(tmp_path / "ft")
    before, after = score(params), score(tuned)
    assert after > before + 0.005, (before, after)


def test_area_warning_flags_a_collapse_or_a_flood_only():
    assert area_warning(0.30, 0.25) is None
    assert area_warning(0.4, 0.2) is None and area_warning(0.2, 0.4) is None  # the bounds
    empty = area_warning(0.30, 0.002)
    assert empty and "empty" in empty and "30.0% to 0.2%" in empty
    full = area_warning(0.20, 0.70)
    assert full and "over-full" in full
    assert area_warning(0.0, 0.0) is None and "from none" in area_warning(0.0, 0.1)


@pytest.mark.slow  # a fine-tuning and a training run
def test_batch_larger_than_the_data_is_said_and_recorded(tiny_run, tmp_path, capsys):
    """A batch size above the number of images warns, and config.json records the batch the
    run actually used (fine-tuning and training alike)."""
    from nca_jax import train_cli

    data = write_phantom_folder(tmp_path / "data", n=2, seed=4, size=32)
    out = tmp_path / "ft"
    args = ["--run", str(tiny_run), "--data", str(data), "--out", str(out)]
    code, err = _ft([*args, "--epochs", "1", "--samples", "2", "--batch-size", "8"], capsys)
    assert code == 0, err
    assert "batch size 8 but only 2 images: batch size 2" in err
    assert json.loads((out / "config.json").read_text())["finetune"]["batch_size"] == 2
    run = tmp_path / "run"
    train = ["--data", str(data), "--out", str(run), "--config", str(tiny_run / "config.json")]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train_cli.main([*train, "--batch-size", "8", "--no-progress"]))
    assert e.value.code == 0
    assert "batch size 8 but only 2 training images" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["train"]["batch_size"] == 2
