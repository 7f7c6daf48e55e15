import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from nca_jax import export as ex
from nca_jax.config import ModelConfig, RunConfig, TrainConfig
from nca_jax.model import init_params
from nca_jax.phantoms import make_phantom_dataset
from nca_jax.training import init_state, make_train_step

# Many tests compile the same tiny train / fine-tune / predict programs again (each run builds
# new jitted closures). JAX's persistent cache keys compiled programs by their HLO, so a
# program compiled once is reused by every later test and by later runs of the suite.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("NCA_JAX_TEST_CACHE", str(Path(tempfile.gettempdir()) / "nca-jax-test-cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """A tiny Med-NCA (32 px, 4 steps per level) that compiles and runs in about a second."""
    return RunConfig(
        model=ModelConfig(channels=8, hidden=16, steps=4, patch=16, downscale=4),
        train=TrainConfig(
            epochs=2, batch_size=4, image_size=32, checkpoint_every=1, eval_every=1, lr=5e-3
        ),
    ).validate()


def randomised_params(cfg: ModelConfig, seed: int = 0):
    """Parameters with a NON-zero output layer, so steps actually change the state."""
    params = init_params(cfg, key=jax.random.key(seed))
    for i, lvl in enumerate(("level1", "level2")):
        k = jax.random.key(100 + seed + i)
        shape = params[lvl]["dense_out"]["kernel"].shape
        params[lvl]["dense_out"]["kernel"] = 0.1 * jax.random.normal(k, shape)
    return params


EXPORT_SPEC = ex.ExportSpec(batch=2, size=32, train_lr=5e-3, fixed_randomness=True)


def export_cfg() -> RunConfig:
    """The tiny model of the exported test file."""
    return RunConfig(
        model=ModelConfig(channels=8, hidden=16, steps=3, patch=8, downscale=4),
        train=TrainConfig(batch_size=4, image_size=32, lr=5e-3),
    ).validate()


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(cfg, params, Functions, path, sidecar info, phantom data) of a briefly trained model,
    exported once per test session (test_export and test_device_train share it)."""
    from ai_edge_litert.interpreter import Interpreter

    cfg = export_cfg()
    data = make_phantom_dataset(16, seed=0, size=32)
    state, step = init_state(cfg), make_train_step(cfg)
    for i in range(150):
        idx = np.arange(4 * i, 4 * i + 4) % len(data)
        state, _ = step(
            state, {"images": data.images[idx], "masks": data.masks[idx]}, jax.random.key(0)
        )
    params = jax.device_get(state.params)
    out = tmp_path_factory.mktemp("export") / "tiny.tflite"
    info = ex.export(cfg, params, EXPORT_SPEC, out)
    fns = ex.Functions(cfg, EXPORT_SPEC, params)
    return {
        "cfg": cfg,
        "params": params,
        "fns": fns,
        "path": out,
        "info": info,
        "data": data,
        "new": lambda: Interpreter(model_path=str(out)),
    }
