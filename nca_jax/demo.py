"""The end-to-end demo on the embedded synthetic phantoms, no data needed:
train a small Med-NCA -> evaluate it with 10 stochastic samples -> write figures.
Usage: python -m nca_jax.demo --out demo-out [--config configs/demo.json] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nca_jax.cli import run_cli
from nca_jax.config import load_config, with_overrides
from nca_jax.evaluate import main as evaluate_main
from nca_jax.phantoms import PHANTOM_TRAIN_SEED, PHANTOM_VAL_SEED, make_phantom_dataset
from nca_jax.training import train_and_evaluate

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--epochs", type=int)
    p.add_argument("--phantoms", type=int, default=40)
    p.add_argument("--samples", type=int, default=10)
    a = p.parse_args(argv)
    out = Path(a.out)
    t0 = time.perf_counter()
    cfg = with_overrides(load_config(a.config), epochs=a.epochs)
    size = cfg.train.image_size
    train = make_phantom_dataset(a.phantoms, PHANTOM_TRAIN_SEED, size)
    val = make_phantom_dataset(max(a.phantoms // 4, 4), PHANTOM_VAL_SEED, size)
    print(f"[1/2] training on {len(train)} phantoms ({size} px) -> {out / 'run'}")
    summary = train_and_evaluate(cfg, train, out / "run", val=val)
    print(f"      {summary['steps']} steps, best validation Dice {summary['best_val_dice']:.3f}")
    print(f"[2/2] evaluating on held-out phantoms ({a.samples} samples each) -> {out / 'eval'}")
    evaluate_main(
        [
            "--run",
            str(out / "run"),
            "--out",
            str(out / "eval"),
            "--samples",
            str(a.samples),
            "--overwrite",
        ]
    )
    ev = json.loads((out / "eval" / "summary.json").read_text())
    wall = time.perf_counter() - t0
    print(
        f"done in {wall:.0f} s: test Dice {ev['dice_mean']:.3f} +- {ev['dice_std']:.3f}; "
        f"figures: {out / 'run' / 'training_curve.png'}, {out / 'eval' / 'cases'}"
    )
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
