"""Evaluation of a trained run on a folder: per-case Dice, soft Dice, HD95, quality score,
a nnU-Net-style `summary.json`, and PNGs (predicted mask, std map, overlay) per case.

Every image is predicted alone (a batch of one: batch norm uses that image's own statistics),
`samples` times with keys fold_in(fold_in(key(seed), i), j); the prediction is the mean of the
sigmoid probabilities thresholded at 0.5. Usage:
    python evaluate.py --run RUN --data DIR --out OUT [--samples 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nca_jax import checkpoint as ckpt
from nca_jax.cli import run_cli
from nca_jax.config import RunConfig
from nca_jax.data import Dataset, load_folder, load_split
from nca_jax.metrics import case_metrics, summarize
from nca_jax.model import Params
from nca_jax.paths import check_output_folder
from nca_jax.predict import bar_off, make_history, make_predict, predict_dataset
from nca_jax.render import (  # noqa: F401 (overlay_rgb, std_rgb re-exported)
    overlay_rgb,
    rollout_frames,
    save_gif,
    save_image,
    std_rgb,
)


def write_case_pngs(
    folder: Path, name: str, image: np.ndarray, probs: np.ndarray, target: np.ndarray | None
) -> None:
    """probs (S, H, W) -> NAME_pred.png (0/255), NAME_std.png (colour; only for S > 1),
    NAME_overlay.png."""
    pred = probs.mean(0) > 0.5
    save_image(folder / f"{name}_pred.png", (pred * 255).astype(np.uint8))
    if len(probs) > 1:
        save_image(folder / f"{name}_std.png", std_rgb(probs.std(0)))
    tgt = None if target is None else target > 0.5
    save_image(folder / f"{name}_overlay.png", overlay_rgb(image, pred, tgt))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(
    cfg: RunConfig,
    params: Params,
    data: Dataset,
    *,
    samples: int = 10,
    seed: int = 0,
    chunk: int = 4,
    png_dir: Path | None = None,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Scores `params` on `data` (masks optional). Returns the summary dict (see module doc).
    A deterministic model (a UNet) is predicted once, whatever `samples` says: its quality
    score (the spread of samples) is absent (None), not 0, and it gets no std maps."""
    t0 = time.perf_counter()
    deterministic = cfg.model.kind == "unet"
    samples = 1 if deterministic else samples
    predict = make_predict(cfg.model, samples)
    probs = predict_dataset(
        predict, params, data.images, jax.random.key(seed), chunk=chunk, progress=progress
    )
    cases = []
    for i, name in enumerate(data.names):
        target = None if data.masks is None else data.masks[i] > 0.5
        row = {"name": name, **case_metrics(probs[:, i], target)}
        if deterministic:
            row["quality"] = None
        cases.append(row)
        if png_dir is not None:
            write_case_pngs(png_dir, name, data.images[i], probs[:, i], target)
    out: dict[str, Any] = {
        "n": len(cases),
        "samples": samples,
        "seed": seed,
        "deterministic": deterministic,
    }
    keys = (
        ([] if deterministic else ["quality"])
        + ["fg_fraction"]
        + (["dice", "soft_dice", "hd95"] if data.masks is not None else [])
    )
    for k in keys:
        s = summarize([c[k] for c in cases])
        out[f"{k}_mean"], out[f"{k}_std"] = s["mean"], s["std"]
        if k == "hd95":
            out["hd95_undefined"] = s["n_nan"]
    if deterministic:
        out["quality_mean"] = out["quality_std"] = None
    out["seconds"] = time.perf_counter() - t0
    out["cases"] = cases
    return out


def write_animations(
    cfg: RunConfig,
    params: Params,
    data: Dataset,
    folder: Path,
    *,
    seed: int = 0,
    every: int = 1,
    progress: bool | None = False,
) -> list[Path]:
    """NAME_rollout.gif per case in `folder`: the lung channel over the image after each NCA
    step, level 1 then level 2, of the case's first sample (the same keys as sample 0 of
    evaluate(seed=seed), so the last frame is that prediction). Returns the files written."""
    history = make_history(cfg.model)
    key = jax.random.key(seed)
    out = []
    for i in tqdm(range(len(data.names)), desc="animations", disable=bar_off(progress)):
        l1, l2 = history(params, jnp.asarray(data.images[i]), key, jnp.int32(i))
        frames = rollout_frames(data.images[i], np.asarray(l1), np.asarray(l2), every=every)
        path = folder / f"{data.names[i]}_rollout.gif"
        save_gif(path, frames)
        out.append(path)
    return out


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Deletes the hidden temporary folders `.OUT.PID.*` beside `out` that an evaluation killed
    before its rename left behind (PID no longer running); returns what it removed."""
    gone = []
    for p in out.parent.glob(f".{out.name}.*.*"):
        pid = p.name[len(out.name) + 2 :].split(".", 1)[0]
        if not (p.is_dir() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: another evaluation's work in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a trained Med-NCA run on a folder.")
    p.add_argument("--run", required=True, help="run folder (config.json + weights.npz)")
    p.add_argument(
        "--weights", help="weights .npz to use instead of the run's (e.g. from a device)"
    )
    p.add_argument("--data", help="folder with images/ (+ masks/); default: embedded phantoms")
    p.add_argument("--split", help="text file of case names to evaluate (default: all)")
    p.add_argument("--no-masks", action="store_true", help="predict only; never read masks")
    p.add_argument("--chexmask", help="CheXmask CSV giving the lung masks (instead of masks/)")
    p.add_argument(
        "--skip-bad", action="store_true", help="leave out unreadable cases with a warning"
    )
    p.add_argument("--out", required=True, help="output folder (must not exist, or --overwrite)")
    p.add_argument("--samples", type=int, default=10, help="stochastic predictions per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chunk",
        type=int,
        help="images per jitted call (default: about 10 "
        "predictions per call; much larger calls ran slower per image on this CPU)",
    )
    p.add_argument("--no-png", action="store_true", help="skip the per-case PNGs")
    p.add_argument(
        "--animate",
        action="store_true",
        help="also write cases/NAME_rollout.gif: the NCA's rollout (level 1, then level 2) of "
        "each case's first sample, the lung channel over the image",
    )
    p.add_argument(
        "--animate-every", type=int, default=2, help="one GIF frame per this many NCA steps"
    )
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.chunk = a.chunk or max(1, 10 // max(a.samples, 1))
    if a.samples < 1 or a.chunk < 1 or a.animate_every < 1:
        raise ckpt.RunError("--samples, --chunk and --animate-every must be >= 1")
    inputs = (a.run, a.weights, a.data, a.split, a.chexmask)
    out = check_output_folder(a.out, inputs, marker="summary.json", what="evaluation folder")
    if out.exists() and any(out.iterdir()) and not a.overwrite:
        raise ckpt.RunError(f"{out}: exists and is not empty (use --overwrite)")
    cfg, params = ckpt.load_run(a.run, a.weights)
    if a.animate and cfg.model.kind != "med-nca":
        raise ckpt.RunError(f"{a.run}: --animate shows an NCA's steps; a {cfg.model.kind} has none")
    size = cfg.train.image_size
    if a.data is None:
        from nca_jax.phantoms import PHANTOM_TEST_SEED, make_phantom_dataset

        data = make_phantom_dataset(20, PHANTOM_TEST_SEED, size)
    else:
        kw = {
            "size": size,
            "require_masks": not a.no_masks,
            "chexmask": a.chexmask,
            "skip_bad": a.skip_bad,
            "warn": lambda m: print(f"warning: {m}", file=sys.stderr),
        }
        data = load_split(a.data, a.split, **kw) if a.split else load_folder(a.data, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", dir=out.parent))
    try:
        png_dir = None
        if not a.no_png or a.animate:
            (tmp / "cases").mkdir()
        if not a.no_png:
            png_dir = tmp / "cases"
        summary = evaluate(
            cfg,
            params,
            data,
            samples=a.samples,
            seed=a.seed,
            chunk=a.chunk,
            png_dir=png_dir,
            progress=None,
        )
        if a.animate:
            write_animations(
                cfg, params, data, tmp / "cases", seed=a.seed, every=a.animate_every, progress=None
            )
        wpath = Path(a.weights) if a.weights else Path(a.run) / "weights.npz"
        summary = {
            "run": str(a.run),
            "weights": str(wpath),
            "weights_sha256": _sha256(wpath),
            "data": data.source,
            "split": a.split,
            "n_skipped": len(data.skipped),
            "skipped": [{"name": n, "why": why} for n, why in data.skipped],
            "config": cfg.to_dict(),
            **summary,
        }
        ckpt.write_json(tmp / "summary.json", summary)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    msg = f"n={summary['n']}"
    if "dice_mean" in summary:
        msg += (
            f" Dice {summary['dice_mean']:.4f} +- {summary['dice_std']:.4f}"
            f"  soft Dice {summary['soft_dice_mean']:.4f}  HD95 {summary['hd95_mean']:.2f} px"
        )
    q = summary["quality_mean"]
    msg += "  quality (deterministic model)" if q is None else f"  quality {q:.4f}"
    print(f"{msg}  -> {out / 'summary.json'}")
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
