"""Issue 14: which label-free figures move the wrong way when fine-tuning harms?

The safety net's checks (lung share, sample spread, sample agreement) improved in every run so
far, including the pseudo-label run that lost 1.55 Dice points, so they cannot detect harm. This
probe computes candidate figures on snapshots of finished runs, on the first --images
fine-tuning images of the target site (the images the run adapted to; the method never read
their labels), and beside them the Dice on those same images' labels, which this probe reads
for one purpose: to say which figure tracks Dice. The test images are not touched, so choosing
a criterion here is not tuning on the test split. Run it with several --seed values: a figure
that tracks Dice under one set of sampling keys may not under another (session 12).

Candidates, per snapshot (means over images):
  area, quality, agreement   the safety net's checks (nca_jax/guard.py), --samples predictions
  tta_<view>                 Dice between the median mask and the mask predicted on a transformed
                             image mapped back (views: hflip, shift, gamma-, gamma+): nothing in
                             VWSL or self-training trains for this invariance
  tta                        mean of the tta_<view>
  components                 connected foreground components of the median mask (2 = two lungs)
  stray                      share of the foreground outside the two largest components
  holes                      share of the filled lungs' area that is a hole
  to_source                  Dice between the snapshot's median mask and the source's
  dev_dice                   Dice of the median mask against the labels (for this study only)

Usage:
    python experiments/label_free_probe.py --out results/label_free_probe.json \
        --run RUN[:EPOCHS] ... [--images 16] [--samples 4]
    python experiments/label_free_probe.py --out results/label_free_probe.json --markdown-only
RUN is a fine-tuning run folder under results/vwsl_units; EPOCHS is a comma list of snapshot
epochs (0 = the run's source weights). Each (run, epoch) row is saved as it ends, and rows
already in --out are kept (the command resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from scipy import ndimage

from experiments.common import FINETUNE_SPLIT, head
from nca_jax import checkpoint as ckpt
from nca_jax.config import atomic_write_text, load_config
from nca_jax.data import load_split
from nca_jax.guard import label_free_check
from nca_jax.metrics import dice
from nca_jax.predict import make_predict, predict_dataset

SHIFT = 12  # pixels, down and right
VIEWS = ("hflip", "shift", "gamma-", "gamma+")


def view(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) in [0, 1] -> the transformed images (same shape)."""
    if name == "hflip":
        return images[:, :, ::-1].copy()
    if name == "shift":
        pad = np.pad(images, ((0, 0), (SHIFT, 0), (SHIFT, 0)), mode="edge")
        return pad[:, : images.shape[1], : images.shape[2]].copy()
    if name == "gamma-":
        return images**0.7
    if name == "gamma+":
        return images**1.5
    raise ValueError(name)


def back(masks: np.ndarray, name: str) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Masks predicted on view `name` mapped back to the original frame, and the region where
    both frames have image content."""
    full = (slice(None), slice(None))
    if name == "hflip":
        return masks[:, :, ::-1], full
    if name == "shift":
        out = np.zeros_like(masks)
        out[:, :-SHIFT, :-SHIFT] = masks[:, SHIFT:, SHIFT:]
        return out, (slice(0, -SHIFT), slice(0, -SHIFT))
    return masks, full


def other_site(site: str) -> str:
    """The other of the two sites."""
    return "shenzhen" if site == "montgomery" else "montgomery"


def target_of(run: str) -> str:
    """'ft-<method>-<source>-to-<target>-s<seed>' -> the target site."""
    return run.split("-to-")[-1].rsplit("-s", 1)[0]


def probe_parser(doc: str | None, images: int, samples: int) -> argparse.ArgumentParser:
    """The command line the probes of finished fine-tuning runs share (--run RUN[:EPOCHS],
    --out, --markdown-only, --images, --samples, --seed and where data and sources are)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", nargs="+", default=[], help="RUN[:EPOCHS], e.g. ft-x:0,20,100")
    ap.add_argument("--markdown-only", action="store_true", help="write the .md from --out")
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=images)
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--splits", default="results/splits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocol", default="configs/vwsl_cpu.json", help="names the sources")
    ap.add_argument("--work", default="results/vwsl_units")
    return ap


def source_weights(protocol: str | Path, work: str | Path, site: str) -> Path:
    """The weights file of the source model trained on `site`, as the VWSL protocol names it (a
    committed run's file, or the study's own source unit under `work`)."""
    s = json.loads(Path(protocol).read_text())["sources"][site]
    return (
        Path(s["run"]) / s["weights"]
        if "run" in s
        else Path(work) / f"source-{site}" / "weights.npz"
    )


def shape_figures(mask: np.ndarray) -> dict[str, float]:
    """(H, W) bool -> components, hole share (the stray share comes with label_free_check)."""
    _, n = ndimage.label(mask)
    if n == 0:
        return {"components": 0.0, "holes": 0.0}
    filled = ndimage.binary_fill_holes(mask)
    holes = float((filled.sum() - mask.sum()) / max(filled.sum(), 1))
    return {"components": float(n), "holes": holes}


def figures(
    probs: np.ndarray, views: dict[str, np.ndarray], labels: np.ndarray, source_masks: np.ndarray
) -> dict[str, float]:
    """probs (S, N, H, W) of the images; views {name: (N, H, W) probabilities on that view};
    labels (N, H, W) -> the figures (the safety net's check, stray included, and the rest)."""
    out: dict[str, float] = dict(label_free_check(probs))
    med = np.median(probs, axis=0) > 0.5
    tt = []
    for name, p in views.items():
        m, (ys, xs) = back(p > 0.5, name)
        v = float(np.mean([dice(a[ys, xs], b[ys, xs]) for a, b in zip(med, m, strict=True)]))
        out[f"tta_{name}"] = v
        tt.append(v)
    out["tta"] = float(np.mean(tt))
    shp = [shape_figures(m) for m in med]
    for k in ("components", "holes"):
        out[k] = float(np.mean([s[k] for s in shp]))
    out["to_source"] = float(np.mean([dice(a, b) for a, b in zip(med, source_masks, strict=True)]))
    out["dev_dice"] = float(np.mean([dice(a, b) for a, b in zip(med, labels, strict=True)]))
    return out


# figures whose better direction is known: +1 higher is better, -1 lower is better
ORIENTATION = {
    "quality": -1,
    "agreement": +1,
    **{f"tta_{v}": +1 for v in VIEWS},
    "tta": +1,
    "components": -1,
    "stray": -1,
    "holes": -1,
}


def markdown(rows: list[dict[str, Any]], images: int, samples: int, seed: int) -> str:
    """The probe's rows -> results/label_free_probe.md: per run, each figure's change from the
    source; then, per figure, in how many snapshots it moved the way the Dice moved."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    cols = ["dev_dice", "area", *ORIENTATION, "to_source"]
    out = [
        "# Which label-free figures track harm? (issue 14)",
        "",
        f"`experiments/label_free_probe.py`: snapshots of finished fine-tuning runs, {images} of "
        f"the target images each run adapted to, {samples} stochastic predictions (area, "
        "quality, agreement, the shape figures) and one prediction per transformed view (tta). "
        "`dev_dice` reads those images' labels, which the fine-tuning never read, to judge the "
        "figures; the test images are not used here. Epoch 0 = the source model. Sampling "
        f"keys from seed {seed}: the figures are noisy across keys (results/README.md, "
        "session 12), so one seed's tally is not evidence on its own.",
        "",
    ]
    tally = {k: [0, 0] for k in ORIENTATION}
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["epoch"])
        src = next((r for r in rs if r["epoch"] == 0), None)
        if src is None:  # a run sharing its source with another: borrow that epoch 0
            src = next(
                (r for r in rows if r["epoch"] == 0 and r["target"] == rs[0]["target"]), None
            )
            rs = ([src] if src else []) + rs
        out += [f"**{name}**", "", "| epoch | " + " | ".join(cols) + " |"]
        out.append("|---" * (len(cols) + 1) + "|")
        for r in rs:
            out.append(f"| {r['epoch']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
            if src is None or r is src:
                continue
            dd = r["dev_dice"] - src["dev_dice"]
            for k, o in ORIENTATION.items():
                tally[k][1] += 1
                tally[k][0] += int(o * (r[k] - src[k]) * dd > 0)
        out.append("")
    out += [
        "Per figure: in how many snapshots it moved from the source's value in the direction "
        "that means better exactly when the Dice rose (and worse when it fell).",
        "",
        "| figure | better is | moved with the Dice |",
        "|---|---|---|",
    ]
    for k, (hit, n) in tally.items():
        out.append(f"| {k} | {'higher' if ORIENTATION[k] > 0 else 'lower'} | {hit} / {n} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = probe_parser(__doc__, images=16, samples=4).parse_args(argv)

    out = Path(a.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["run"], r["epoch"]) for r in rows}
    key = jax.random.key(a.seed)
    for spec in [] if a.markdown_only else a.run:
        path, _, eps = spec.partition(":")
        run = Path(path)
        cfg = load_config(run / "config.json")
        tgt = target_of(run.name)
        data = head(
            load_split(Path(a.data) / tgt, Path(a.splits) / f"{FINETUNE_SPLIT[tgt]}.txt"),
            a.images,
        )
        src_w = source_weights(a.protocol, a.work, other_site(tgt))
        epochs = [int(e) for e in eps.split(",")] if eps else [0]
        if all((run.name, e) in done for e in epochs):
            continue
        pred_s = make_predict(cfg.model, a.samples)
        pred_1 = make_predict(cfg.model, 1)
        src_probs = predict_dataset(pred_s, ckpt.load_weights(src_w, cfg), data.images, key)
        src_masks = np.median(src_probs, axis=0) > 0.5
        for e in epochs:
            if (run.name, e) in done:
                continue
            t0 = time.time()
            w = src_w if e == 0 else run / "snapshots" / f"epoch{e:04d}.npz"
            params = ckpt.load_weights(w, cfg)
            probs = src_probs if e == 0 else predict_dataset(pred_s, params, data.images, key)
            views = {
                v: predict_dataset(pred_1, params, view(data.images, v), key)[0] for v in VIEWS
            }
            fig = figures(probs, views, data.masks, src_masks)
            row = {"run": run.name, "target": tgt, "epoch": e, **fig, "wall_s": time.time() - t0}
            rows.append(row)
            atomic_write_text(out, json.dumps(rows, indent=1) + "\n")
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            )
            sys.stdout.flush()
    md = out.with_suffix(".md")
    atomic_write_text(md, markdown(rows, a.images, a.samples, a.seed))
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
