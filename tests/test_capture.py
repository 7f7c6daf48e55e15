"""Phone-capture simulator: identity, determinism, geometry shared by image and mask, the moire
beat frequency, preset ranges, and the CLI's outputs and errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nca_jax import capture as cap
from nca_jax.cli import call_main
from nca_jax.data import load_folder
from nca_jax.phantoms import write_phantom_folder


def _phantom(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    from nca_jax.phantoms import make_phantom

    return make_phantom(np.random.default_rng(0), size)


def test_identity_params_leave_image_and_mask_unchanged():
    img, mask = _phantom()
    img = np.round(img * 255) / 255  # exactly representable in 8 bits
    out, warped = cap.capture(img, mask, cap.CaptureParams())
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(int) - np.round(img * 255).astype(int)).max() == 0
    np.testing.assert_array_equal(warped, (mask > 0.5).astype(np.uint8))


def test_homography_maps_the_four_points():
    src = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    dst = np.array([[1, 2], [12, 1], [11, 13], [0, 9]], float)
    h = cap.homography(src, dst)
    q = h @ np.c_[src, np.ones(4)].T
    np.testing.assert_allclose((q[:2] / q[2]).T, dst, atol=1e-9)


def test_same_seed_and_name_reproduce_other_seeds_differ():
    img, mask = _phantom()
    preset = cap.PRESETS["moderate"]
    p1 = cap.draw_params(preset, cap.case_rng(3, "a"))
    p2 = cap.draw_params(preset, cap.case_rng(3, "a"))
    p3 = cap.draw_params(preset, cap.case_rng(4, "a"))
    p4 = cap.draw_params(preset, cap.case_rng(3, "b"))
    assert p1 == p2 and p1 != p3 and p1 != p4
    a, am = cap.capture(img, mask, p1)
    b, bm = cap.capture(img, mask, p2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(am, bm)
    assert not np.array_equal(a, cap.capture(img, mask, p3)[0])


@pytest.mark.parametrize("name", sorted(cap.PRESETS))
def test_drawn_parameters_lie_in_the_preset_ranges(name):
    pr = cap.PRESETS[name]
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = cap.draw_params(pr, rng)
        assert pr.border[0] <= p.border <= pr.border[1]
        assert max(abs(c) for c in p.corners) <= pr.keystone
        assert abs(p.rotation_deg) <= pr.rotation_deg
        assert pr.gamma[0] <= p.gamma <= pr.gamma[1]
        assert pr.contrast[0] <= p.contrast <= pr.contrast[1]
        assert pr.blur[0] <= p.blur_sigma <= pr.blur[1]
        assert pr.noise[0] <= p.noise_std <= pr.noise[1]
        assert pr.jpeg[0] <= p.jpeg_quality <= pr.jpeg[1]
        assert 0 <= p.glare_amp <= pr.glare
        if p.display == "lightbox":
            assert p.moire_amp == 0 and p.border_value >= 0.85
        else:
            assert pr.moire_amp[0] <= p.moire_amp <= pr.moire_amp[1] and p.border_value <= 0.12


def test_presets_grow_in_severity():
    def mean_error(name: str) -> float:
        img, _ = _phantom()
        rng = np.random.default_rng(1)
        errs = []
        for _ in range(6):
            photo, _ = cap.capture(img, None, cap.draw_params(cap.PRESETS[name], rng))
            errs.append(np.abs(photo / 255.0 - img).mean())
        return float(np.mean(errs))

    mild, moderate, severe = (mean_error(n) for n in ("mild", "moderate", "severe"))
    assert mild < moderate < severe


def test_mask_is_warped_like_its_image():
    _, mask = _phantom(96)
    p = cap.CaptureParams(
        border=0.08, corners=(0.03, -0.02, -0.04, 0.01, 0.02, 0.03, -0.01, -0.03), rotation_deg=6
    )
    photo, warped = cap.capture(mask.astype(float), mask, p)  # the image IS the mask
    agree = ((photo > 127) == (warped > 0)).mean()
    assert agree > 0.99
    assert 0.5 < warped.sum() / mask.sum() < 1.0  # shrunk by the border, not lost


def test_moire_aliases_to_the_beat_frequency():
    pitch = 1.25  # grid of 0.8 cycles per photo pixel, sampled at 1 -> fringes at 0.2
    p = cap.CaptureParams(moire_amp=0.3, moire_pitch=pitch)
    photo, _ = cap.capture(np.full((128, 128), 0.6), None, p)
    row = photo[64].astype(float) - photo[64].mean()
    spectrum = np.abs(np.fft.rfft(row))
    freq = np.fft.rfftfreq(row.size)[np.argmax(spectrum)]
    assert freq == pytest.approx(abs(1 / pitch - round(1 / pitch)), abs=1 / 128)
    assert photo.std() > 3  # visible, in 8-bit levels


def test_lower_jpeg_quality_loses_more():
    img, _ = _phantom()
    noisy = cap.CaptureParams(noise_std=0.03, noise_seed=5)
    ref = cap.capture(img, None, noisy)[0].astype(float)
    err = [
        np.abs(cap.capture(img, None, dataclasses.replace(noisy, jpeg_quality=q))[0] - ref).mean()
        for q in (90, 30)
    ]
    assert 0 < err[0] < err[1]


def test_only_keeps_one_effect():
    p = cap.draw_params(cap.PRESETS["severe"], np.random.default_rng(0))
    q = cap.only("blur", p)
    assert q.blur_sigma == p.blur_sigma and q.noise_std == 0 and q.jpeg_quality is None
    with pytest.raises(ValueError, match="unknown effect"):
        cap.only("sparkles", p)


def test_cli_writes_a_reproducible_folder_with_warped_masks(tmp_path: Path):
    src = write_phantom_folder(tmp_path / "src", 3, seed=1, size=48)
    fig = tmp_path / "fig.png"
    args = ["--data", str(src), "--preset", "severe", "--seed", "7"]
    assert call_main(cap.main, [*args, "--out", str(tmp_path / "a"), "--figure", str(fig)]) == 0
    assert call_main(cap.main, [*args, "--out", str(tmp_path / "b")]) == 0
    for sub in ("images", "masks"):
        for f in sorted((tmp_path / "a" / sub).iterdir()):
            assert f.read_bytes() == (tmp_path / "b" / sub / f.name).read_bytes()
    d = load_folder(tmp_path / "a", size=48)
    assert len(d) == 3 and set(np.unique(d.masks)) <= {0.0, 1.0}
    man = json.loads((tmp_path / "a" / "capture.json").read_text())
    assert man["preset"] == "severe" and man["seed"] == 7 and len(man["cases"]) == 3
    assert Image.open(fig).size[0] > 500
    # one case alone gives the same photo as inside the folder (per-case generator)
    one = tmp_path / "one"
    (one / "images").mkdir(parents=True)
    name = sorted((src / "images").iterdir())[1].name
    (one / "images" / name).write_bytes((src / "images" / name).read_bytes())
    assert call_main(cap.main, ["--data", str(one), "--out", str(tmp_path / "c"), *args[2:]]) == 0
    assert (tmp_path / "c" / "images" / name).read_bytes() == (
        tmp_path / "a" / "images" / name
    ).read_bytes()
    assert not (tmp_path / "c" / "masks").exists()


def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path: Path, capsys):
    src = write_phantom_folder(tmp_path / "src", 3, seed=1, size=32)
    out = tmp_path / "out"
    assert call_main(cap.main, ["--data", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = sorted((src / "images").iterdir())[0]
    bad.write_bytes(b"not a png")
    assert call_main(cap.main, ["--data", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial folder left
    assert call_main(cap.main, ["--data", str(src), "--out", str(out), "--skip-bad"]) == 0
    assert "skipped" in capsys.readouterr().err
    assert len(list((out / "images").iterdir())) == 2
    assert call_main(cap.main, ["--data", str(src), "--out", str(out), "--skip-bad"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        call_main(cap.main, ["--data", str(src), "--out", str(out), "--preset", "extreme"])
