"""Prototype (issue 17, session 30): two versions of the library timed in ONE process, calls
interleaved, so that a shared machine's drift falls on both alike (`bench.py --compare-*` does
this for config switches; this does it for a code change).

The base version is another checkout's `nca_jax` (e.g. a `git worktree` at the base commit),
copied to a temporary folder as the package `nca_base` (its imports renamed); the new version
is the `nca_jax` this script imports.

Usage:
    git worktree add /tmp/wt-base b0f7e7b
    python experiments/prototypes/ab_commits.py --base /tmp/wt-base --reps 7 --json OUT.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path


def base_package(checkout: Path, into: Path) -> None:
    """Copy checkout/nca_jax to into/nca_base with every `nca_jax` import and FFI target name
    renamed."""
    dst = into / "nca_base"
    shutil.copytree(checkout / "nca_jax", dst)
    for f in dst.rglob("*.py"):
        # the FFI targets too (nca_jax_step_fwd, ...): both versions' kernels registered apart
        f.write_text(re.sub(r"\bnca_jax(?=\b|_step)", "nca_base", f.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a checkout of the base commit")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cases", nargs="+", default=["256:50:4", "128:20:4"], help="SIZE:STEPS:B")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    base_package(a.base, tmp)
    sys.path.insert(0, str(tmp))
    b0, c0 = importlib.import_module("nca_base.bench"), importlib.import_module("nca_base.config")
    b1, c1 = importlib.import_module("nca_jax.bench"), importlib.import_module("nca_jax.config")
    out: dict[str, dict[str, float]] = {"matmul_gflops": {"start": b1.matmul_gflops()}}
    for case in a.cases:
        size, steps, batch = (int(x) for x in case.split(":"))
        # the bench's model: patch = size / 4
        m0 = c0.ModelConfig(steps=steps, patch=size // 4)
        m1 = c1.ModelConfig(steps=steps, patch=size // 4)
        runs = {  # made when timed: a prediction at a size already timed is not made again
            f"train_{size}px_{steps}steps_b{batch}": lambda m0=m0, m1=m1, s=size, b=batch: (
                b0.train_runner(m0, s, b),
                b1.train_runner(m1, s, b),
            ),
            f"predict_{size}px_{steps}steps": lambda m0=m0, m1=m1, s=size: (
                b0.predict_runner(m0, s),
                b1.predict_runner(m1, s),
            ),
        }
        for name, make in runs.items():
            if name in out:  # it takes no batch: the same case as before
                continue
            f0, f1 = make()
            t = b1.timeit_interleaved({"base": f0, "new": f1}, a.reps)
            t["speedup"] = t["base"] / t["new"]
            out[name] = t
            print(f"{name}: base {t['base']:.3f} s, new {t['new']:.3f} s, {t['speedup']:.3f}x")
    out["matmul_gflops"]["end"] = b1.matmul_gflops()
    a.json.write_text(json.dumps({"base": str(a.base), "reps": a.reps, **out}, indent=1))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
