"""Synthetic chest X-ray-like phantoms with lung masks: the embedded default dataset.

A phantom is drawn in normalised coordinates (x, y in [-1, 1], y pointing down, the patient's
right lung on the image's left as in a frontal radiograph): a bright body on dark air, two dark
lung fields (tapered superellipses cut by diaphragm domes and by the heart), a bright spine and
mediastinum, rib and clavicle arcs, lung texture, smooth shading, noise and random contrast.

Command line: ``python -m nca_jax.phantoms --out DIR --n 20 --seed 0 [--size 256]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from nca_jax.cli import run_cli
from nca_jax.data import Dataset
from nca_jax.render import save_image

# The seeds of the built-in phantom sets, so that train, validation and test never overlap.
PHANTOM_TRAIN_SEED, PHANTOM_VAL_SEED, PHANTOM_TEST_SEED = 1000, 2000, 3000


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinate grids, each (size, size) float32 in [-1, 1] at pixel centres."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    return np.broadcast_to(c[:, None], (size, size)), np.broadcast_to(c[None, :], (size, size))


def _rotate(y: np.ndarray, x: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (y, x) rotated by `angle` radians (same shapes)."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return c * y - s * x, s * y + c * x


def _sq(a: np.ndarray) -> np.ndarray:
    """a * a (numpy's float32 ** with integer exponents > 2 is slow)."""
    return a * a


def _bump(z: np.ndarray) -> np.ndarray:
    """exp(-z) for z >= 0, with z clipped at 30 (exp of huge negatives is slow: denormals)."""
    return np.exp(-np.minimum(z, np.float32(30.0)))


def _lung(
    rng: np.random.Generator, y: np.ndarray, x: np.ndarray, side: int, heart: np.ndarray
) -> np.ndarray:
    """(H, W) bool field of one lung; side -1 = image left (patient right), +1 = image right."""
    top = rng.uniform(-0.84, -0.70)
    bottom = rng.uniform(0.50, 0.66) + (0.04 if side > 0 else -0.02)  # the liver lifts the right
    half_h = (bottom - top) / 2
    cx = side * rng.uniform(0.40, 0.46)
    w_lat = rng.uniform(0.35, 0.41)
    w_med = rng.uniform(0.22, 0.27) * (0.88 if side > 0 else 1.0)  # heart side narrower
    # Local coordinates: u > 0 lateral, v > 0 down; the apex leans towards the midline.
    v, u = _rotate(y - (top + bottom) / 2, side * (x - cx), rng.uniform(0.0, 0.1))
    t = np.clip((v + half_h) / (2 * half_h), 0.0, 1.0)  # 0 at the apex, 1 at the base
    width = np.where(u > 0, np.float32(w_lat), np.float32(w_med)) * (0.3 + 0.7 * np.sqrt(t))
    p = rng.uniform(2.4, 3.2)
    inside = np.abs(u / width) ** p + np.abs(v / half_h) ** p <= 1.0
    # Diaphragm dome: the base rises in the middle, the costophrenic angle stays deep laterally.
    dome = rng.uniform(0.08, 0.15)
    peak = rng.uniform(-0.10, 0.05)
    base = half_h - dome * _bump(_sq((u - peak) / (0.3 * (w_lat + w_med))))
    return _largest_component(inside & (v <= base) & ~heart)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool keeping only the largest 4-connected component."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == np.argmax(sizes)


def _smooth_field(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, waves: int) -> np.ndarray:
    """(H, W) float32 sum of `waves` random low-frequency cosines, in [-1, 1]."""
    out = np.zeros(y.shape, np.float32)
    for _ in range(waves):
        fy, fx = rng.uniform(-1.5, 1.5, size=2).astype(np.float32)
        out += np.cos(np.float32(np.pi) * (fy * y + fx * x) + np.float32(rng.uniform(0, 2 * np.pi)))
    return out / np.float32(waves)


def _ribs(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: 11 posterior and fainter anterior rib arcs per side."""
    d = np.abs(x)
    out = np.zeros(y.shape, np.float32)
    for posterior in (True, False):
        spacing = rng.uniform(0.14, 0.17)
        first = rng.uniform(-0.95, -0.85)
        if posterior:  # from the spine: level, then curving down laterally
            curve = d * (rng.uniform(0.5, 0.7) * d - 0.18)
            reach = (d > 0.06) & (d < 0.92)
        else:  # from the side: running down towards the midline, fading medially
            curve = 0.35 - rng.uniform(0.35, 0.5) * d
            reach = (d > 0.3) & (d < 0.9)
        q = (y - curve - first) / spacing
        k = np.round(q)
        jitter = rng.normal(0.0, 0.012, size=13).astype(np.float32)
        offset = (q - k) * spacing - jitter[np.clip(k, -1, 11).astype(np.int64) + 1]
        offset /= rng.uniform(0.022, 0.03)  # rib half-thickness
        offset *= offset
        band = 1.0 / (1.0 + offset * offset)  # flat-topped rib profile
        out += (1.0 if posterior else 0.4) * band * (reach & (k >= 0) & (k < 11))
    return out


def make_phantom(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic frontal chest radiograph and its lung mask, drawn from `rng`.

    Returns image (size, size) float32 in [0, 1] (min-max normalised) and mask (size, size)
    float32 in {0, 1}: the two lung fields only (one connected component each; ribs crossing the
    lungs do not change the mask), together about 0.18-0.30 of the image (mean ~0.23).
    The patient's right lung is on the image's left; the other is narrowed by the heart.
    size >= 16; about 10 ms at 256 x 256.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    y0, x0 = _grid(size)
    # Patient position: small rotation, shift and scale of the whole chest.
    y, x = _rotate(
        y0 - rng.uniform(-0.05, 0.05), x0 - rng.uniform(-0.04, 0.04), rng.uniform(-0.05, 0.05)
    )
    scale = np.float32(1.0 / rng.uniform(0.88, 1.06))
    y, x = y * scale, x * scale
    ax = np.abs(x)

    body_w = rng.uniform(0.90, 0.99)
    bx, by = np.abs(x / body_w), np.abs((y - 0.3) / 1.3)
    torso = bx * bx * bx + by * by * np.sqrt(by) <= 1.0
    neck = (ax < rng.uniform(0.18, 0.24)) & (y < -0.5)
    body = torso | neck

    hy, hx = _rotate(
        y - rng.uniform(0.42, 0.52), x - rng.uniform(0.10, 0.16), rng.uniform(-0.45, -0.25)
    )
    heart = _sq(hy / rng.uniform(0.27, 0.32)) + _sq(hx / rng.uniform(0.36, 0.42)) <= 1.0
    lungs = _lung(rng, y, x, -1, heart) | _lung(rng, y, x, +1, heart)
    lungs &= body

    # Attenuation: soft tissue, minus air in the lungs, plus bone and the heart.
    f32 = np.float32
    lung_f, heart_f = lungs.astype(f32), heart.astype(f32)
    texture = ndimage.gaussian_filter(
        rng.standard_normal((size, size), dtype=f32), sigma=max(size / 128, 0.8)
    )
    texture *= f32(0.045 / texture.std())
    air = f32(rng.uniform(0.30, 0.40)) * (0.8 + 0.2 * _smooth_field(rng, y, x, 2)) + texture
    air -= f32(0.08) * _bump(_sq((ax - 0.2) / 0.12) + _sq((y + 0.1) / 0.3))  # hila
    spine = _sq(x / f32(rng.uniform(0.07, 0.10)))
    spine = f32(0.22) * _bump(spine * spine * spine)
    spine *= 0.85 + 0.15 * np.cos(f32(2 * np.pi / 0.15) * y)  # vertebrae
    clavicle_y = f32(rng.uniform(-0.75, -0.65)) - 0.25 * (ax - 0.1) + 0.5 * _sq(ax - 0.4)
    clavicle = f32(0.15) * _bump(_sq(_sq((y - clavicle_y) / 0.03)))
    clavicle *= (ax > 0.08) & (ax < 0.75)
    ribs = _ribs(rng, y, x)
    ribs *= f32(rng.uniform(0.10, 0.16)) * (0.35 + 0.65 * lung_f)
    trachea = f32(0.08) * _bump(_sq(_sq(x / 0.035)))
    trachea *= (y < -0.25) & (y > -0.98)
    image = spine + clavicle + ribs - trachea + 0.04 * heart_f + f32(rng.uniform(0.5, 0.6))
    image *= body
    image -= lung_f * air
    image = ndimage.gaussian_filter(image, sigma=size / 256)

    # Acquisition: smooth shading, contrast / brightness / gamma, noise.
    image *= 1.0 + f32(rng.uniform(0.05, 0.15)) * _smooth_field(rng, y0, x0, 3)
    image = _minmax(image)
    image = f32(rng.uniform(0.8, 1.3)) * (image - 0.5) + f32(0.5 + rng.uniform(-0.1, 0.1))
    image = np.clip(image, 0, 1) ** f32(rng.uniform(0.7, 1.4))
    image += f32(rng.uniform(0.005, 0.03)) * rng.standard_normal((size, size), dtype=f32)
    return _minmax(image), lung_f


def _minmax(image: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) float32 rescaled to exactly [0, 1]."""
    lo, hi = image.min(), image.max()
    return np.clip((image - lo) / max(hi - lo, np.float32(1e-12)), 0, 1).astype(np.float32)


def _phantom(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom `index` of the set drawn from `seed` (independent of how many are drawn)."""
    return make_phantom(np.random.default_rng([seed, index]), size)


def _name(seed: int, index: int) -> str:
    return f"phantom_{seed}_{index:04d}"


def make_phantom_dataset(n: int, seed: int, size: int = 256) -> Dataset:
    """n phantoms as a Dataset: images and masks (n, size, size) float32; phantom i is drawn
    from np.random.default_rng([seed, i]), so it does not depend on n."""
    if n < 0 or size < 16:
        raise ValueError(f"need n >= 0 and size >= 16, got n={n}, size={size}")
    images = np.empty((n, size, size), np.float32)
    masks = np.empty((n, size, size), np.float32)
    for i in range(n):
        images[i], masks[i] = _phantom(seed, i, size)
    names = tuple(_name(seed, i) for i in range(n))
    return Dataset(names, images, masks, f"phantoms(seed={seed})")


def write_phantom_folder(out: str | Path, n: int, seed: int, size: int = 256) -> Path:
    """Writes out/images/NAME.png (8-bit grey) and out/masks/NAME.png (0/255) for n phantoms, the
    same as make_phantom_dataset(n, seed, size), readable by data.load_folder(out). Returns out."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = _phantom(seed, i, size)
        name = _name(seed, i)
        save_image(out / "images" / f"{name}.png", np.round(image * 255).astype(np.uint8))
        save_image(out / "masks" / f"{name}.png", (mask > 0).astype(np.uint8) * 255)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: write a folder of phantoms (images/ and masks/)."""
    parser = argparse.ArgumentParser(
        prog="python -m nca_jax.phantoms",
        description="Write synthetic chest X-ray phantoms as OUT/images/*.png and OUT/masks/*.png.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=20, help="number of phantoms (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    if args.size < 16:
        parser.error("--size must be >= 16")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    out = write_phantom_folder(args.out, args.n, args.seed, args.size)
    print(f"wrote {args.n} phantoms to {out}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
