"""Lung masks from CheXmask CSV files (Gaggion et al., Scientific Data 2024; PhysioNet
``chexmask-cxr-segmentation-data``).

CheXmask gives, for the images of six public chest X-ray sets, HybridGNet lung and heart masks
as run-length encoded strings, one CSV per set. Columns: an image id (``ImageID`` in Padchest,
``Image Index`` in ChestX-ray8, ``dicom_id`` in MIMIC-CXR-JPG, ``Path`` in CheXpert, ``image_id``
in VinDr-CXR), ``Dice RCA (Mean)``, ``Dice RCA (Max)``, ``Landmarks``, ``Left Lung``,
``Right Lung``, ``Heart``, and in the ``OriginalResolution`` files ``Height`` and ``Width`` (the
``Preprocessed`` files have none: their masks are 1024 x 1024).

RLE: space-separated pairs ``start length``; starts are 1-based indices into the mask flattened
row by row (C order, height x width); each run sets ``length`` pixels. The lung mask used here is
left | right lung. Images are matched to rows by case name: the id's file name without its
extension (so ``00000001_000.png`` matches ``images/00000001_000.png``, and a MIMIC
``dicom_id`` matches ``images/<dicom_id>.jpg``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from nca_jax.errors import DataError

ID_COLUMNS = ("ImageID", "Image Index", "dicom_id", "Path", "image_id")
LUNG_COLUMNS = ("Left Lung", "Right Lung")
PREPROCESSED_SIZE = 1024  # masks in the Preprocessed CSVs (no Height / Width columns)


@dataclasses.dataclass(frozen=True)
class ChexmaskRow:
    """One CSV row: where it came from, the image id, its lung RLE strings and mask size."""

    where: str  # "file.csv row N (id)", for messages
    image_id: str
    left: str
    right: str
    height: int
    width: int


def rle_encode(mask: np.ndarray) -> str:
    """(H, W) mask (nonzero = inside) -> CheXmask RLE string (1-based starts, row-major)."""
    flat = np.concatenate([[0], (np.asarray(mask).ravel() != 0).astype(np.int8), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])  # run starts (0-based) and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends, strict=True))


def rle_decode(rle: str, height: int, width: int, *, where: str = "RLE") -> np.ndarray:
    """CheXmask RLE -> (height, width) bool mask; an empty string gives an empty mask.
    Raises DataError (naming `where`) for a malformed string or a run past the image's end."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise DataError(f"{where}: RLE has an odd number of values ({len(tokens)})")
    try:
        runs = np.asarray([int(t) for t in tokens], np.int64).reshape(-1, 2)
    except ValueError as e:
        raise DataError(f"{where}: RLE holds a value that is not an integer ({e})") from e
    n = height * width
    flat = np.zeros(n, bool)
    for k, (start, length) in enumerate(runs):
        if start < 1 or length < 0:
            raise DataError(f"{where}: RLE run {k} has start {start}, length {length}")
        end = start - 1 + length
        if end > n:
            raise DataError(
                f"{where}: RLE run {k} ends at pixel {end}, past the {height}x{width} image "
                f"({n} pixels)"
            )
        flat[start - 1 : end] = True
    return flat.reshape(height, width)


def case_name(image_id: str) -> str:
    """'files/p10/abc.jpg' -> 'abc'; 'abc' -> 'abc' (the image file's stem)."""
    base = PurePosixPath(image_id.replace("\\", "/")).name
    return base.rsplit(".", 1)[0] if "." in base else base


@contextlib.contextmanager
def _big_fields() -> Iterator[None]:
    old = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # RLE strings can pass the 128 KiB default
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_chexmask_csv(
    path: str | Path, *, names: set[str] | None = None, id_column: str | None = None
) -> dict[str, ChexmaskRow]:
    """Rows of a CheXmask CSV keyed by case name (only those in `names` when given).

    Raises DataError naming the file (and the row) for: an unreadable file, missing columns, a
    Height / Width that is not a positive integer, or two rows for the same case name.
    """
    path = Path(path)
    out: dict[str, ChexmaskRow] = {}
    try:
        with _big_fields(), path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            idc = id_column or next((c for c in ID_COLUMNS if c in cols), None)
            missing = [c for c in (idc, *LUNG_COLUMNS) if c is None or c not in cols]
            if idc is None or missing:
                want = id_column or f"one of {', '.join(ID_COLUMNS)}"
                raise DataError(
                    f"{path}: not a CheXmask CSV: missing column(s) "
                    f"{', '.join(m or want for m in missing) if missing else want}; "
                    f"found: {', '.join(cols) or 'no header'}"
                )
            sized = "Height" in cols and "Width" in cols
            for i, row in enumerate(reader, start=1):
                image_id = (row.get(idc) or "").strip()
                where = f"{path} row {i} ({image_id or 'no id'})"
                if not image_id:
                    raise DataError(f"{where}: empty {idc}")
                name = case_name(image_id)
                if names is not None and name not in names:
                    continue
                if sized:
                    try:
                        h, w = int(float(row["Height"])), int(float(row["Width"]))
                    except (TypeError, ValueError) as e:
                        raise DataError(
                            f"{where}: Height/Width {row['Height']!r} x {row['Width']!r} "
                            "are not integers"
                        ) from e
                    if h < 1 or w < 1:
                        raise DataError(f"{where}: Height/Width {h} x {w} must be positive")
                else:
                    h = w = PREPROCESSED_SIZE
                if name in out:
                    raise DataError(f"{where}: case {name!r} already given by {out[name].where}")
                out[name] = ChexmaskRow(
                    where, image_id, row["Left Lung"] or "", row["Right Lung"] or "", h, w
                )
    except OSError as e:
        raise DataError(f"{path}: cannot read CSV ({e.strerror or e})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e
    return out


def lung_mask(row: ChexmaskRow, image_shape: tuple[int, int], image_path: Path) -> np.ndarray:
    """(H, W) float32 {0, 1}: left | right lung of `row`, checked against the image's shape."""
    if (row.height, row.width) != tuple(image_shape):
        h, w = image_shape
        raise DataError(
            f"{row.where}: mask is {row.height}x{row.width} (Height x Width) but image "
            f"{image_path} is {h}x{w}"
            + (
                " (the Preprocessed CSVs are 1024x1024: use the OriginalResolution CSV)"
                if (row.height, row.width) == (PREPROCESSED_SIZE, PREPROCESSED_SIZE)
                else ""
            )
        )
    left = rle_decode(row.left, row.height, row.width, where=f"{row.where} Left Lung")
    right = rle_decode(row.right, row.height, row.width, where=f"{row.where} Right Lung")
    return (left | right).astype(np.float32)
