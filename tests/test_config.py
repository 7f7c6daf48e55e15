"""Configuration validation: every float finite, every field of its declared type, named."""

import dataclasses
import json
import math

import jax.numpy as jnp
import optax
import pytest

from nca_jax.config import (
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from nca_jax.training import TrainState, update_state

SECTIONS = (("model", ModelConfig), ("train", TrainConfig), ("finetune", FinetuneConfig))
FLOATS = [
    (name, cls, f.name)
    for name, cls in SECTIONS
    for f in dataclasses.fields(cls)
    if f.type == "float"
]


def test_every_section_has_float_fields_to_check():
    assert {n for n, _, _ in FLOATS} == {"model", "train", "finetune"}
    assert ("train", TrainConfig, "lr_decay") in FLOATS


@pytest.mark.parametrize("name, cls, field", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_anywhere_is_refused_by_name(name, cls, field, value):
    with pytest.raises(ConfigError, match=rf"{name}\.{field} must be finite"):
        cls(**{field: value}).validate()


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (TrainConfig, "epochs", "3"),
        (TrainConfig, "epochs", True),
        (ModelConfig, "steps", 2.5),
        (FinetuneConfig, "gamma", "100"),
        (FinetuneConfig, "rollback", 1),
        (TrainConfig, "loss", 3),
    ],
)
def test_a_wrong_typed_value_names_the_field(cls, field, value):
    with pytest.raises(ConfigError, match=rf"\.{field} must be of type"):
        cls(**{field: value}).validate()


def test_config_file_with_nan_decay_names_file_and_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"train": {"lr_decay": NaN}}')  # Python's json reads NaN
    with pytest.raises(ConfigError, match=r"train\.lr_decay must be finite") as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:")
    path.write_text(json.dumps({"train": {"beta2": 1.0}}))
    with pytest.raises(ConfigError, match="beta1 and beta2") as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:")
    path.write_text(json.dumps({"model": {"channels": "six"}}))  # wrong type: file and field
    with pytest.raises(ConfigError, match=r"model\.channels must be of type int") as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:")


def test_an_update_that_makes_the_weights_non_finite_is_not_kept():
    """Finite loss and gradient, but an lr so large the new weights overflow: nothing changes."""
    params = {"w": jnp.array([1.0, 2.0])}
    opt = optax.sgd(3e38)
    state = TrainState(params, opt.init(params), jnp.zeros((), jnp.int32))

    def loss_fn(p, batch, key):
        return jnp.sum(p["w"] ** 2), jnp.array(False)

    new, info = update_state(opt, loss_fn, state, {}, None)
    assert bool(jnp.isfinite(info["loss"])) and not bool(info["finite"])
    assert jnp.array_equal(new.params["w"], params["w"])
    ok, info = update_state(optax.sgd(0.1), loss_fn, state, {}, None)
    assert bool(info["finite"]) and not jnp.array_equal(ok.params["w"], params["w"])


def test_json_files_hold_null_never_a_bare_nan(tmp_path):
    import numpy as np

    from nca_jax.checkpoint import write_json

    def strict(text):
        def refuse(c):
            raise ValueError(f"bare {c}")

        return json.loads(text, parse_constant=refuse)

    path = tmp_path / "s.json"
    write_json(
        path,
        {"dice_mean": math.nan, "hd95": [1.0, math.inf], "n": np.int64(3), "std": np.float32(0.5)},
    )
    assert strict(path.read_text()) == {"dice_mean": None, "hd95": [1.0, None], "n": 3, "std": 0.5}
