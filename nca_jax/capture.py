"""Phone-capture simulator: what a phone photo of an X-ray on a monitor or a lightbox adds.

Where no digital copy exists, a health worker photographs the film on a lightbox or the image on
a monitor. :func:`capture` reproduces the effects of such a photo on an image (and warps its lung
mask the same way), all from explicit parameters, so that a folder is reproduced exactly:

========================  ==========================================================  ==========
effect                    model                                                       range
========================  ==========================================================  ==========
border                    the monitor's bezel (dark) or the lightbox (bright) frames  0 - 0.2 of
                          the image; width as a fraction of the photo's side          the side
perspective (keystone)    the four corners of the displayed image move independently  0 - 0.15
+ rotation                (a homography), then the whole photo turns                  0 - 15 deg
moire                     a monitor's pixel grid (dark gaps between its pixels) is    amp 0 - 0.3
                          point-sampled by the camera: the grid's pitch is near the   pitch 1 - 2
                          camera's pixel pitch, so it aliases into curved fringes     photo px
gamma, contrast           x -> clip((x ** gamma - 0.5) * contrast + 0.5, 0, 1)        0.5 - 2;
                                                                                       1 - 2
uneven light, glare       a linear light gradient, a vignette, a Gaussian glare spot   0 - 0.5
defocus blur              Gaussian of sigma pixels (a thin-lens disk, approximated)    0 - 3 px
sensor noise              additive Gaussian, std in units of the [0, 1] range          0 - 0.08
JPEG                      8-bit JPEG encode/decode at a quality                        20 - 100
========================  ==========================================================  ==========

Presets ``mild``, ``moderate`` and ``severe`` (:data:`PRESETS`) give a range for each parameter;
:func:`draw_params` draws one :class:`CaptureParams` per image from a numpy Generator, and the
CLI seeds that Generator from ``(--seed, crc32(case name))``, so an image's capture does not
depend on which other images are in the folder. Everything is numpy/scipy/Pillow; no JAX here.

CLI::

    python -m nca_jax.capture --data DIR --out DIR2 --preset moderate --seed S [--figure F.png]

writes DIR2/images/ (8-bit PNG), DIR2/masks/ (0/255, warped like their images) when DIR has
masks, and DIR2/capture.json with the parameters drawn for every image.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from nca_jax.cli import run_cli
from nca_jax.config import atomic_write_text
from nca_jax.render import save_figure, save_image

DISPLAYS = ("monitor", "lightbox")


@dataclasses.dataclass(frozen=True)
class CaptureParams:
    """One photo's effects; the defaults leave the image unchanged (each effect off)."""

    border: float = 0.0  # frame width, fraction of the photo's side
    display: str = "monitor"  # "monitor" (dark bezel, pixel grid) or "lightbox" (bright frame)
    border_value: float = 0.0  # grey level of the frame
    corners: tuple[float, ...] = (0.0,) * 8  # (dx, dy) of TL, TR, BR, BL, fraction of the side
    rotation_deg: float = 0.0
    moire_amp: float = 0.0  # depth of the dark gaps of the screen's pixel grid
    moire_pitch: float = 1.25  # screen pixel pitch in photo pixels
    gamma: float = 1.0
    contrast: float = 1.0
    light_slope: float = 0.0  # light gradient, change of gain across half the photo
    light_angle: float = 0.0  # direction of the gradient, radians
    vignette: float = 0.0  # gain lost at the corners
    glare_amp: float = 0.0
    glare_x: float = 0.5  # centre, fraction of the width
    glare_y: float = 0.5
    glare_sigma: float = 0.15  # fraction of the side
    blur_sigma: float = 0.0  # pixels
    noise_std: float = 0.0
    noise_seed: int = 0
    jpeg_quality: int | None = None  # None: no JPEG step

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["corners"] = list(self.corners)
        return d


@dataclasses.dataclass(frozen=True)
class Preset:
    """Ranges (lo, hi) each parameter is drawn from uniformly; see the module table."""

    border: tuple[float, float]
    keystone: float  # max |corner shift|, fraction of the side
    rotation_deg: float  # max |rotation|
    moire_amp: tuple[float, float]
    moire_pitch: tuple[float, float]
    gamma: tuple[float, float]
    contrast: tuple[float, float]
    light: float  # max gradient slope and max vignette
    glare: float  # max glare peak
    blur: tuple[float, float]
    noise: tuple[float, float]
    jpeg: tuple[int, int]


PRESETS: dict[str, Preset] = {
    "mild": Preset(
        border=(0.02, 0.05),
        keystone=0.02,
        rotation_deg=2.0,
        moire_amp=(0.02, 0.06),
        moire_pitch=(1.1, 1.6),
        gamma=(0.9, 1.1),
        contrast=(1.0, 1.1),
        light=0.1,
        glare=0.05,
        blur=(0.0, 0.5),
        noise=(0.005, 0.015),
        jpeg=(85, 95),
    ),
    "moderate": Preset(
        border=(0.04, 0.08),
        keystone=0.05,
        rotation_deg=5.0,
        moire_amp=(0.05, 0.12),
        moire_pitch=(1.1, 1.5),
        gamma=(0.75, 1.35),
        contrast=(1.1, 1.3),
        light=0.25,
        glare=0.15,
        blur=(0.5, 1.2),
        noise=(0.015, 0.03),
        jpeg=(60, 80),
    ),
    "severe": Preset(
        border=(0.06, 0.12),
        keystone=0.08,
        rotation_deg=8.0,
        moire_amp=(0.1, 0.2),
        moire_pitch=(1.1, 1.4),
        gamma=(0.6, 1.7),
        contrast=(1.2, 1.6),
        light=0.4,
        glare=0.3,
        blur=(1.0, 2.5),
        noise=(0.03, 0.06),
        jpeg=(30, 50),
    ),
}

# Which CaptureParams fields make up each effect (used by the per-effect figure).
EFFECTS: dict[str, tuple[str, ...]] = {
    "border": ("border", "display", "border_value"),
    "perspective": ("corners", "rotation_deg"),
    "moire": ("moire_amp", "moire_pitch"),
    "gamma_contrast": ("gamma", "contrast"),
    "light_glare": (
        "light_slope",
        "light_angle",
        "vignette",
        "glare_amp",
        "glare_x",
        "glare_y",
        "glare_sigma",
    ),
    "blur": ("blur_sigma",),
    "noise": ("noise_std", "noise_seed"),
    "jpeg": ("jpeg_quality",),
}


def draw_params(preset: Preset, rng: np.random.Generator) -> CaptureParams:
    """One photo's parameters, drawn from the preset's ranges with `rng` only."""
    u = rng.uniform
    display = DISPLAYS[int(rng.integers(2))]
    return CaptureParams(
        border=float(u(*preset.border)),
        display=display,
        border_value=float(u(0.0, 0.12) if display == "monitor" else u(0.85, 1.0)),
        corners=tuple(float(c) for c in u(-preset.keystone, preset.keystone, 8)),
        rotation_deg=float(u(-preset.rotation_deg, preset.rotation_deg)),
        moire_amp=float(u(*preset.moire_amp)) if display == "monitor" else 0.0,
        moire_pitch=float(u(*preset.moire_pitch)),
        gamma=float(np.exp(u(np.log(preset.gamma[0]), np.log(preset.gamma[1])))),
        contrast=float(u(*preset.contrast)),
        light_slope=float(u(0.0, preset.light)),
        light_angle=float(u(0.0, 2 * np.pi)),
        vignette=float(u(0.0, preset.light)),
        glare_amp=float(u(0.0, preset.glare)),
        glare_x=float(u(0.15, 0.85)),
        glare_y=float(u(0.15, 0.85)),
        glare_sigma=float(u(0.08, 0.25)),
        blur_sigma=float(u(*preset.blur)),
        noise_std=float(u(*preset.noise)),
        noise_seed=int(rng.integers(2**31)),
        jpeg_quality=int(rng.integers(preset.jpeg[0], preset.jpeg[1] + 1)),
    )


def case_rng(seed: int, name: str) -> np.random.Generator:
    """The Generator for one case: depends on the seed and the case name only."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(3, 3) projective map taking the 4 points src (4, 2) to dst (4, 2) (x, y order)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (X, Y)) in enumerate(zip(src, dst, strict=True)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -x * X, -y * X]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -x * Y, -y * Y]
        b[2 * k], b[2 * k + 1] = X, Y
    return np.append(np.linalg.solve(a, b), 1.0).reshape(3, 3)


def _source_coords(shape: tuple[int, int], p: CaptureParams) -> tuple[np.ndarray, np.ndarray]:
    """For every photo pixel centre, the (u, v) point of the displayed image it sees, (H, W) each
    in image pixel units (pixel (i, j) covers u in [j, j+1), v in [i, i+1))."""
    h, w = shape
    b = p.border
    quad = np.array(
        [[b * w, b * h], [w - b * w, b * h], [w - b * w, h - b * h], [b * w, h - b * h]], float
    )
    quad = quad + np.asarray(p.corners, float).reshape(4, 2) * [w, h]
    t = np.deg2rad(p.rotation_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    centre = np.array([w / 2, h / 2])
    quad = (quad - centre) @ rot.T + centre
    image_corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    inv = np.linalg.inv(homography(image_corners, quad))
    y, x = np.mgrid[0:h, 0:w].astype(float) + 0.5
    q = inv @ np.stack([x.ravel(), y.ravel(), np.ones(x.size)])
    return (q[0] / q[2]).reshape(h, w), (q[1] / q[2]).reshape(h, w)


def _photometric(img: np.ndarray, p: CaptureParams) -> np.ndarray:
    h, w = img.shape
    y, x = np.mgrid[0:h, 0:w].astype(float) + 0.5
    xn, yn = (x - w / 2) / (w / 2), (y - h / 2) / (h / 2)  # [-1, 1]
    gain = 1.0 + p.light_slope * (np.cos(p.light_angle) * xn + np.sin(p.light_angle) * yn)
    gain -= p.vignette * (xn**2 + yn**2) / 2
    img = img * np.maximum(gain, 0.1)
    s = p.glare_sigma * max(h, w)
    img = img + p.glare_amp * np.exp(
        -((x - p.glare_x * w) ** 2 + (y - p.glare_y * h) ** 2) / (2 * s * s)
    )
    img = np.clip(img, 0.0, 1.0) ** p.gamma
    return np.clip((img - 0.5) * p.contrast + 0.5, 0.0, 1.0)


def capture(
    image: np.ndarray, mask: np.ndarray | None, p: CaptureParams
) -> tuple[np.ndarray, np.ndarray | None]:
    """Photograph `image` (H, W) float in [0, 1] under p -> ((H, W) uint8 photo, (H, W) uint8 0/1
    mask warped by the same geometry, or None). Pure: the result depends only on the inputs."""
    image = np.asarray(image, np.float64)
    if image.ndim != 2:
        raise ValueError(f"capture: image must be (H, W), got {image.shape}")
    h, w = image.shape
    u, v = _source_coords((h, w), p)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    coords = np.stack([v - 0.5, u - 0.5])
    img = ndimage.map_coordinates(image, coords, order=1, mode="nearest")
    if p.moire_amp > 0:  # the screen's pixel grid, point-sampled by the camera's pixels
        scale = max(1.0 - 2.0 * p.border, 0.1)  # photo pixels per image pixel, about
        pitch = p.moire_pitch / scale  # in image pixel units
        gaps = (np.sin(np.pi * u / pitch) ** 2 + np.sin(np.pi * v / pitch) ** 2) / 2
        img = img * (1.0 - p.moire_amp * gaps)
    img = np.where(inside, img, p.border_value)
    img = _photometric(img, p)
    if p.blur_sigma > 0:
        img = ndimage.gaussian_filter(img, p.blur_sigma, mode="nearest")
    if p.noise_std > 0:
        img = img + np.random.default_rng(p.noise_seed).normal(0.0, p.noise_std, img.shape)
    out = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    if p.jpeg_quality is not None:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(p.jpeg_quality))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    warped = None
    if mask is not None:
        if np.shape(mask) != (h, w):
            raise ValueError(f"capture: mask {np.shape(mask)} does not match image {(h, w)}")
        m = ndimage.map_coordinates(
            (np.asarray(mask) > 0.5).astype(np.uint8), coords, order=0, mode="constant"
        )
        warped = (m * inside).astype(np.uint8)
    return out, warped


def only(effect: str, p: CaptureParams) -> CaptureParams:
    """The identity CaptureParams with just `effect`'s fields taken from p."""
    if effect not in EFFECTS:
        raise ValueError(f"unknown effect {effect!r}; one of {', '.join(EFFECTS)}")
    fields = {f: getattr(p, f) for f in EFFECTS[effect]}
    if effect == "moire":  # the grid is drawn on a monitor only
        fields["display"] = "monitor"
    return dataclasses.replace(CaptureParams(), **fields)


def effects_figure(image: np.ndarray, p: CaptureParams, png: Path) -> None:
    """One row: the image, then each effect of p alone, then all together (labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {name: only(name, p) for name in EFFECTS}
    if p.moire_amp == 0:  # drawn as a lightbox photo (no grid): show the grid at depth 0.15
        shown["moire"] = dataclasses.replace(shown["moire"], moire_amp=0.15)
    labels = {
        "border": f"border {p.border:.2f} ({p.display})",
        "perspective": f"keystone, rot {p.rotation_deg:.1f} deg",
        "moire": f"moire amp {shown['moire'].moire_amp:.2f} pitch {p.moire_pitch:.2f}",
        "gamma_contrast": f"gamma {p.gamma:.2f} contrast {p.contrast:.2f}",
        "light_glare": f"light {p.light_slope:.2f} glare {p.glare_amp:.2f}",
        "blur": f"blur sigma {p.blur_sigma:.1f} px",
        "noise": f"noise std {p.noise_std:.3f}",
        "jpeg": f"JPEG quality {p.jpeg_quality}",
    }
    panels = [("input", np.round(np.asarray(image) * 255).astype(np.uint8))]
    for name in EFFECTS:
        panels.append((labels[name], capture(image, None, shown[name])[0]))
    panels.append(("all (" + p.display + ")", capture(image, None, p)[0]))
    fig, axes = plt.subplots(2, (len(panels) + 1) // 2, figsize=(2.6 * (len(panels) + 1) // 2, 5.6))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, im) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(im, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)


def capture_folder(
    data: str | Path,
    out: str | Path,
    preset: str,
    seed: int,
    *,
    overwrite: bool = False,
    skip_bad: bool = False,
    warn: Any = None,
) -> dict[str, Any]:
    """Captures every image of folder `data` (images/ [+ masks/]) into the new folder `out`.

    Images keep their size and name (written as 8-bit PNG); masks are warped like their image.
    Writes into a temporary sibling and renames it to `out` at the end, so a failure leaves no
    half-written folder. Returns the manifest written to out/capture.json.
    Raises DataError for bad input (with skip_bad, unreadable cases are skipped with a warning).
    """
    from nca_jax.data import DataError, find_pairs, read_grey_native, read_mask_native

    if preset not in PRESETS:
        raise DataError(f"--preset {preset!r}: unknown; one of {', '.join(PRESETS)}")
    data, out = Path(data), Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: already exists (choose a new --out, or pass --overwrite)")
    if out.resolve() == data.resolve():
        raise DataError(f"{out}: is the input folder")
    has_masks = (data / "masks").is_dir() or (data / "labelsTr").is_dir()
    pairs = find_pairs(data, require_masks=has_masks)
    warn = warn or (lambda m: warnings.warn(m, stacklevel=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        if has_masks:
            (tmp / "masks").mkdir()
        cases: dict[str, Any] = {}
        for name, image_path, mask_path in tqdm(pairs, desc="capture", disable=None):
            try:
                grey = read_grey_native(image_path)
                mask = None
                if mask_path is not None:
                    mask = read_mask_native(mask_path, image_shape=grey.shape)
            except DataError as e:
                if not skip_bad:
                    raise
                warn(f"skipped: {e}")
                continue
            p = draw_params(PRESETS[preset], case_rng(seed, name))
            photo, warped = capture(grey, mask, p)
            save_image(tmp / "images" / f"{name}.png", photo)
            if warped is not None:
                save_image(tmp / "masks" / f"{name}.png", warped * 255)
            cases[name] = p.to_json()
        if not cases:
            raise DataError(f"{data}: no image could be read")
        manifest = {"source": str(data), "preset": preset, "seed": seed, "cases": cases}
        atomic_write_text(tmp / "capture.json", json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            shutil.rmtree(trash)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def main(argv: list[str] | None = None) -> int:
    from nca_jax.data import read_grey_native

    p = argparse.ArgumentParser(
        prog="python -m nca_jax.capture",
        description="Turn a folder of X-rays into simulated phone photos (masks warped alike).",
    )
    p.add_argument("--data", required=True, help="folder with images/ (and optionally masks/)")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--preset", default="moderate", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", help="also write a PNG: the first image under each effect alone")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable cases with a warning")
    a = p.parse_args(argv)
    manifest = capture_folder(
        a.data,
        a.out,
        a.preset,
        a.seed,
        overwrite=a.overwrite,
        skip_bad=a.skip_bad,
        warn=lambda m: print(f"warning: {m}", file=sys.stderr),
    )
    if a.figure:
        first = sorted(manifest["cases"])[0]
        from nca_jax.data import find_pairs

        path = {n: ip for n, ip, _ in find_pairs(a.data, require_masks=False)}[first]
        effects_figure(
            read_grey_native(path),
            draw_params(PRESETS[a.preset], case_rng(a.seed, first)),
            Path(a.figure),
        )
    n = len(manifest["cases"])
    print(f"wrote {n} captured images ({a.preset}, seed {a.seed}) to {a.out}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
