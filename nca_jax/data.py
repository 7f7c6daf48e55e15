"""Loading chest X-ray image / lung-mask folders into float32 numpy arrays, with one-line errors.

Two folder layouts are understood:

* plain:   ``root/images/NAME.ext`` and ``root/masks/NAME.ext`` (same file name stem);
* nnU-Net: ``root/imagesTr/NAME_0000.ext`` and ``root/labelsTr/NAME.ext``.

Images may be PNG, JPEG, TIFF, BMP or DICOM (``.dcm``, read by :mod:`nca_jax.dicom` with the
optional pydicom). Masks may instead come from a CheXmask CSV (``chexmask=``, see
:mod:`nca_jax.chexmask`). With ``skip_bad=True`` a case that cannot be read is skipped with a
warning instead of stopping the whole load.

Every problem with the input is raised as :class:`DataError`, whose message is a single line that
starts with the offending path. No JAX here: everything is numpy.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from nca_jax.errors import DataError  # noqa: F401 (re-exported)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
_NNUNET_IMAGE_STEM = re.compile(r"^(?P<name>.+)_(?P<channel>\d{4})$")
# Pillow modes whose pixel values are read as numbers directly (no 8-bit conversion).
_NUMERIC_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images (N, S, S) float32 in [0, 1] and optional lung masks (N, S, S) float32 in {0, 1}."""

    names: tuple[str, ...]  # case names (file stem)
    images: np.ndarray  # (N, S, S) float32 in [0, 1], min-max normalised per image
    masks: np.ndarray | None  # (N, S, S) float32 in {0, 1}, or None when loaded without masks
    source: str  # folder it came from, or "phantoms(seed=..)"
    skipped: tuple[tuple[str, str], ...] = ()  # (name, why) of cases left out by skip_bad

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"Dataset.images must be (N, S, S), got {self.images.shape}")
        if len(self.names) != self.images.shape[0]:
            raise ValueError(f"Dataset has {len(self.names)} names for {len(self.images)} images")
        if self.masks is not None and self.masks.shape != self.images.shape:
            raise ValueError(
                f"Dataset.masks {self.masks.shape} do not match images {self.images.shape}"
            )

    def __len__(self) -> int:
        return len(self.names)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _list_image_files(folder: Path) -> list[Path]:
    """Non-hidden regular files in `folder` with an image extension (any case), sorted by name."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list folder ({_one_line(e.strerror or e)})") from e
    files = [
        p
        for p in entries
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    return sorted(files, key=lambda p: p.name)


def _by_name(files: list[Path], name_of: Callable[[Path], str | None]) -> dict[str, Path]:
    """Maps case name -> file; files for which name_of returns None are skipped."""
    out: dict[str, Path] = {}
    for path in files:
        name = name_of(path)
        if name is None:
            continue
        if name in out:
            raise DataError(f"{path}: duplicate case name {name!r} (also {out[name].name})")
        out[name] = path
    return out


def _nnunet_name(path: Path) -> str | None:
    """'case_0000.png' -> 'case'; other channels ('case_0001.png') -> None (only channel 0 used)."""
    match = _NNUNET_IMAGE_STEM.match(path.stem)
    if match is None:
        raise DataError(f"{path}: nnU-Net image name must end in _0000 (e.g. case_0000.png)")
    return match["name"] if match["channel"] == "0000" else None


def find_pairs(
    root: str | Path,
    *,
    require_masks: bool = True,
    names: list[str] | None = None,
    skip_bad: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> list[tuple[str, Path, Path | None]]:
    """Lists (name, image_path, mask_path) for a folder, sorted by name.

    Layouts: (a) root/images/NAME.ext + root/masks/NAME.ext; (b) nnU-Net root/imagesTr/NAME_0000.ext
    + root/labelsTr/NAME.ext (other channels NAME_0001.. are ignored). Extensions .png .jpg .jpeg
    .tif .tiff .bmp in any case; hidden files, sub-folders and other files are ignored. With
    require_masks=False the mask folder is never looked at and every mask_path is None.
    Raises DataError for a missing root, image folder, mask folder, images, or unmatched files.
    names: only these cases matter (an unmatched file outside them is ignored). skip_bad: an
    unmatched file is left out, and (name, why) appended to `skipped`, instead of raising.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: is not a folder")
    if (root / "images").is_dir():
        image_dir, mask_dir = root / "images", root / "masks"
        images = _by_name(_list_image_files(image_dir), lambda p: p.stem)
    elif (root / "imagesTr").is_dir():
        image_dir, mask_dir = root / "imagesTr", root / "labelsTr"
        images = _by_name(_list_image_files(image_dir), _nnunet_name)
    else:
        raise DataError(f"{root}: no images/ or imagesTr/ folder")
    if not images:
        raise DataError(f"{image_dir}: no image files ({' '.join(IMAGE_EXTENSIONS)})")
    wanted = None if names is None else set(names)
    keep = sorted(images) if wanted is None else sorted(set(images) & wanted)
    if not require_masks:
        return [(name, images[name], None) for name in keep]

    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: mask folder does not exist (needed for {image_dir})")
    masks = _by_name(_list_image_files(mask_dir), lambda p: p.stem)
    problems = [
        (n, f"{images[n]}: image has no mask in {mask_dir}") for n in keep if n not in masks
    ]
    problems += [
        (n, f"{masks[n]}: mask has no image in {image_dir}")
        for n in sorted(masks)
        if n not in images and (wanted is None or n in wanted)
    ]
    if problems and not skip_bad:
        raise DataError(problems[0][1])
    if skipped is not None:
        skipped.extend(problems)
    return [(n, images[n], masks[n]) for n in keep if n in masks]


def _read(path: Path, what: str) -> Image.Image:
    """Opens and decodes an image file fully; any failure becomes a one-line DataError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        reason = _one_line(f"{type(e).__name__}: {e}")
        raise DataError(f"{path}: not a readable {what} ({reason})") from e


def _grey_array(im: Image.Image) -> np.ndarray:
    """(H, W) array of grey values: 16/32-bit and float modes kept numeric, others via mode 'L'."""
    if im.mode in _NUMERIC_MODES:
        return np.asarray(im)
    if im.mode != "L":
        if im.mode in ("P", "PA"):
            im = im.convert("RGBA")
        im = im.convert("L")
    return np.asarray(im)


def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")


def _normalise(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) float32 min-max normalised to [0, 1]; a constant image becomes zeros."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros(image.shape, np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm"


def _raw_grey(path: Path) -> np.ndarray:
    """(H, W) float32 grey values of an image file at its own size (DICOM: display values)."""
    if _is_dicom(path):
        from nca_jax.dicom import read_dicom

        grey = read_dicom(path).astype(np.float32)
    else:
        grey = _grey_array(_read(path, "image")).astype(np.float32)
    if grey.ndim != 2 or grey.size == 0:
        raise DataError(f"{path}: not a readable image (unexpected pixel array {grey.shape})")
    if not np.isfinite(grey).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    return grey


def read_grey_native(path: str | Path) -> np.ndarray:
    """One image at its own size: (H, W) float32 min-max normalised to [0, 1]."""
    return _normalise(_raw_grey(Path(path)))


def _load_image_and_shape(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """((size, size) float32 in [0, 1], original (H, W)) for one image file."""
    _check_size(size)
    path = Path(path)
    grey = _raw_grey(path)
    shape = (int(grey.shape[0]), int(grey.shape[1]))
    if shape != (size, size):
        resized = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR)
        grey = np.asarray(resized, dtype=np.float32)
    return _normalise(grey), shape


def load_image(path: Path, size: int = 256) -> np.ndarray:
    """Reads one image as (size, size) float32 in [0, 1].

    Colour / palette images are converted to grey (Pillow mode 'L'); 16-bit ('I;16', 'I') and float
    ('F') images keep their full precision. The image is resized bilinearly to size x size when its
    shape differs, then min-max normalised (a constant image becomes all zeros).
    Raises DataError("<path>: not a readable image (<reason>)") for unreadable files.
    """
    return _load_image_and_shape(path, size)[0]


def _half_range(values: np.ndarray) -> float:
    """Binarisation threshold for a non-binary mask: half of the dtype's range."""
    if values.dtype == np.bool_:
        return 0.5
    if np.issubdtype(values.dtype, np.floating):
        return 0.5
    if values.dtype.itemsize == 1:
        return 128.0
    return 32768.0  # 16-bit data (Pillow stores 16-bit PNG/TIFF as 'I;16' or 'I')


def _nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) nearest-neighbour resampling (pixel centres)."""
    rows = np.minimum(
        ((np.arange(size) + 0.5) * mask.shape[0] / size).astype(np.int64), mask.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(size) + 0.5) * mask.shape[1] / size).astype(np.int64), mask.shape[1] - 1
    )
    return mask[rows[:, None], cols[None, :]]


def load_mask(
    path: Path,
    size: int = 256,
    *,
    image_shape: tuple[int, int] | None = None,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Reads one lung mask as (size, size) float32 in {0, 1}.

    Binarisation rule: a mask with at most two distinct values, the lower being 0, is binary and
    its foreground is value > 0 (so 0/1, 0/255 and 0/65535 masks all work); a mask of one value
    is all background (0) or all foreground (any other value). Any other mask (e.g. a
    JPEG with compression noise, or 0/1/2 labels) is binarised at half the dtype's range: >= 128
    for 8-bit, >= 32768 for 16-bit/32-bit integer, >= 0.5 for float; `warn` (default
    warnings.warn) is then called with a one-line message naming the file. Colour masks are read
    as grey (mode 'L'). If image_shape (the image's ORIGINAL (H, W)) is given and the mask's
    original shape differs, DataError is raised. Resizing, when needed, is nearest-neighbour
    after binarising. Unreadable files raise DataError.
    """
    _check_size(size)
    mask = read_mask_native(path, image_shape=image_shape, warn=warn)
    if mask.shape != (size, size):
        mask = _nearest(mask, size)
    return mask


def read_mask_native(
    path: str | Path,
    *,
    image_shape: tuple[int, int] | None = None,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """One lung mask at its own size: (H, W) float32 in {0, 1}; rules as in load_mask."""
    path = Path(path)
    if _is_dicom(path):
        from nca_jax.dicom import read_dicom

        values = read_dicom(path, raw=True)
    else:
        values = _grey_array(_read(path, "mask"))
    if values.ndim != 2 or values.size == 0:
        raise DataError(f"{path}: not a readable mask (unexpected pixel array {values.shape})")
    if image_shape is not None and tuple(values.shape) != tuple(image_shape):
        (mh, mw), (ih, iw) = values.shape, image_shape
        raise DataError(f"{path}: mask is {mh}x{mw} but its image is {ih}x{iw}")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise DataError(f"{path}: mask contains NaN or infinite values")

    lo, hi = values.min(), values.max()
    if lo == hi:  # one value: all background (0) or, by the same rule, all foreground (> 0)
        mask = values > 0
    elif lo == 0 and bool(np.all((values == lo) | (values == hi))):
        mask = values > 0
    else:
        threshold = _half_range(values)
        mask = values >= threshold
        message = (
            f"{path}: mask is not binary (values {lo}..{hi}, not just 0 and one other value); "
            f"binarised at >= {threshold:g}"
        )
        if warn is None:
            warnings.warn(message, stacklevel=2)
        else:
            warn(message)
    return mask.astype(np.float32)


MaskFor = Callable[[str, Path, tuple[int, int]], np.ndarray]  # (name, image, shape) -> (H, W)


def _chexmask_source(csv_path: str | Path, names: list[str]) -> MaskFor:
    """Masks for the named cases from a CheXmask CSV (read once, only the rows needed)."""
    from nca_jax.chexmask import lung_mask, read_chexmask_csv

    rows = read_chexmask_csv(csv_path, names=set(names))

    def mask_for(name: str, image_path: Path, shape: tuple[int, int]) -> np.ndarray:
        if name not in rows:
            raise DataError(f"{csv_path}: no row for image {image_path} (case {name!r})")
        return lung_mask(rows[name], shape, image_path)

    return mask_for


def _load_pairs(
    pairs: list[tuple[str, Path, Path | None]],
    *,
    size: int,
    require_masks: bool,
    warn: Callable[[str], None] | None,
    source: str,
    mask_for: MaskFor | None = None,
    skip_bad: bool = False,
    skipped: list[tuple[str, str]] | None = None,
) -> Dataset:
    """Loads (name, image, mask) triples into a Dataset of (N, size, size) arrays. Masks come from
    the mask files, or from mask_for(name, image_path, original_shape) when given. skip_bad:
    a case raising DataError is left out with a warning (all cases bad is still an error);
    `skipped` (name, why) pairs found earlier (unmatched files) are warned about too, and all of
    them are recorded in Dataset.skipped."""
    _check_size(size)
    say = warn or (lambda m: warnings.warn(m, stacklevel=3))
    images = np.empty((len(pairs), size, size), np.float32)
    masks = np.empty((len(pairs), size, size), np.float32) if require_masks else None
    kept: list[int] = []
    skipped = list(skipped or [])
    for name, why in skipped:
        say(f"skipped {name}: {why}")
    for i, (name, image_path, mask_path) in enumerate(pairs):
        try:
            images[i], shape = _load_image_and_shape(image_path, size)
            if masks is not None:
                if mask_for is not None:
                    m = mask_for(name, image_path, shape)
                    masks[i] = m if m.shape == (size, size) else _nearest(m, size)
                elif mask_path is None:
                    raise DataError(f"{image_path}: image has no mask")
                else:
                    masks[i] = load_mask(mask_path, size, image_shape=shape, warn=warn)
        except DataError as e:
            if not skip_bad:
                raise
            say(f"skipped {name}: {e}")
            skipped.append((name, str(e)))
            continue
        kept.append(i)
    if not kept:
        raise DataError(f"{source}: no case could be read")
    if len(kept) < len(pairs):
        images = images[kept]
        masks = None if masks is None else masks[kept]
    return Dataset(tuple(pairs[i][0] for i in kept), images, masks, source, tuple(skipped))


def load_folder(
    root: str | Path,
    *,
    size: int = 256,
    require_masks: bool = True,
    warn: Callable[[str], None] | None = None,
    chexmask: str | Path | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """find_pairs + load every pair: images (N, size, size), masks (N, size, size) or None.
    chexmask: masks from this CheXmask CSV instead of a mask folder (masks/ is not read).
    skip_bad: leave out unreadable cases with a warning instead of raising."""
    skipped: list[tuple[str, str]] = []
    pairs = find_pairs(
        root, require_masks=require_masks and chexmask is None, skip_bad=skip_bad, skipped=skipped
    )
    mask_for = _chexmask_source(chexmask, [p[0] for p in pairs]) if chexmask else None
    return _load_pairs(
        pairs,
        size=size,
        require_masks=require_masks,
        warn=warn,
        source=str(Path(root)),
        mask_for=mask_for if require_masks else None,
        skip_bad=skip_bad,
        skipped=skipped,
    )


def read_names(names_file: str | Path) -> list[str]:
    """Case names from a text file: one per line, '#' starts a comment, blank lines ignored."""
    names_file = Path(names_file)
    try:
        text = names_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{names_file}: cannot read case list ({_one_line(e)})") from e
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name in seen:
            raise DataError(
                f"{names_file}:{lineno}: case {name!r} is listed twice (first on line {seen[name]})"
            )
        seen[name] = lineno
        names.append(name)
    if not names:
        raise DataError(f"{names_file}: lists no cases")
    return names


def load_split(
    root: str | Path,
    names_file: str | Path,
    *,
    size: int = 256,
    require_masks: bool = True,
    warn: Callable[[str], None] | None = None,
    chexmask: str | Path | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """Like load_folder (same keyword arguments) but only the cases listed in `names_file` (see
    read_names), in the file's order. A listed name not in the folder raises DataError."""
    names = read_names(names_file)
    skipped: list[tuple[str, str]] = []
    found = find_pairs(
        root,
        require_masks=require_masks and chexmask is None,
        names=names,
        skip_bad=skip_bad,
        skipped=skipped,
    )
    by_name = {p[0]: p for p in found}
    gone = {n for n, _ in skipped}
    for name in names:
        if name not in by_name and name not in gone:
            if not skip_bad:
                raise DataError(f"{names_file}: case {name!r} is not in {root}")
            skipped.append((name, f"{names_file}: case {name!r} is not in {root}"))
    names = [n for n in names if n in by_name]
    mask_for = _chexmask_source(chexmask, names) if chexmask and require_masks else None
    return _load_pairs(
        [by_name[name] for name in names],
        size=size,
        require_masks=require_masks,
        warn=warn,
        source=str(Path(root)),
        mask_for=mask_for,
        skip_bad=skip_bad,
        skipped=skipped,
    )
