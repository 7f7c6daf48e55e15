"""Label-free collapse check of a finished VWSL run: the predicted foreground share of the first
N fine-tuning images for the source model and the fine-tuned one (the figures finetune.py now
writes itself), and the warning finetune.py would print.

Usage:
    python experiments/vwsl_area_check.py --source RUN --finetuned RUN --data SITE_FOLDER
        --split SPLIT.txt [--n 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from nca_jax import checkpoint as ckpt
from nca_jax.data import load_split
from nca_jax.finetuning import area_warning, sample
from nca_jax.metrics import foreground_fraction


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--finetuned", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg, tuned = ckpt.load_run(a.finetuned)
    if cfg.finetune is None:
        raise SystemExit(f"{a.finetuned}: not a fine-tuning run")
    _, source = ckpt.load_run(a.source)
    data = load_split(a.data, a.split, size=cfg.train.image_size, require_masks=False)
    images = data.images[: a.n]
    key = jax.random.key(a.seed)
    share = {}
    for tag, params in (("source", source), ("fine-tuned", tuned)):
        probs = sample(params, cfg, images, key)
        share[tag] = float(
            np.mean(
                [
                    foreground_fraction(probs[:, i], cfg.finetune.target_reduce)
                    for i in range(len(images))
                ]
            )
        )
        print(f"{tag}: predicted foreground {share[tag]:.1%} of the image", flush=True)
    print(area_warning(share["source"], share["fine-tuned"]) or "no warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
