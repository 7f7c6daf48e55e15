"""Tests for nca_jax.phantoms: determinism, shapes, lung anatomy and the folder round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from nca_jax.data import Dataset, load_folder
from nca_jax.phantoms import main, make_phantom, make_phantom_dataset, write_phantom_folder


def test_make_phantom_shapes_dtypes_ranges() -> None:
    image, mask = make_phantom(np.random.default_rng(0), size=64)
    assert image.shape == mask.shape == (64, 64)
    assert image.dtype == mask.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    assert set(np.unique(mask)) == {0.0, 1.0}
    # The lungs are darker than the rest of the body on average.
    assert image[mask > 0].mean() < image[(mask == 0) & (image > 0.3)].mean()


def test_same_seed_same_arrays_different_seed_different() -> None:
    a = make_phantom_dataset(3, seed=5, size=48)
    b = make_phantom_dataset(3, seed=5, size=48)
    c = make_phantom_dataset(3, seed=6, size=48)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.masks, c.masks)


def test_phantom_i_does_not_depend_on_n() -> None:
    small = make_phantom_dataset(2, seed=3, size=32)
    large = make_phantom_dataset(4, seed=3, size=32)
    np.testing.assert_array_equal(small.images, large.images[:2])
    np.testing.assert_array_equal(small.masks, large.masks[:2])


def test_dataset_fields() -> None:
    data = make_phantom_dataset(2, seed=7, size=32)
    assert isinstance(data, Dataset)
    assert data.names == ("phantom_7_0000", "phantom_7_0001")
    assert data.source == "phantoms(seed=7)"
    assert data.images.shape == data.masks.shape == (2, 32, 32)
    assert data.images.min() == 0.0 and data.images.max() == 1.0


def test_lung_fraction_and_two_lungs() -> None:
    data = make_phantom_dataset(12, seed=0, size=128)
    fractions = data.masks.mean(axis=(1, 2))
    assert np.all((fractions >= 0.1) & (fractions <= 0.45)), fractions
    assert 0.15 <= fractions.mean() <= 0.35
    components = [ndimage.label(m)[1] for m in data.masks]
    assert sum(c == 2 for c in components) >= 10, components
    for mask in data.masks:  # one lung on each side of the midline
        labels, _ = ndimage.label(mask)
        if labels.max() == 2:
            centres = [np.nonzero(labels == k)[1].mean() for k in (1, 2)]
            assert min(centres) < 64 < max(centres)


def test_ribs_do_not_change_the_mask() -> None:
    image, mask = make_phantom(np.random.default_rng(1), size=128)
    lungs = mask > 0
    assert ndimage.binary_fill_holes(lungs).sum() == lungs.sum()  # no rib-shaped holes
    assert image[lungs].std() > 0.02  # but the lungs are not flat either


def test_write_phantom_folder_round_trip(tmp_path: Path) -> None:
    out = write_phantom_folder(tmp_path / "ph", n=3, seed=2, size=32)
    assert out == tmp_path / "ph"
    loaded = load_folder(out, size=32)
    expected = make_phantom_dataset(3, seed=2, size=32)
    assert loaded.names == expected.names
    np.testing.assert_array_equal(loaded.masks, expected.masks)
    np.testing.assert_allclose(loaded.images, expected.images, atol=1 / 255)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "cli"), "--n", "2", "--seed", "1", "--size", "32"]) == 0
    assert "wrote 2 phantoms" in capsys.readouterr().out
    assert load_folder(tmp_path / "cli", size=32).names == ("phantom_1_0000", "phantom_1_0001")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--n", "0"])
