import os
import tempfile
from pathlib import Path

import jax
import pytest

from nca_jax.config import ModelConfig, RunConfig, TrainConfig
from nca_jax.model import init_params

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
