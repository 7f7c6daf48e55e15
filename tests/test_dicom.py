"""DICOM input: rescale slope/intercept, VOI window, MONOCHROME1, folders of .dcm images, and a
one-line error for every bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from nca_jax.data import DataError, load_folder, read_grey_native  # noqa: E402
from nca_jax.dicom import read_dicom  # noqa: E402


def write_dcm(
    path: Path,
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    syntax=ExplicitVRLittleEndian,
    frames: int = 1,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        pixels = np.asarray(pixels, np.uint16)
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = pixels.tobytes()
        else:  # junk compressed fragments: what a decoder-less install meets
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7junk" * 8])
            ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp() -> np.ndarray:
    return (np.arange(16 * 16).reshape(16, 16) * 16).astype(np.uint16)  # 0 .. 4080


def test_rescale_slope_and_intercept(tmp_path: Path):
    f = write_dcm(tmp_path / "a.dcm", _ramp(), slope=2.0, intercept=-1024.0)
    np.testing.assert_array_equal(read_dicom(f, raw=True), _ramp())
    np.testing.assert_allclose(read_dicom(f), _ramp() * 2.0 - 1024.0)


def test_window_from_the_file_clips_outside_it(tmp_path: Path):
    f = write_dcm(tmp_path / "a.dcm", _ramp(), window=(2000.0, 1000.0))
    out = read_dicom(f)
    raw = _ramp().astype(float)
    low, high = raw < 1500 - 1, raw > 2500
    assert np.ptp(out[low]) == 0 and np.ptp(out[high]) == 0  # saturated outside the window
    inside = ~low & ~high
    assert np.all(np.diff(out[inside].ravel()) > 0)  # and still increasing inside it
    assert out[high].min() > out[low].max()


def test_monochrome1_is_inverted(tmp_path: Path):
    m2 = read_grey_native(write_dcm(tmp_path / "m2.dcm", _ramp()))
    m1 = read_grey_native(write_dcm(tmp_path / "m1.dcm", _ramp(), photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2[0, 0] == 0 and m1[0, 0] == 1  # lowest stored value is white in MONOCHROME1


def test_folder_of_dicom_images_with_png_masks(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        write_dcm(tmp_path / "images" / f"c{i}.dcm", _ramp() + i)
        m = np.zeros((16, 16), np.uint8)
        m[4:12, 3 + i : 8 + i] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"c{i}.png")
    d = load_folder(tmp_path, size=32)
    assert d.names == ("c0", "c1") and d.images.shape == (2, 32, 32)
    assert d.images.min() == 0 and d.images.max() == 1
    assert d.masks.sum() == 2 * 8 * 5 * 4  # nearest-neighbour 2x upsampling


@pytest.mark.parametrize(
    "kind, message",
    [
        ("not_dicom", "not a DICOM file"),
        ("no_pixels", "no pixel data"),
        ("compressed", "compressed transfer syntax JPEG-LS Lossless"),
        ("frames", "has 2 frames"),
    ],
)
def test_bad_dicom_files_give_one_line_errors(tmp_path: Path, kind: str, message: str):
    f = tmp_path / "x.dcm"
    if kind == "not_dicom":
        f.write_text("hello, not DICOM")
    elif kind == "no_pixels":
        write_dcm(f, None)
    elif kind == "compressed":
        write_dcm(f, _ramp(), syntax=JPEGLSLossless)
    else:
        write_dcm(f, np.stack([_ramp(), _ramp()]), frames=2)
    with pytest.raises(DataError, match=message) as e:
        read_grey_native(f)
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)


def test_skip_bad_keeps_the_rest_of_a_folder(tmp_path: Path):
    (tmp_path / "images").mkdir()
    write_dcm(tmp_path / "images" / "good.dcm", _ramp())
    (tmp_path / "images" / "bad.dcm").write_text("broken")
    with pytest.raises(DataError, match="bad.dcm"):
        load_folder(tmp_path, size=16, require_masks=False)
    seen: list[str] = []
    d = load_folder(tmp_path, size=16, require_masks=False, skip_bad=True, warn=seen.append)
    assert d.names == ("good",) and len(seen) == 1 and "bad.dcm" in seen[0]
