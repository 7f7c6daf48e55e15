"""Tests for nca_jax.data: folder layouts, image / mask reading and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nca_jax.data import (
    DataError,
    Dataset,
    find_pairs,
    load_folder,
    load_image,
    load_mask,
    load_split,
)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    """(h, w) uint8 random grey image spanning 10..200."""
    rng = np.random.default_rng(seed)
    image = rng.integers(10, 201, size=(h, w), dtype=np.uint8)
    image[0, 0], image[-1, -1] = 10, 200
    return image


def _mask(h: int = 20, w: int = 24, value: int = 255) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : w // 2] = value
    return mask


def _plain(root: Path, names: tuple[str, ...] = ("b", "a", "c")) -> Path:
    for i, name in enumerate(names):
        _save(root / "images" / f"{name}.png", _image(seed=i))
        _save(root / "masks" / f"{name}.png", _mask())
    return root


def _one_line(error: pytest.ExceptionInfo[DataError]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_plain_layout_found_sorted_and_hidden_ignored(tmp_path: Path) -> None:
    root = _plain(tmp_path)
    (root / "images" / ".hidden.png").write_bytes(b"junk")
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "masks" / ".DS_Store").write_bytes(b"junk")
    pairs = find_pairs(root)
    assert [name for name, _, _ in pairs] == ["a", "b", "c"]
    assert pairs[0][1] == root / "images" / "a.png"
    assert pairs[0][2] == root / "masks" / "a.png"


def test_extensions_case_insensitive(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "x.PNG", _image())
    _save(tmp_path / "images" / "y.TIF", _image())
    _save(tmp_path / "masks" / "x.bmp", _mask())
    _save(tmp_path / "masks" / "y.png", _mask())
    assert [p[0] for p in find_pairs(tmp_path)] == ["x", "y"]


def test_nnunet_layout_matches_0000(tmp_path: Path) -> None:
    for name in ("case_2", "case_1"):
        _save(tmp_path / "imagesTr" / f"{name}_0000.png", _image())
        _save(tmp_path / "labelsTr" / f"{name}.png", _mask(value=1))
    pairs = find_pairs(tmp_path)
    assert [p[0] for p in pairs] == ["case_1", "case_2"]
    assert pairs[0][1].name == "case_1_0000.png"
    assert pairs[0][2] == tmp_path / "labelsTr" / "case_1.png"
    data = load_folder(tmp_path, size=16)
    assert data.names == ("case_1", "case_2")
    assert data.masks is not None and set(np.unique(data.masks)) == {0.0, 1.0}


def test_nnunet_name_without_channel_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "imagesTr" / "case.png", _image())
    with pytest.raises(DataError, match="_0000") as e:
        find_pairs(tmp_path)
    assert "case.png" in _one_line(e)


def test_image_without_mask_names_the_file(tmp_path: Path) -> None:
    root = _plain(tmp_path)
    _save(root / "images" / "lonely.png", _image())
    with pytest.raises(DataError) as e:
        find_pairs(root)
    expected = f"{root / 'images' / 'lonely.png'}: image has no mask in {root / 'masks'}"
    assert _one_line(e) == expected


def test_mask_without_image_names_the_file(tmp_path: Path) -> None:
    root = _plain(tmp_path)
    _save(root / "masks" / "orphan.png", _mask())
    with pytest.raises(DataError) as e:
        find_pairs(root)
    assert str(root / "masks" / "orphan.png") in _one_line(e)
    assert "no image" in str(e.value)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as e:
        find_pairs(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in _one_line(e)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        find_pairs(tmp_path / "file.txt")
    with pytest.raises(DataError, match="no images/ or imagesTr/"):
        find_pairs(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no image files") as e:
        find_pairs(tmp_path)
    assert str(tmp_path / "images") in _one_line(e)


def test_missing_masks_folder(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.png", _image())
    with pytest.raises(DataError, match="mask folder") as e:
        find_pairs(tmp_path)
    assert str(tmp_path / "masks") in _one_line(e)


def test_require_masks_false_ignores_broken_or_absent_masks(tmp_path: Path) -> None:
    root = _plain(tmp_path)
    for path in (root / "masks").iterdir():
        path.write_bytes(b"this is not a png")
    (root / "masks" / "orphan.png").write_bytes(b"nor this")
    pairs = find_pairs(root, require_masks=False)
    assert [(name, mask) for name, _, mask in pairs] == [("a", None), ("b", None), ("c", None)]
    data = load_folder(root, size=8, require_masks=False)
    assert data.masks is None and data.images.shape == (3, 8, 8)
    for path in (root / "masks").iterdir():
        path.unlink()
    (root / "masks").rmdir()
    assert load_folder(root, size=8, require_masks=False).names == ("a", "b", "c")


def test_unreadable_image_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "images" / "bad.png"
    path.parent.mkdir()
    path.write_text("just some text")
    with pytest.raises(DataError, match="not a readable image") as e:
        load_image(path)
    assert _one_line(e).startswith(f"{path}: ")
    _save(tmp_path / "masks" / "bad.png", _mask())
    with pytest.raises(DataError, match="bad.png"):
        load_folder(tmp_path)


def test_unreadable_mask_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="not a readable mask") as e:
        load_mask(path)
    assert _one_line(e).startswith(str(path))


def test_load_image_min_max_and_resize(tmp_path: Path) -> None:
    path = _save(tmp_path / "i.png", _image(30, 40))
    image = load_image(path, size=16)
    assert image.shape == (16, 16) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    same = load_image(_save(tmp_path / "j.png", _image(16, 16)), size=16)
    raw = _image(16, 16).astype(np.float32)
    np.testing.assert_allclose(same, (raw - 10) / 190, atol=1e-6)


def test_constant_image_becomes_zeros(tmp_path: Path) -> None:
    image = load_image(_save(tmp_path / "c.png", np.full((9, 9), 77, np.uint8)), size=12)
    assert image.shape == (12, 12) and not image.any()


def test_16_bit_and_rgb_images(tmp_path: Path) -> None:
    ramp = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 3 + 1000  # 1000..1765
    image = load_image(_save(tmp_path / "deep.png", ramp), size=16)
    np.testing.assert_allclose(image, (ramp - 1000) / 765.0, atol=1e-6)  # no 8-bit truncation
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:5] = 200
    image = load_image(_save(tmp_path / "rgb.png", rgb), size=10)
    assert set(np.unique(image)) == {0.0, 1.0}


@pytest.mark.parametrize("value", [1, 255])
def test_binary_masks_0_1_and_0_255(tmp_path: Path, value: int) -> None:
    path = _save(tmp_path / "m.png", _mask(value=value))
    messages: list[str] = []
    mask = load_mask(path, size=20, warn=messages.append)
    assert messages == []
    assert mask.dtype == np.float32 and mask.shape == (20, 20)
    assert set(np.unique(mask)) == {0.0, 1.0}
    full = load_mask(path, size=24, warn=messages.append)  # 20x24 -> 24x24 nearest
    assert set(np.unique(full)) == {0.0, 1.0}


@pytest.mark.parametrize("value, expected", [(0, 0.0), (1, 1.0), (255, 1.0), (65535, 1.0)])
def test_a_mask_of_one_value_is_all_background_or_all_foreground(
    tmp_path: Path, value: int, expected: float
) -> None:
    dtype = np.uint16 if value > 255 else np.uint8
    path = _save(tmp_path / "m.png", np.full((6, 6), value, dtype))
    mask = load_mask(path, size=6, warn=pytest.fail)
    np.testing.assert_array_equal(mask, np.full((6, 6), expected, np.float32))


def test_16_bit_binary_mask(tmp_path: Path) -> None:
    mask = _mask().astype(np.uint16) * 257  # 0 / 65535
    out = load_mask(_save(tmp_path / "m.png", mask), size=8, warn=pytest.fail)
    assert set(np.unique(out)) == {0.0, 1.0}


def test_non_binary_mask_warns_and_binarises(tmp_path: Path) -> None:
    values = np.array([[0, 10, 127, 128, 200, 255]], np.uint8).repeat(6, axis=0)
    path = _save(tmp_path / "soft.png", values)
    messages: list[str] = []
    mask = load_mask(path, size=6, warn=messages.append)
    np.testing.assert_array_equal(mask[0], [0, 0, 0, 1, 1, 1])
    assert len(messages) == 1 and str(path) in messages[0] and "\n" not in messages[0]
    with pytest.warns(UserWarning, match="not binary"):
        load_mask(path, size=6)


def test_mask_with_nonzero_minimum_is_not_binary(tmp_path: Path) -> None:
    path = _save(tmp_path / "m.png", _mask(value=255) // 2 + 100)  # 100 / 227
    messages: list[str] = []
    mask = load_mask(path, size=20, warn=messages.append)
    assert len(messages) == 1
    expected = load_mask(_save(tmp_path / "ok.png", _mask()), size=20, warn=pytest.fail)
    np.testing.assert_array_equal(mask, expected)  # 227 >= 128 is foreground


def test_mask_size_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "images" / "a.png", _image(20, 24))
    mask = _save(tmp_path / "masks" / "a.png", _mask(24, 20))
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, size=16)
    assert _one_line(e) == f"{mask}: mask is 24x20 but its image is 20x24"


def test_load_folder_dataset(tmp_path: Path) -> None:
    data = load_folder(_plain(tmp_path), size=16)
    assert isinstance(data, Dataset) and len(data) == 3
    assert data.names == ("a", "b", "c") and data.source == str(tmp_path)
    assert data.images.shape == data.masks.shape == (3, 16, 16)
    assert data.images.dtype == data.masks.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert set(np.unique(data.masks)) == {0.0, 1.0}


def test_load_split_order_and_unknown_name(tmp_path: Path) -> None:
    root = _plain(tmp_path / "data")
    split = tmp_path / "val.txt"
    split.write_text("# validation cases\nc\n\n  a  # inline comment\n")
    data = load_split(root, split, size=8)
    assert data.names == ("c", "a") and data.images.shape == (2, 8, 8)
    np.testing.assert_array_equal(data.images[1], load_folder(root, size=8).images[0])
    split.write_text("a\nzzz\n")
    with pytest.raises(DataError) as e:
        load_split(root, split, size=8)
    assert str(split) in _one_line(e) and "'zzz'" in str(e.value)
    with pytest.raises(DataError, match="cannot read"):
        load_split(root, tmp_path / "missing.txt")


def _pairs_folder(root: Path, names: list[str]) -> Path:
    for i, n in enumerate(names):
        _save(root / "images" / f"{n}.png", _image(seed=i))
        _save(root / "masks" / f"{n}.png", _mask())
    return root


def test_an_unpaired_file_outside_the_split_does_not_matter(tmp_path: Path) -> None:
    root = _pairs_folder(tmp_path, ["a", "b", "c"])
    _save(root / "images" / "lonely.png", _image())  # image without mask, not listed
    _save(root / "masks" / "stray.png", _mask())  # mask without image, not listed
    (tmp_path / "split.txt").write_text("a\nc\n")
    d = load_split(root, tmp_path / "split.txt", size=16, warn=pytest.fail)
    assert d.names == ("a", "c") and d.skipped == ()
    with pytest.raises(DataError, match="lonely.png: image has no mask"):
        load_folder(root, size=16)


def test_skip_bad_skips_orphans_and_records_every_skipped_case(tmp_path: Path) -> None:
    root = _pairs_folder(tmp_path, ["a", "b", "c"])
    _save(root / "images" / "lonely.png", _image())
    _save(root / "masks" / "stray.png", _mask())
    (root / "images" / "b.png").write_text("not a png")
    seen: list[str] = []
    d = load_folder(root, size=16, skip_bad=True, warn=seen.append)
    assert d.names == ("a", "c")
    assert {n for n, _ in d.skipped} == {"lonely", "stray", "b"}
    assert len(seen) == 3 and all(m.startswith("skipped ") for m in seen)
    (tmp_path / "split.txt").write_text("a\nlonely\nmissing\nc\n")
    d = load_split(root, tmp_path / "split.txt", size=16, skip_bad=True, warn=seen.append)
    assert d.names == ("a", "c")
    assert dict(d.skipped).keys() == {"lonely", "missing"}
    with pytest.raises(DataError, match="'missing' is not in"):
        (tmp_path / "s2.txt").write_text("a\nmissing\n")
        load_split(root, tmp_path / "s2.txt", size=16)


def test_evaluate_summary_records_the_skipped_cases(tmp_path: Path) -> None:
    import json

    from nca_jax import evaluate, train_cli

    data = tmp_path / "data"
    from nca_jax.phantoms import write_phantom_folder

    write_phantom_folder(data, n=3, seed=0, size=64)
    _save(data / "images" / "lonely.png", _image(64, 64))
    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.json")
    run = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(run), "--config", tiny, "--epochs", "1"]
    assert train_cli.main([*argv, "--skip-bad", "--no-progress"]) == 0
    out = tmp_path / "ev"
    argv = ["--run", str(run), "--data", str(data), "--out", str(out), "--samples", "1"]
    assert evaluate.main([*argv, "--skip-bad", "--no-png"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 3 and s["n_skipped"] == 1 and s["skipped"][0]["name"] == "lonely"
    assert "image has no mask" in s["skipped"][0]["why"]
