"""Prototype (issue 17, goals 1 and 2, session 22): the CPU as two JAX devices instead of one.

XLA runs one device's ops one after another and spreads each op over the cores. Small ops (the
NCA's per-step convolutions and element-wise work at batch 4) do not fill two cores, and every
op pays the threads' hand-off. With `--xla_force_host_platform_device_count=2` the CPU is two
devices: each works on half of the training batch (the library's data-parallel path,
`nca_jax.parallel`, which keeps the batch-norm statistics of the whole batch) or on half of
the 10 predictions. This times both against one device, interleaved in one process, and
checks that the losses and predictions agree. Measured in session 22 (results/README.md):
training 0.69x (the statistics' reduction in every NCA step costs more), predictions 1.09x.

Usage: python experiments/prototypes/host_devices.py [--batch 4] [--reps 5] [--size 256]
(sets XLA_FLAGS itself before JAX starts; pass --devices to change the count)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[4])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--skip-predict", action="store_true")
    a = ap.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"
    )
    if "jax" in sys.modules:
        raise RuntimeError("JAX was imported before the device count was set")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.prototypes.folded_norm import report
    from nca_jax.bench import _bench_params, timeit_interleaved
    from nca_jax.config import ModelConfig, RunConfig, TrainConfig
    from nca_jax.model import predict_logits, sample_keys
    from nca_jax.parallel import data_mesh, replicate, shard_batch
    from nca_jax.training import init_state, make_train_step

    devs = jax.devices()
    print(f"{len(devs)} devices: {devs}")
    mc = ModelConfig()

    def train_fn(batch: int, devices: list) -> Callable[[], object]:
        cfg = RunConfig(model=mc, train=TrainConfig(batch_size=batch, image_size=a.size))
        cfg = cfg.validate()
        step = make_train_step(cfg)
        rng = np.random.default_rng(0)
        b = {
            "images": rng.uniform(size=(batch, a.size, a.size)).astype(np.float32),
            "masks": (rng.uniform(size=(batch, a.size, a.size)) > 0.5).astype(np.float32),
        }
        mesh = data_mesh(devices)
        b = shard_batch(b, mesh)
        holder = {"state": replicate(init_state(cfg), mesh)}
        key = jax.random.key(0)

        def run() -> jax.Array:
            holder["state"], info = step(holder["state"], b, key)
            return info["loss"]

        return run

    for batch in a.batch:
        fns = {"1 device": train_fn(batch, devs[:1]), f"{len(devs)} devices": train_fn(batch, devs)}
        losses = {k: float(fn()) for k, fn in fns.items()}
        med = timeit_interleaved(fns, a.reps)
        print(f"training step, batch {batch}, {a.size} px:", report(med, 1, "s"), losses)

    if a.skip_predict:
        return
    params = _bench_params(mc)
    img = jnp.asarray(np.random.default_rng(0).uniform(size=(1, a.size, a.size)), jnp.float32)
    one = jax.jit(lambda p, i, k: jax.nn.sigmoid(predict_logits(p, i, cfg=mc, key=k))[0])
    keys = sample_keys(jax.random.key(1), a.samples)
    placed = [(jax.device_put(params, d), jax.device_put(img, d)) for d in devs]

    def loop(n_dev: int) -> Callable[[], object]:
        def run() -> jax.Array:
            outs = []
            for j in range(a.samples):  # dispatch is asynchronous: the devices overlap
                p, i = placed[j % n_dev]
                outs.append(one(p, i, jax.device_put(keys[j], devs[j % n_dev])))
            return jnp.stack([jax.device_put(o, devs[0]) for o in outs])

        return run

    fns = {"1 device": loop(1), f"{len(devs)} devices": loop(len(devs))}
    vals = {k: np.asarray(fn()) for k, fn in fns.items()}
    diff = float(np.abs(vals["1 device"] - vals[f"{len(devs)} devices"]).max())
    med = timeit_interleaved(fns, a.reps)
    print(f"{a.samples} predictions, 1 x {a.size}:", report(med, 1, "s"), f"max diff {diff:.2e}")


if __name__ == "__main__":
    main()
