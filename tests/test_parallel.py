"""Data parallelism on CPU with 2 forced host devices (each case runs in its own process,
since the device count is fixed when JAX starts)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import dataclasses, sys
import jax, jax.numpy as jnp, numpy as np
from nca_jax.config import ModelConfig, RunConfig, TrainConfig
from nca_jax.phantoms import make_phantom_dataset
cfg = RunConfig(model=ModelConfig(channels=8, hidden=16, steps=3, patch=16),
                train=TrainConfig(epochs=2, batch_size=4, image_size=32, checkpoint_every=1,
                                  lr=5e-3)).validate()
data = make_phantom_dataset(8, seed=1, size=32)
"""


def _run(code: str, devices: int, *args: str) -> str:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
    )
    r = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    out = _run(
        """
        from nca_jax.parallel import data_mesh, replicate, shard_batch
        from nca_jax.training import init_state, make_train_step
        assert len(jax.devices()) == 2
        batch = {"images": data.images[:4], "masks": data.masks[:4]}
        d0 = jax.devices()[0]
        one, _ = make_train_step(cfg)(jax.device_put(init_state(cfg), d0),
                                      jax.device_put(batch, d0), jax.random.key(3))
        mesh = data_mesh()
        sharded = shard_batch(batch, mesh)
        assert len(sharded["images"].sharding.device_set) == 2
        two, _ = make_train_step(cfg)(replicate(init_state(cfg), mesh), sharded,
                                      jax.random.key(3))
        diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))),
                                      jax.device_get(one.params), jax.device_get(two.params))
        print(max(jax.tree_util.tree_leaves(diff)))
    """,
        devices=2,
    )
    assert float(out.strip().splitlines()[-1]) < 1e-5


@pytest.mark.slow
def test_resume_on_a_different_device_count(tmp_path):
    train = """
        from nca_jax.training import train_and_evaluate
        out, resume, stop = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
        train_and_evaluate(cfg, data, out, resume=resume, progress=False,
                           stop_after_epochs=None if stop == "-" else int(stop))
    """

    _run(train, 2, str(tmp_path / "a"), "0", "1")  # one epoch on 2 devices, then "interrupted"
    _run(train, 1, str(tmp_path / "a"), "1", "-")  # resumed on 1 device
    _run(train, 1, str(tmp_path / "b"), "0", "-")  # uninterrupted on 1 device

    # The loss trajectory matches closely. Weights are compared loosely: float rounding differs
    # between 1 and 2 devices, and Adam turns a near-zero gradient's rounding into a step of up
    # to lr in either direction (a fresh start instead of a resume would miss a whole epoch).
    def losses(run):
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(r)["loss"] for r in rows]

    np.testing.assert_allclose(losses("a"), losses("b"), rtol=1e-4)
    a, b = np.load(tmp_path / "a" / "weights.npz"), np.load(tmp_path / "b" / "weights.npz")
    lr, steps = 5e-3, 4
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=2 * lr * steps / 4)
