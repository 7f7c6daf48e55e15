"""Prototype (issue 17, goal 3, session 23): LiteRT's `train` and `finetune` per image at
several batch sizes, against JAX at the same batch in the same process.

The projection of the paper's protocol through TFLite (results/README.md, session 11) counted
75,000 `train` calls at batch 1 (1500 epochs x 50 images). The paper trains at batch 16, so the
protocol is 75,000 image-steps at whatever batch the file holds: what decides the hours is the
seconds per image, which a larger batch may lower (larger matmuls per op, fewer calls). This
times files exported at different batch sizes (export_tflite.py --batch B) one after another
in one process and reports the seconds per image, the projected hours and the peak resident
memory after each file (ru_maxrss only grows: list the files from the smallest batch up).

Usage:
    python export_tflite.py --config configs/paper.json --out runs/phone/med-nca-bB.tflite
        --batch B --signatures train finetune
    python experiments/prototypes/tflite_batch.py --files runs/phone/med-nca-b1.tflite
        runs/phone/med-nca-b4.tflite [--threads 2] [--reps 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path
from typing import Any

from nca_jax.bench import bench_tflite
from nca_jax.config import atomic_write_text

TRAIN_IMAGES = 1500 * 50  # the paper's supervised protocol: 1500 epochs of 50 images
FINETUNE_IMAGES = 100 * 50  # VWSL: 100 epochs of 50 images


def per_image(r: dict[str, float]) -> dict[str, Any]:
    """Per-image seconds and projected hours of one file's bench_tflite result."""
    b = r["batch"]
    out: dict[str, Any] = {"batch": int(b), "tflite_mb": r["tflite_bytes"] / 1e6}
    for sig, images in (("train", TRAIN_IMAGES), ("finetune", FINETUNE_IMAGES)):
        if f"tflite_{sig}_s" not in r:
            continue
        lite, jx = r[f"tflite_{sig}_s"] / b, r[f"jax_{sig}_s"] / b
        out[f"tflite_{sig}_per_image_s"] = lite
        out[f"jax_{sig}_per_image_s"] = jx
        out[f"tflite_over_jax_{sig}"] = lite / jx
        out[f"projected_{sig}_h"] = lite * images / 3600.0
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for f in a.files:
        r = bench_tflite(f, a.reps, a.threads)
        row = {"file": f, "threads": a.threads, **per_image(r), "raw": r}
        rows.append(row)
        print(
            f"{f}: batch {row['batch']}, train {row['tflite_train_per_image_s']:.3f} s/image "
            f"(JAX {row['jax_train_per_image_s']:.3f}, {row['tflite_over_jax_train']:.2f}x), "
            f"paper protocol {row['projected_train_h']:.1f} h; finetune "
            f"{row.get('tflite_finetune_per_image_s', float('nan')):.3f} s/image; "
            f"peak RSS {row['peak_rss_gb']:.1f} GB",
            flush=True,
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.json), json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
