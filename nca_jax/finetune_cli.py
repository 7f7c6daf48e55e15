"""`python finetune.py`: VWSL fine-tuning of a trained run on a folder of unlabelled images."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from nca_jax import checkpoint as ckpt
from nca_jax.cli import run_cli
from nca_jax.config import ConfigError, FinetuneConfig, load_config
from nca_jax.data import load_folder, load_split
from nca_jax.finetuning import finetune
from nca_jax.guard import PRIOR_BY_DEFAULT, resolve_prior_share
from nca_jax.paths import check_output_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="VWSL fine-tuning on unlabelled images (no masks read)."
    )
    p.add_argument("--run", required=True, help="trained run folder (config.json + weights.npz)")
    p.add_argument("--weights", help="weights .npz to start from instead of the run's")
    p.add_argument("--data", required=True, help="folder with images/ (masks are never read)")
    p.add_argument("--split", help="text file of case names to use (default: all)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--config", help="JSON with a 'finetune' section (or the section itself)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--gamma", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--refresh-every", type=int)
    p.add_argument("--target-reduce", choices=["median", "mean"])
    p.add_argument("--weight-kind", choices=["std", "var"])
    p.add_argument("--method", choices=["vwsl", "pseudo-label", "entropy"])
    p.add_argument("--update", choices=["all", "norm"], help="parameters that change")
    p.add_argument(
        "--check-every",
        type=int,
        help="epochs between label-free checks (0 = none, no rollback); default 20",
    )
    p.add_argument(
        "--no-rollback",
        action="store_true",
        help="keep the last check's weights even when no check is acceptable",
    )
    p.add_argument(
        "--keep",
        choices=["latest", "until-failure"],
        help="which acceptable check's weights: the latest, or the latest before the first "
        "check that fails",
    )
    p.add_argument(
        "--prior-share",
        help="anatomical prior for the checks: 'auto' (the source run's train_mask_share in "
        "run.json), a number (the mean lung share of the source site's training masks) or "
        "'none'; a check then fails when its lung share moves away from it (default: "
        + (
            "'auto', or none with a warning when the run lacks it)" if PRIOR_BY_DEFAULT else "none)"
        ),
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--no-uncertainty-after",
        action="store_true",
        help="skip the std maps / quality scores after fine-tuning",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="leave out unreadable images with a warning"
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(
    a: argparse.Namespace, warn: Callable[[str], None] = lambda m: None
) -> FinetuneConfig:
    base = FinetuneConfig()
    section: dict = {}
    if a.config:
        try:
            data = json.loads(Path(a.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{a.config}: not a readable JSON config ({e})") from e
        section = data.get("finetune", data) if isinstance(data, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"{a.config}: expected a JSON object")
        section = {k: v for k, v in section.items() if not k.startswith("_")}  # comments
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        if set(section) - names:
            raise ConfigError(
                f"{a.config}: unknown finetune field(s) {sorted(set(section) - names)}"
            )
        base = FinetuneConfig(**section)
    over = {
        "epochs": a.epochs,
        "gamma": a.gamma,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "samples": a.samples,
        "refresh_every": a.refresh_every,
        "target_reduce": a.target_reduce,
        "weight_kind": a.weight_kind,
        "seed": a.seed,
        "method": a.method,
        "update": a.update,
        "check_every": a.check_every,
        "rollback": False if a.no_rollback else None,
        "keep": a.keep,
        # a config's prior_share stands unless --prior-share is given
        "prior_share": None
        if a.prior_share is None and "prior_share" in section
        else resolve_prior_share(
            a.prior_share,
            lambda: ckpt.run_summary(a.run).get("train_mask_share"),
            str(Path(a.run) / "run.json"),
            warn,
        ),
    }
    fc = dataclasses.replace(
        base, **{k: v for k, v in over.items() if v is not None}, source_run=str(a.run)
    )
    fc.validate()
    return fc


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    inputs = (a.run, a.weights, a.data, a.split, a.config)
    out = check_output_folder(a.out, inputs, marker="config.json", what="run folder")
    if a.resume and (out / "config.json").exists():
        saved = load_config(out / "config.json")
        if saved.finetune is None:
            raise ckpt.RunError(f"{out}: not a fine-tuning run")
        fc = saved.finetune
    else:
        # bad gamma / lr: error before anything is read or written
        fc = build_config(a, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    source, params = ckpt.load_run(a.run, a.weights)
    size = source.train.image_size
    kw = {
        "size": size,
        "require_masks": False,
        "skip_bad": a.skip_bad,
        "warn": lambda m: print(f"warning: {m}", file=sys.stderr),
    }
    data = load_split(a.data, a.split, **kw) if a.split else load_folder(a.data, **kw)
    if fc.batch_size > len(data):  # config.json must say what the run does
        print(
            f"warning: batch size {fc.batch_size} but only {len(data)} images: "
            f"batch size {len(data)}",
            file=sys.stderr,
        )
        fc = dataclasses.replace(fc, batch_size=len(data))
    s = finetune(
        source,
        params,
        data,
        out,
        fc,
        resume=a.resume,
        progress=not a.no_progress,
        uncertainty_after=not a.no_uncertainty_after,
    )
    msg = f"fine-tuned {s['steps']} steps on {s['n_train']} unlabelled images -> {out}"
    if "quality_before_mean" in s:
        msg += (
            f"; mean quality score {s['quality_before_mean']:.4f} -> "
            f"{s['quality_after_mean']:.4f} (lower = surer)"
        )
    if "foreground_before_mean" in s:
        msg += (
            f"; predicted foreground {s['foreground_before_mean']:.1%} -> "
            f"{s['foreground_after_mean']:.1%} of the image"
        )
    print(msg)
    if s.get("area_warning"):
        print(f"warning: {s['area_warning']}", file=sys.stderr)
    if s.get("verdict_line"):
        print(s["verdict_line"])  # the last line: 'adapted: ...' or 'rolled back: ...'
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
