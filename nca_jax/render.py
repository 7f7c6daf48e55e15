"""Pictures: overlays, uncertainty maps, rollout animations, and writing them atomically.

Every image the project writes goes through :func:`save_image`, :func:`save_figure` or
:func:`save_gif`: encoded in memory, then written to a temporary name and renamed, so a killed
process never leaves a half-written picture.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from nca_jax.config import atomic_write_bytes

STD_DISPLAY_MAX = 0.5  # the largest possible std of a probability: maps to white / top colour


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def overlay_rgb(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None) -> np.ndarray:
    """(H, W) image and boolean masks -> (H, W, 3) uint8: prediction outline red, truth green."""
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1)
    if target is not None:
        rgb[_boundary(target)] = (0, 255, 0)
    rgb[_boundary(pred)] = (255, 0, 0)
    return rgb


def std_rgb(std: np.ndarray) -> np.ndarray:
    """(H, W) per-pixel std in [0, 0.5] -> (H, W, 3) uint8 with the 'magma' colour map."""
    from matplotlib import colormaps

    return (colormaps["magma"](np.clip(std / STD_DISPLAY_MAX, 0, 1))[..., :3] * 255).astype(
        np.uint8
    )


def blend_rgb(image: np.ndarray, prob: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W) image in [0, 1] and (H, W) lung probability -> (H, W, 3) uint8: the probability
    tints the grey image red in proportion (0 = the image alone)."""
    grey = np.clip(image, 0, 1)[..., None] * np.ones(3)
    red = np.array([1.0, 0.15, 0.1])
    a = alpha * np.clip(prob, 0, 1)[..., None]
    return np.round((grey * (1 - a) + red * a) * 255).astype(np.uint8)


def _encoded(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def save_image(path: str | os.PathLike, array: np.ndarray, fmt: str = "PNG") -> None:
    """(H, W) or (H, W, 3) uint8 -> an image file, written atomically."""
    atomic_write_bytes(path, _encoded(Image.fromarray(np.asarray(array)), fmt))


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """A matplotlib figure -> PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def save_gif(
    path: str | os.PathLike, frames: Sequence[np.ndarray], ms_per_frame: int = 80, hold: int = 10
) -> None:
    """(H, W, 3) uint8 frames -> a looping animated GIF, written atomically; the last frame is
    shown `hold` times as long."""
    if not frames:
        raise ValueError("save_gif: no frames")
    ims = [Image.fromarray(np.asarray(f)) for f in frames]
    durations = [ms_per_frame] * (len(ims) - 1) + [ms_per_frame * hold]
    data = _encoded(ims[0], "GIF", save_all=True, append_images=ims[1:], duration=durations, loop=0)
    atomic_write_bytes(path, data)


BAR_PX = 6  # the progress bar above each animation frame
LEVEL_COLOURS = ((0, 170, 255), (255, 150, 0))  # level 1 blue, level 2 orange


def rollout_frames(
    image: np.ndarray, level1: np.ndarray, level2: np.ndarray, every: int = 1
) -> list[np.ndarray]:
    """One NCA prediction as pictures: image (H, W), lung probabilities after each step of level
    1 (S1, H, W) and level 2 (S2, H, W) -> frames (H + BAR_PX, W, 3) uint8, every `every`-th
    step of each level and always its last. Each frame is the lung channel over the image, under
    a bar that fills with the level's colour as the steps go by."""
    h, w = image.shape
    total = len(level1) + len(level2)
    frames = []
    done = 0
    for probs in (level1, level2):
        n = len(probs)
        for i in range(n):
            if (i + 1) % every and i != n - 1:
                continue
            bar = np.full((BAR_PX, w, 3), 40, np.uint8)
            filled = round(w * (done + i + 1) / total)
            split = round(w * len(level1) / total)
            bar[:, : min(filled, split)] = LEVEL_COLOURS[0]
            if filled > split:
                bar[:, split:filled] = LEVEL_COLOURS[1]
            frames.append(np.concatenate([bar, blend_rgb(image, probs[i])], axis=0))
        done += n
    return frames
