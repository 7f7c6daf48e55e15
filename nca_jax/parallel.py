"""Data parallelism with jax.sharding: a 1-D mesh with a 'data' axis over all devices; batches
are sharded along it, parameters and Adam state replicated. One code path for 1 and N devices
(on one device the shardings are trivial). Batch-norm statistics stay those of the WHOLE batch:
the jitted step computes the mean over the sharded batch axis globally, so the result does not
depend on the device count (up to float rounding).

Several hosts: call `jax.distributed.initialize()` (coordinator address, process count and id
from the cluster or arguments) before anything else touches JAX; `jax.devices()` then lists
every host's devices and the same mesh spans them (see README).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named 'data' over `devices` (default: all of them)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of `tree` on all devices of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Splits every (B, ...) array of `batch` along B over the mesh's 'data' axis."""
    n = mesh.devices.size
    out = {}
    for k, v in batch.items():
        if v.shape[0] % n:
            raise ValueError(f"batch size {v.shape[0]} is not divisible by {n} devices")
        out[k] = jax.device_put(v, NamedSharding(mesh, PartitionSpec("data")))
    return out
