"""One-off migration: rewrite the checkpoints of a fine-tuning run made before the VWSL targets
left the checkpoint (commit 'Fine-tuning checkpoints hold only the training state') so that the
current code can resume it. The training state (weights, Adam moments, step, best) is kept bit
for bit; the checkpointed targets are dropped (they are recomputed on resume, same keys).

Usage: python experiments/migrate_vwsl_checkpoint.py RUN --images N [--size 256]
    [--set FIELD=JSON ...]
(N = the number of fine-tuning images of the run: the old checkpoints hold (N, size, size)
targets and weights). config.json is rewritten in the current schema; fields the old code did
not have take their defaults unless --set gives them (e.g. check_every=0: the old code made no
checks; source_run="..." as the resuming script names the source). Only fields that do not
change the training may be set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np

from nca_jax import checkpoint as ckpt
from nca_jax.config import load_config, save_config
from nca_jax.model import init_params
from nca_jax.training import TrainState, _best_like, make_optimizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON")
    a = p.parse_args(argv)
    run = Path(a.run)
    cfg = load_config(run / "config.json")
    fc = cfg.finetune
    if fc is None or fc.refresh_every != 0:
        raise SystemExit(f"{run}: not a fine-tuning run with fixed targets")
    allowed = {"check_every", "snapshot_every", "source_run", "check_images", "check_samples"}
    sets = {k: json.loads(v) for k, v in (x.split("=", 1) for x in a.set)}
    if set(sets) - allowed:
        raise SystemExit(f"only {sorted(allowed)} may be set, not {sorted(set(sets) - allowed)}")
    params = init_params(cfg.model, key=jax.random.key(0))
    state = TrainState(params, make_optimizer(fc).init(params), jax.numpy.zeros((), "int32"))
    zeros = np.zeros((a.images, a.size, a.size), np.float32)
    old_like = {
        "state": state,
        "best": _best_like(),
        "carried": {"targets": zeros, "weights": zeros},
    }
    src = run / "checkpoints"
    mngr = ckpt.checkpoint_manager(src, fc.keep_checkpoints)
    steps = sorted(mngr.all_steps())
    restored = {s: ckpt.restore_checkpoint(mngr, old_like, s) for s in steps}
    mngr.close()
    tmp = run / ".checkpoints.migrating"
    shutil.rmtree(tmp, ignore_errors=True)
    new = ckpt.checkpoint_manager(tmp, fc.keep_checkpoints)
    for s in steps:
        tree = {
            "state": TrainState(*restored[s]["state"]),
            "best": restored[s]["best"],
            "carried": {},
        }
        ckpt.save_checkpoint(new, s, tree)
    new.close()
    shutil.rmtree(src)
    tmp.rename(src)
    fc = dataclasses.replace(fc, **sets)
    save_config(dataclasses.replace(cfg, finetune=fc).validate(), run / "config.json")
    print(f"{run}: {len(steps)} checkpoint(s) rewritten without targets (steps {steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
