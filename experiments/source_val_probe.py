"""Issue 14: does the source site's labelled validation set detect harm on the new site?

Model selection in unsupervised domain adaptation has one standard label-free baseline that the
safety net (nca_jax/guard.py) does not use: the Dice on the SOURCE site's labelled validation
images ("source risk"). It needs no target label, only the source data a user who trained the
model has anyway (a phone may not). If fine-tuning harms the model on the new site, does it
also lower the Dice on the source site, and does it leave that Dice alone when it helps?

Per snapshot of a finished fine-tuning run, with the same sampling key for every snapshot:
  src_dice  Dice of the median of --samples predictions on the first --images images of the
            source site's validation split, against their labels (the criterion)
  dev_dice  the same on the first --images images the run adapted to (target site), against
            labels the fine-tuning never read: used here only to judge the criterion
Test images are not used, so nothing here tunes on the test split.

Finding (session 13, results/README.md): it reads the same under two key sets and falls in the
harmful run, but with all 50 images it falls almost as far in a helpful run (-0.20 against
-0.23 points) and five times further in a harmless one: it measures forgetting of the source
site, not harm on the new one, so the safety net does not use it.

Usage:
    python experiments/source_val_probe.py --out results/source_val_probe.json \
        --run RUN[:EPOCHS] ... [--images 25] [--samples 1] [--seed 0]
Rows already in --out are kept (the command resumes); --markdown-only rewrites the .md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.common import FINETUNE_SPLIT, head
from experiments.label_free_probe import other_site, probe_parser, source_weights, target_of
from nca_jax import checkpoint as ckpt
from nca_jax.config import atomic_write_text, load_config
from nca_jax.data import load_split
from nca_jax.metrics import dice
from nca_jax.predict import make_predict, predict_dataset


def median_dice(probs: np.ndarray, labels: np.ndarray) -> float:
    """probs (S, N, H, W), labels (N, H, W) -> mean Dice of each image's median mask."""
    med = np.median(probs, axis=0) > 0.5
    return float(np.mean([dice(m, y) for m, y in zip(med, labels, strict=True)]))


def markdown(rows: list[dict[str, Any]], images: int, samples: int, seeds: list[int]) -> str:
    """Rows -> a table per run (changes from the source, epoch 0) and the tally: in how many
    snapshots src_dice moved the way dev_dice moved."""
    out = [
        "# Does the source site's validation Dice detect harm? (issue 14)",
        "",
        f"`experiments/source_val_probe.py`: up to {images} source-site validation images "
        f"(src_dice) and {images} of the images each run adapted to (dev_dice, labels read "
        f"only to judge), median of {samples} prediction(s), one sampling key per seed for "
        "every snapshot. Changes are in Dice points against epoch 0 (the source model), same key.",
        "",
        "| run | key seed | epoch | dev_dice | src_dice | d dev | d src | agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    hit = n = 0
    for r in sorted(rows, key=lambda r: (r["run"], r["seed"], r["epoch"])):
        # epoch 0 is the source model: a run probed without it borrows another run's epoch 0
        # with the same target site and key (the same weights, images and key: the same row)
        same = [
            x
            for x in rows
            if x["epoch"] == 0
            and x["seed"] == r["seed"]
            and target_of(x["run"]) == target_of(r["run"])
        ]
        if not same:
            raise ValueError(f"{r['run']}: no epoch-0 row for its target site and key seed")
        src = min(same, key=lambda x: x["run"] != r["run"])
        dd = 100 * (r["dev_dice"] - src["dev_dice"])
        ds = 100 * (r["src_dice"] - src["src_dice"])
        agree = ""
        if r["epoch"]:
            n += 1
            hit += int(dd * ds > 0)
            agree = "yes" if dd * ds > 0 else "no"
        out.append(
            f"| {r['run']} | {r['seed']} | {r['epoch']} | {r['dev_dice']:.4f} | "
            f"{r['src_dice']:.4f} | {dd:+.2f} | {ds:+.2f} | {agree} |"
        )
    out += ["", f"src_dice moved with dev_dice in {hit} of {n} snapshots (key seeds {seeds})."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = probe_parser(__doc__, images=25, samples=1).parse_args(argv)

    out = Path(a.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["run"], r["seed"], r["epoch"]) for r in rows}
    key = jax.random.key(a.seed)
    for spec in [] if a.markdown_only else a.run:
        path, _, eps = spec.partition(":")
        run = Path(path)
        epochs = [int(e) for e in eps.split(",")] if eps else [0]
        if all((run.name, a.seed, e) in done for e in epochs):
            continue
        cfg = load_config(run / "config.json")
        tgt = target_of(run.name)
        src = other_site(tgt)
        dev = head(
            load_split(Path(a.data) / tgt, Path(a.splits) / f"{FINETUNE_SPLIT[tgt]}.txt"),
            a.images,
        )
        val = head(load_split(Path(a.data) / src, Path(a.splits) / f"{src}_val.txt"), a.images)
        pred = make_predict(cfg.model, a.samples)
        for e in epochs:
            if (run.name, a.seed, e) in done:
                continue
            t0 = time.time()
            w = (
                source_weights(a.protocol, a.work, src)
                if e == 0
                else run / "snapshots" / f"epoch{e:04d}.npz"
            )
            params = ckpt.load_weights(w, cfg)
            row = {
                "run": run.name,
                "seed": a.seed,
                "epoch": e,
                "dev_dice": median_dice(predict_dataset(pred, params, dev.images, key), dev.masks),
                "src_dice": median_dice(predict_dataset(pred, params, val.images, key), val.masks),
                "wall_s": time.time() - t0,
            }
            rows.append(row)
            atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
            print(json.dumps(row))
            sys.stdout.flush()
    seeds = sorted({r["seed"] for r in rows})
    atomic_write_text(out.with_suffix(".md"), markdown(rows, a.images, a.samples, seeds))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
