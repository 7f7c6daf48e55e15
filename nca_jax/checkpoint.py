"""Run folders, weights files and orbax training checkpoints.

A run folder holds `config.json` (the RunConfig), `weights.npz` (the selected parameters: flat
arrays named like `level1/perceive/conv0/kernel`), `metrics.jsonl`, `run.json` (what was
selected and why) and, while training, `checkpoints/` (orbax: parameters, Adam state, step).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from nca_jax.config import (
    ConfigError,
    RunConfig,
    atomic_write_bytes,
    atomic_write_text,
    load_config,
    to_json,
)
from nca_jax.errors import RunError  # noqa: F401 (re-exported)
from nca_jax.model import Params, init_params


def flatten_params(params: Params) -> dict[str, np.ndarray]:
    """{'level1/perceive/conv0/kernel': array, ...} in a stable (sorted) order."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    return {k: np.asarray(flat[k], np.float32) for k in sorted(flat)}


def unflatten_params(flat: dict[str, np.ndarray]) -> Params:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def save_weights(params: Params, path: str | os.PathLike) -> None:
    """Writes a flat .npz atomically (temporary name, then rename)."""
    buf = io.BytesIO()
    np.savez(buf, **flatten_params(params))
    atomic_write_bytes(path, buf.getvalue())


def load_weights(path: str | os.PathLike, cfg: RunConfig) -> Params:
    """Reads a weights .npz and checks every name and shape against the model of `cfg`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: np.asarray(z[k], np.float32) for k in z.files}
    except FileNotFoundError as e:
        raise RunError(f"{path}: no such weights file") from e
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise RunError(f"{path}: not a readable weights .npz ({e})") from e
    expected = flatten_params(init_params(cfg.model, key=jax.random.key(0)))
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise RunError(
            f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, v in expected.items():
        if flat[k].shape != v.shape:
            raise RunError(
                f"{path}: weights do not fit the model "
                f"({k} is {flat[k].shape}, the model needs {v.shape})"
            )
        if not np.all(np.isfinite(flat[k])):
            raise RunError(f"{path}: weights contain non-finite values in {k}")
    return unflatten_params(flat)


def load_run(
    run: str | os.PathLike, weights: str | os.PathLike | None = None
) -> tuple[RunConfig, Params]:
    """(config, parameters) of a trained run; `weights` overrides the run's weights.npz (e.g. a
    file exported by the device)."""
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"{run}: not a run folder (no such directory)")
    if not (run / "config.json").is_file():
        raise RunError(f"{run}: not a run (no config.json)")
    try:
        cfg = load_config(run / "config.json")
    except ConfigError as e:
        raise RunError(str(e)) from e
    wpath = Path(weights) if weights is not None else run / "weights.npz"
    if weights is None and not wpath.is_file():
        raise RunError(f"{run}: not a trained run (no weights.npz)")
    return cfg, load_weights(wpath, cfg)


def run_summary(run: str | os.PathLike) -> dict[str, Any]:
    """The run's run.json ({} when it has none, e.g. an unfinished run); RunError naming the
    file when it is not a JSON object."""
    path = Path(run) / "run.json"
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable run summary ({e})") from e
    if not isinstance(summary, dict):
        raise RunError(f"{path}: not a run summary (expected a JSON object)")
    return summary


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies src to dst through a temporary name beside dst, then renames it into place."""
    atomic_write_bytes(dst, Path(src).read_bytes())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indented), written atomically."""
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def checkpoint_manager(directory: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """Orbax manager for full training states (saves are atomic: orbax writes a temporary
    folder and renames it when complete)."""
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a finished orbax checkpoint (creates nothing)."""
    d = Path(directory)
    if not d.is_dir():
        return False
    mngr = checkpoint_manager(d, 1)
    try:
        return mngr.latest_step() is not None
    finally:
        mngr.close()


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def restore_checkpoint(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> Any:
    """Restores the latest (or given) checkpoint into the structure of `like`."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise RunError(f"{mngr.directory}: no checkpoint to resume from")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
