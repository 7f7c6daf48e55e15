"""Writes the fixed, committed case lists under results/splits/ (seed 0).

Shenzhen (566 pairs): train 50, val 50, test 50, finetune 50 (used without labels), disjoint.
Montgomery (138 pairs): test 50, train 50, val 38, disjoint; its VWSL fine-tuning set is its
train list used WITHOUT labels (it is disjoint from the test list; 138 pairs leave no room for a
fourth set of 50).
Usage: python experiments/make_splits.py [--data ../shared/data/cxr] [--out results/splits]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nca_jax.config import atomic_write_text
from nca_jax.data import find_pairs

PLAN = {
    "shenzhen": [("train", 50), ("val", 50), ("test", 50), ("finetune", 50)],
    "montgomery": [("test", 50), ("train", 50), ("val", 38)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--out", default="results/splits")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for site, parts in PLAN.items():
        names = sorted(n for n, _, _ in find_pairs(Path(a.data) / site))
        order = np.random.default_rng([a.seed, len(names)]).permutation(len(names))
        pos = 0
        for part, k in parts:
            chosen = sorted(names[i] for i in order[pos : pos + k])
            pos += k
            header = f"# {site} {part}: {k} cases, seed {a.seed}, experiments/make_splits.py\n"
            atomic_write_text(out / f"{site}_{part}.txt", header + "\n".join(chosen) + "\n")
            print(f"{site}_{part}: {len(chosen)}")


if __name__ == "__main__":
    main()
