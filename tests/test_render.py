"""Pictures: the rollout animation (issue 15), atomic image writers, the training curve."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised_params
from PIL import Image

from nca_jax import model as m
from nca_jax import render
from nca_jax.config import ModelConfig
from nca_jax.predict import make_history, make_predict, predict_dataset
from nca_jax.training import curve_figure


def _tiny(steps: int = 3) -> ModelConfig:
    return ModelConfig(channels=6, hidden=12, steps=steps, patch=8, downscale=4)


def test_history_ends_where_the_prediction_ends():
    cfg = _tiny()
    params = randomised_params(cfg)
    img = jax.random.uniform(jax.random.key(5), (2, 16, 16))
    key = jax.random.key(3)
    l1, l2 = m.predict_history(params, img, cfg=cfg, key=key)
    assert l1.shape == l2.shape == (cfg.steps, 2, 16, 16)
    np.testing.assert_allclose(l2[-1], m.predict_logits(params, img, cfg=cfg, key=key), atol=1e-6)
    # level 1's last frame is the upsampled lung channel that level 2 starts from
    low = m.downscale(img[..., None], cfg.downscale)
    s1 = m.rollout(
        params["level1"],
        m.seed_state(low, cfg.channels),
        cfg=cfg,
        key=jax.random.fold_in(key, m.LEVEL_KEY),
    )
    np.testing.assert_allclose(l1[-1], m.upscale(s1, cfg.downscale)[..., 1], atol=1e-6)
    assert float(jnp.abs(l2[0] - l2[-1]).max()) > 1e-4  # the frames move


def test_history_is_sample_zero_of_the_evaluation():
    cfg = _tiny()
    params = randomised_params(cfg)
    imgs = np.asarray(jax.random.uniform(jax.random.key(6), (3, 16, 16)))
    key = jax.random.key(0)
    probs = predict_dataset(make_predict(cfg, 2), params, imgs, key, chunk=2)
    hist = make_history(cfg)
    for i in range(3):
        _, l2 = hist(params, jnp.asarray(imgs[i]), key, jnp.int32(i))
        np.testing.assert_allclose(l2[-1], probs[0, i], atol=1e-6)


def test_frames_bar_and_count():
    img = np.linspace(0, 1, 16 * 8).reshape(16, 8)
    l1, l2 = np.zeros((4, 16, 8)), np.ones((6, 16, 8))
    frames = render.rollout_frames(img, l1, l2, every=1)
    assert len(frames) == 10 and frames[0].shape == (16 + render.BAR_PX, 8, 3)
    assert frames[0].dtype == np.uint8
    # level 1's frames show the image alone (probability 0); level 2's are tinted red
    np.testing.assert_array_equal(
        frames[0][render.BAR_PX :, :, 0], frames[0][render.BAR_PX :, :, 1]
    )
    assert (frames[-1][render.BAR_PX :, :, 0] >= frames[-1][render.BAR_PX :, :, 1]).all()
    # the bar is full in the last frame: level 1's share blue, then orange
    bar = frames[-1][0]
    assert tuple(bar[0]) == render.LEVEL_COLOURS[0] and tuple(bar[-1]) == render.LEVEL_COLOURS[1]
    # every 3rd step of each level, and always each level's last
    assert len(render.rollout_frames(img, l1, l2, every=3)) == 2 + 2


def test_save_gif_is_atomic_and_loops(tmp_path):
    frames = [np.full((5, 7, 3), v, np.uint8) for v in (0, 120, 250)]
    path = tmp_path / "a.gif"
    render.save_gif(path, frames)
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.size == (7, 5) and im.info.get("loop") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["a.gif"]  # no temporary left behind
    with pytest.raises(ValueError, match="no frames"):
        render.save_gif(tmp_path / "b.gif", [])


def test_training_curve_legend_stays_off_the_curves():
    rows = [
        {"epoch": e, "loss": 1.0 / e, **({"val_dice": 0.9} if e % 2 else {})} for e in range(1, 30)
    ]
    fig = curve_figure(rows)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(r)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(r))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["train loss", "validation Dice"]


def test_evaluate_animate_writes_one_gif_per_case(tiny_cfg, tmp_path):
    from nca_jax import evaluate
    from nca_jax.phantoms import make_phantom_dataset, write_phantom_folder
    from nca_jax.training import train_and_evaluate

    train_and_evaluate(
        tiny_cfg, make_phantom_dataset(4, seed=1, size=32), tmp_path / "run", progress=False
    )
    data = write_phantom_folder(tmp_path / "data", n=2, seed=5, size=32)
    out = tmp_path / "eval"
    args = ["--run", str(tmp_path / "run"), "--data", str(data), "--out", str(out)]
    assert (
        evaluate.main([*args, "--samples", "2", "--no-png", "--animate", "--animate-every", "1"])
        == 0
    )
    gifs = sorted(p.name for p in (out / "cases").iterdir())
    assert gifs == ["phantom_5_0000_rollout.gif", "phantom_5_0001_rollout.gif"]
    with Image.open(out / "cases" / gifs[0]) as im:
        assert im.n_frames == 2 * tiny_cfg.model.steps
    assert json.loads((out / "summary.json").read_text())["n"] == 2
