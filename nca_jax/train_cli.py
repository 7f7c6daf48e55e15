"""`python train.py`: supervised Med-NCA training (thin wrapper over nca_jax.training)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nca_jax.cli import run_cli
from nca_jax.config import RunConfig, load_config, with_overrides
from nca_jax.data import Dataset, load_folder, load_split
from nca_jax.paths import check_output_folder
from nca_jax.phantoms import PHANTOM_TRAIN_SEED, PHANTOM_VAL_SEED, make_phantom_dataset
from nca_jax.training import train_and_evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train Med-NCA on labelled images.")
    p.add_argument(
        "--data",
        help="folder with images/ + masks/ (or imagesTr/ + labelsTr/); "
        "default: the embedded synthetic phantoms",
    )
    p.add_argument("--split", help="text file of case names to train on (default: all)")
    p.add_argument("--val", help="validation folder; the best-Dice weights become weights.npz")
    p.add_argument("--val-split", help="text file of validation case names")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--config", help="config JSON (full or partial); default: the paper's")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--chexmask",
        help="CheXmask CSV: lung masks (left | right) for the images of --data and --val, "
        "instead of a masks/ folder",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="leave out unreadable cases with a warning"
    )
    p.add_argument("--phantoms", type=int, default=40, help="number of phantoms without --data")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_labelled(
    folder: str | None,
    split: str | None,
    size: int,
    n_phantoms: int,
    phantom_seed: int,
    *,
    chexmask: str | None = None,
    skip_bad: bool = False,
) -> Dataset:
    if folder is None:
        return make_phantom_dataset(n_phantoms, phantom_seed, size)
    warn = _warn_stderr
    if split:
        return load_split(folder, split, size=size, chexmask=chexmask, skip_bad=skip_bad, warn=warn)
    return load_folder(folder, size=size, chexmask=chexmask, skip_bad=skip_bad, warn=warn)


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    inputs = (a.data, a.split, a.val, a.val_split, a.config, a.chexmask)
    check_output_folder(a.out, inputs, marker="config.json", what="run folder")
    if a.resume and a.config is None and (Path(a.out) / "config.json").exists():
        cfg = load_config(Path(a.out) / "config.json")
    else:
        cfg = load_config(a.config) if a.config else RunConfig().validate()
    cfg = with_overrides(cfg, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, lr=a.lr)
    size = cfg.train.image_size
    masks = {"chexmask": a.chexmask, "skip_bad": a.skip_bad}
    train = load_labelled(a.data, a.split, size, a.phantoms, PHANTOM_TRAIN_SEED, **masks)
    val = None
    if a.val or a.data is None:
        n_val = max(a.phantoms // 4, 4)
        val = load_labelled(a.val, a.val_split, size, n_val, PHANTOM_VAL_SEED, **masks)
    if cfg.train.batch_size > len(train):  # config.json must say what the run does
        print(
            f"warning: batch size {cfg.train.batch_size} but only {len(train)} training images: "
            f"batch size {len(train)}",
            file=sys.stderr,
        )
        cfg = with_overrides(cfg, batch_size=len(train))
    summary = train_and_evaluate(
        cfg, train, a.out, val=val, resume=a.resume, progress=not a.no_progress
    )
    print(
        f"trained {summary['steps']} steps; weights: {summary.get('weights')}; "
        f"best validation Dice: {summary['best_val_dice']}"
    )
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
