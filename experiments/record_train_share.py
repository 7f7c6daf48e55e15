"""Record train_mask_share in the run.json of a run trained before train.py recorded it.

finetune.py's safety net takes its anatomical prior P from the source run's run.json
(`train_mask_share`: the mean lung share of the training masks, which train.py writes since
session 15). The committed sources were trained earlier, so without this `finetune.py --run`
on them would fall back to no prior with a warning. This computes P exactly as train.py does
(share of mask pixels > 0.5 at the run's image size) from the split the run was trained on,
checks that the split has the run's n_train cases, and adds it to run.json (atomically), with
a note saying it was recorded afterwards.

Usage:
    python experiments/record_train_share.py --run results/runs/ttd-cpu-batch4-seed0 \
        --site shenzhen [--split shenzhen_train] [--data ../shared/data/cxr] \
        [--splits results/splits]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.common import load_site
from nca_jax import checkpoint as ckpt
from nca_jax.cli import run_cli
from nca_jax.config import load_config
from nca_jax.errors import RunError


def record_share(
    run: str | Path, data: str | Path, splits: str | Path, site: str, split: str
) -> float:
    """Adds train_mask_share (and where it came from) to run/run.json; returns it. RunError
    when the run has no run.json or the split's size differs from the run's n_train."""
    run = Path(run)
    summary = ckpt.run_summary(run)
    if not summary:
        raise RunError(f"{run / 'run.json'}: missing (not a trained run)")
    size = load_config(run / "config.json").train.image_size
    train = load_site(data, splits, site, split, size)
    if "n_train" in summary and summary["n_train"] != len(train):
        raise RunError(
            f"{run / 'run.json'}: n_train {summary['n_train']} but {split} has {len(train)} "
            "cases: not the split this run was trained on"
        )
    share = float((train.masks > 0.5).mean())
    summary["train_mask_share"] = share
    summary["train_mask_share_recorded"] = (
        f"afterwards, by experiments/record_train_share.py from {split} at {size} px"
    )
    ckpt.write_json(run / "run.json", summary)
    return share


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--site", required=True, help="the site folder under --data")
    ap.add_argument("--split", help="the training split (default SITE_train)")
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--splits", default="results/splits", help="folder of SPLIT.txt files")
    a = ap.parse_args(argv)
    share = record_share(a.run, a.data, a.splits, a.site, a.split or f"{a.site}_train")
    print(f"{a.run}: train_mask_share {share:.4f}")
    return 0


if __name__ == "__main__":
    run_cli(main)
