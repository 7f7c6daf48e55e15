"""CheXmask CSV masks: RLE round trips from masks we encode, the exact layout (1-based starts,
row-major), folders loaded with CSV masks, and one-line errors naming the file and row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nca_jax.chexmask import case_name, read_chexmask_csv, rle_decode, rle_encode
from nca_jax.data import DataError, load_folder, load_split


def test_rle_layout_is_one_based_and_row_major():
    m = rle_decode("1 2 5 1", 2, 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0]])
    assert rle_encode(m) == "1 2 5 1"


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed: int):
    rng = np.random.default_rng(seed)
    m = rng.random((23, 17)) < [0.0, 0.3, 0.9, 1.0][seed % 4]
    m[0, 0] = m[-1, -1] = seed % 2 == 0  # runs touching both ends
    np.testing.assert_array_equal(rle_decode(rle_encode(m), 23, 17), m)
    assert rle_decode("", 4, 5).sum() == 0


@pytest.mark.parametrize(
    "rle, message",
    [("1 2 3", "odd number"), ("1 x", "not an integer"), ("0 3", "start 0"), ("11 3", "past")],
)
def test_bad_rle_strings(rle: str, message: str):
    with pytest.raises(DataError, match=message):
        rle_decode(rle, 3, 4, where="f.csv row 2 (a.png) Left Lung")


def test_case_names_from_ids():
    assert case_name("00000001_000.png") == "00000001_000"
    assert case_name("files/p10/p10000032/s5041/02aa804e-bde0afdd.jpg") == "02aa804e-bde0afdd"
    assert case_name("02aa804e-bde0afdd") == "02aa804e-bde0afdd"


def _lungs(h: int, w: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
    left[3 : h - 3, 2 + shift : w // 2 - 1] = True
    right[4 : h - 2, w // 2 + 1 : w - 2] = True
    return left, right


def _folder_and_csv(tmp_path: Path, *, h: int = 20, w: int = 24, sized: bool = True):
    (tmp_path / "images").mkdir(parents=True)
    rows, truth = [], {}
    for i in range(3):
        name = f"img{i}"
        Image.fromarray((np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)).save(
            tmp_path / "images" / f"{name}.png"
        )
        left, right = _lungs(h, w, i)
        truth[name] = left | right
        row = {
            "ImageID": f"{name}.png",
            "Dice RCA (Mean)": "0.9",
            "Dice RCA (Max)": "0.93",
            "Landmarks": "[1, 2]",
            "Left Lung": rle_encode(left),
            "Right Lung": rle_encode(right),
            "Heart": "",
        }
        if sized:
            row |= {"Height": str(h), "Width": str(w)}
        rows.append(row)
    path = tmp_path / "Padchest.csv"
    with path.open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return path, truth, rows


def _resize_nearest(m: np.ndarray, size: int) -> np.ndarray:
    from nca_jax.data import _nearest

    return _nearest(m, size)


def test_folder_with_chexmask_masks(tmp_path: Path):
    path, truth, _ = _folder_and_csv(tmp_path)
    d = load_folder(tmp_path, size=24, chexmask=path)
    assert d.names == ("img0", "img1", "img2")
    for i, name in enumerate(d.names):
        np.testing.assert_array_equal(d.masks[i], _resize_nearest(truth[name], 24))
    split = tmp_path / "split.txt"
    split.write_text("img2\nimg0\n")
    d2 = load_split(tmp_path, split, size=24, chexmask=path)
    assert d2.names == ("img2", "img0")
    np.testing.assert_array_equal(d2.masks[0], d.masks[2])
    assert set(read_chexmask_csv(path, names={"img1"})) == {"img1"}


def test_wrong_height_and_width_names_the_row(tmp_path: Path):
    path, _, _ = _folder_and_csv(tmp_path)
    text = path.read_text().splitlines()
    text[2] = text[2].rsplit(",", 2)[0] + ",30,24"  # row 2 (img1) claims 30 x 24
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"Padchest.csv row 2 \(img1.png\): mask is 30x24"):
        load_folder(tmp_path, size=24, chexmask=path)


def test_rle_past_the_image_names_the_row(tmp_path: Path):
    path, _, rows = _folder_and_csv(tmp_path)
    text = path.read_text().replace(rows[0]["Right Lung"], rows[0]["Right Lung"] + " 470 20")
    path.write_text(text)
    with pytest.raises(DataError, match=r"row 1 \(img0.png\) Right Lung: RLE run .* past"):
        load_folder(tmp_path, size=24, chexmask=path)


def test_missing_columns_and_missing_rows(tmp_path: Path):
    path, _, _ = _folder_and_csv(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageID,Heart\na.png,\n")
    with pytest.raises(DataError, match="bad.csv: not a CheXmask CSV: missing column.*Left Lung"):
        load_folder(tmp_path, size=24, chexmask=bad)
    noid = tmp_path / "noid.csv"
    noid.write_text("name,Left Lung,Right Lung\na.png,,\n")
    with pytest.raises(DataError, match="one of ImageID"):
        read_chexmask_csv(noid)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "images" / "extra.png")
    with pytest.raises(DataError, match="no row for image .*extra.png"):
        load_folder(tmp_path, size=24, chexmask=path)
    seen: list[str] = []
    d = load_folder(tmp_path, size=24, chexmask=path, skip_bad=True, warn=seen.append)
    assert d.names == ("img0", "img1", "img2") and "extra" in seen[0]


def test_duplicate_rows_and_preprocessed_size(tmp_path: Path):
    path, _, _ = _folder_and_csv(tmp_path)
    lines = path.read_text().splitlines()
    dup = tmp_path / "dup.csv"
    dup.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DataError, match=r"row 4 .*already given by .*row 1"):
        read_chexmask_csv(dup)
    pre, _, _ = _folder_and_csv(tmp_path / "pre", sized=False)  # Preprocessed: 1024 x 1024
    with pytest.raises(DataError, match="1024x1024.*OriginalResolution"):
        load_folder(tmp_path / "pre", size=24, chexmask=pre)


def test_cli_evaluate_and_train_read_chexmask(tmp_path: Path, tiny_cfg):
    """train.py and evaluate.py take --chexmask; the masks come from the CSV."""
    import json

    from nca_jax.config import atomic_write_text
    from nca_jax.evaluate import main as evaluate_main
    from nca_jax.train_cli import main as train_main

    path, _, _ = _folder_and_csv(tmp_path / "d", h=32, w=32)
    cfg = tmp_path / "cfg.json"
    atomic_write_text(cfg, json.dumps(tiny_cfg.to_dict()))
    run = tmp_path / "run"
    args = ["--data", str(tmp_path / "d"), "--chexmask", str(path), "--config", str(cfg)]
    assert (
        train_main(
            [*args[:4], "--config", str(cfg), "--out", str(run), "--epochs", "1", "--no-progress"]
        )
        == 0
    )
    out = tmp_path / "ev"
    assert (
        evaluate_main(
            ["--run", str(run), *args[:4], "--out", str(out), "--samples", "1", "--no-png"]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 3 and 0 <= s["dice_mean"] <= 1
