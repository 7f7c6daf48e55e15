"""Reading DICOM X-rays (``.dcm``) with pydicom, an optional extra (``nca-jax[dicom]``).

The stored values become what a radiologist sees: the modality LUT (RescaleSlope /
RescaleIntercept, or a Modality LUT Sequence), then the file's first VOI window (WindowCenter /
WindowWidth, or a VOI LUT Sequence) when it has one, then MONOCHROME1 (white = low values) is
inverted so that bone is bright as in MONOCHROME2. pydicom does the LUT arithmetic. Every
problem is a one-line :class:`~nca_jax.errors.DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nca_jax.errors import DataError


def _error(path: Path, text: str) -> Exception:
    return DataError(f"{path}: {' '.join(text.split())}")


def read_dicom(path: str | Path, *, raw: bool = False) -> np.ndarray:
    """Pixel values of a single-frame DICOM image as (H, W) float64.

    raw=False: modality LUT, VOI window (when present) and MONOCHROME1 inversion applied (for
    images); raw=True: the stored values as they are (for label masks). Colour images (3 samples
    per pixel) are averaged to grey. Raises DataError when pydicom is missing, the file is not
    DICOM, has no pixel data (e.g. a structured report), has several frames, or its transfer
    syntax is compressed and no installed decoder can read it.
    """
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError as e:
        raise _error(path, "reading DICOM needs pydicom: pip install 'nca-jax[dicom]'") from e
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise _error(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # truncated files raise EOFError, OSError, struct errors, ...
        raise _error(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        what = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("Modality", "unknown")
        raise _error(path, f"DICOM has no pixel data, so it is not an image ({what})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise _error(path, f"DICOM has {frames} frames; one 2-D X-ray image is expected")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        if syntax is not None and syntax.is_compressed:
            raise _error(
                path,
                f"compressed transfer syntax {syntax.name} ({syntax}) cannot be decoded with "
                f"what is installed ({reason}); install a decoder (e.g. pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg) or convert the file to an uncompressed "
                "syntax",
            ) from e
        raise _error(path, f"cannot read the DICOM pixel data ({reason})") from e
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or arr.ndim == 3:
        return arr.reshape(arr.shape[0], arr.shape[1], -1).mean(-1).astype(np.float64)
    if arr.ndim != 2:
        raise _error(path, f"DICOM pixel array has shape {arr.shape}; a 2-D image is expected")
    if raw:
        return arr.astype(np.float64)
    out = np.asarray(apply_modality_lut(arr, ds), np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        out = np.asarray(apply_voi_lut(out, ds, index=0), np.float64)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = out.max() - out
    return out
