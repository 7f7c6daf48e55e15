"""TFLite export: inference, supervised training and VWSL fine-tuning as on-device signatures.

The one JAX model is lowered with jax2tf (no second implementation). Every random draw of the
JAX functions below is an input tensor (fire masks, patch corners); the TF wrapper draws them on
the device with `tf.random.uniform` (the builtin RANDOM_UNIFORM op), since `jax.random` does not
convert to builtin ops. Weights and the two Adam states (supervised training, fine-tuning) are
resource variables. The rollout is a Python loop (a converted `scan` stores its backward buffers
as constants and bloats the file).

Signatures (B = batch, S = size, image tensors (B, S, S, 1) float32 in [0, 1]):
  infer(image) -> probabilities (B, S, S, 1)       one stochastic prediction
  sample(image) -> mean, std (B, S, S, 1)          of `samples` predictions (VWSL's targets)
  train(image, mask) -> loss                       one supervised Adam step (mask 0/1)
  finetune(image, target, weight) -> loss          one VWSL Adam step
  get_weights() -> {name: tensor}; set_weights(**{name: tensor}) -> count
  get_optimizer_state() -> {name: tensor}          both Adam states and step counters
With fixed_randomness the file also holds infer_fixed, train_fixed and finetune_fixed, which take
the fire masks and patch corners as inputs (to compare with JAX exactly).
Weight names are the weights.npz names with '/' written as '__' (signature keys must be plain).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nca_jax.checkpoint import flatten_params, unflatten_params
from nca_jax.config import (
    FinetuneConfig,
    RunConfig,
    TrainConfig,
    atomic_write_bytes,
    atomic_write_text,
)
from nca_jax.model import Params, Randomness, predict_logits
from nca_jax.training import TrainState, make_optimizer, supervised_loss, update_state
from nca_jax.vwsl import vwsl_loss

SIGNATURES = ("infer", "sample", "train", "finetune", "get_weights", "set_weights")
EXTRA_SIGNATURES = ("get_optimizer_state",)
FIXED_SIGNATURES = ("infer_fixed", "train_fixed", "finetune_fixed")


class ExportError(ValueError):
    """An export that cannot be made; str(e) says why."""


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What one .tflite file is built for (one fixed input shape per file)."""

    batch: int = 1
    size: int = 256
    train_lr: float = 1.6e-3  # supervised Adam (the paper's); decayed as in the run's config
    finetune_lr: float = 3e-6  # VWSL Adam (the authors')
    gamma: float = 1e2  # VWSL consistency weight
    samples: int = 10  # predictions behind `sample`
    fixed_randomness: bool = False  # add the *_fixed signatures (tests)
    seed: int = 1  # device draws: a reproducible stream per loaded file; 0 = seeded at run time
    signatures: tuple[str, ...] = SIGNATURES  # a subset makes a smaller file (e.g. infer only)

    def validate(self, cfg: RunConfig) -> None:
        mc = cfg.model
        if self.batch < 1:
            raise ExportError(f"--batch must be >= 1, got {self.batch}")
        if self.size < 1 or self.size % mc.downscale:
            raise ExportError(f"--size must be a positive multiple of {mc.downscale}")
        if self.size // mc.downscale != mc.patch:
            raise ExportError(
                f"--size {self.size} does not fit the model: its training patch is {mc.patch} "
                f"px, so the size must be {mc.patch * mc.downscale}"
            )
        for name in ("train_lr", "finetune_lr", "gamma"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0) or (name != "gamma" and v == 0):
                raise ExportError(f"{name} must be finite and positive, got {v}")
        if self.samples < 2:
            raise ExportError("samples must be >= 2")
        unknown = set(self.signatures) - set(SIGNATURES)
        if unknown or not self.signatures:
            raise ExportError(f"signatures must be a non-empty subset of {SIGNATURES}")


def signature_name(weight_name: str) -> str:
    return weight_name.replace("/", "__")


def weight_name(signature_key: str) -> str:
    return signature_key.replace("__", "/")


# ------------------------------------------------------------------------- pure JAX functions


class Functions:
    """The exported computations as JAX functions of flat arrays (lists in a fixed order).

    params: the weights.npz arrays in sorted-name order; opt_*: optax Adam state leaves."""

    def __init__(self, cfg: RunConfig, spec: ExportSpec, params: Params):
        self.cfg, self.spec, self.mc = cfg, spec, cfg.model
        flat = flatten_params(params)
        self.names = list(flat)
        self.params0 = [flat[k] for k in self.names]
        self.train_opt = make_optimizer(
            dataclasses.replace(cfg.train, lr=spec.train_lr)
            if isinstance(cfg.train, TrainConfig)
            else TrainConfig(lr=spec.train_lr)
        )
        fc = cfg.finetune or FinetuneConfig()
        self.fc = dataclasses.replace(fc, lr=spec.finetune_lr, gamma=spec.gamma)
        self.ft_opt = make_optimizer(self.fc)
        p = self.tree(self.params0)
        self.train_opt0, self.opt_def = jax.tree_util.tree_flatten(self.train_opt.init(p))
        self.ft_opt0, _ = jax.tree_util.tree_flatten(self.ft_opt.init(p))

    def tree(self, flat: list[Any]) -> Params:
        return unflatten_params(dict(zip(self.names, flat, strict=True)))

    def untree(self, params: Params) -> list[Any]:
        from flax import traverse_util

        f = traverse_util.flatten_dict(params, sep="/")
        return [f[k] for k in self.names]

    # shapes of the random inputs
    def mask_shapes(self, train: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        mc, b, s = self.mc, self.spec.batch, self.spec.size
        low = s // mc.downscale
        s2 = mc.patch if train else s
        return (mc.steps, b, low, low, 1), (mc.steps, b, s2, s2, 1)

    def infer(self, params: list, image: jax.Array, m1: jax.Array, m2: jax.Array) -> jax.Array:
        """image (B, S, S, 1), masks -> probabilities (B, S, S, 1)."""
        logits = predict_logits(
            self.tree(params), image, cfg=self.mc, randomness=Randomness(m1, m2), unroll="python"
        )
        return jax.nn.sigmoid(logits)[..., None]

    def _step(
        self,
        opt: optax.GradientTransformation,
        loss_fn: Callable,
        params,
        opt_leaves,
        step,
        batch: dict[str, jax.Array],
    ):
        state = TrainState(
            self.tree(params), jax.tree_util.tree_unflatten(self.opt_def, opt_leaves), step
        )
        new, info = update_state(opt, loss_fn, state, batch, None)
        return (
            self.untree(new.params),
            jax.tree_util.tree_leaves(new.opt_state),
            new.step,
            info["loss"],
        )

    def train(self, params, opt_leaves, step, image, mask, m1, m2, yx):
        """One supervised step; image, mask (B, S, S, 1); yx (B, 2) int32 patch corners.
        Returns (params, opt_leaves, step, loss)."""

        def loss_fn(p: Params, batch: dict[str, jax.Array], _key: None):
            return supervised_loss(
                p,
                batch["image"][..., 0],
                batch["mask"][..., 0],
                cfg=self.cfg,
                randomness=Randomness(batch["m1"], batch["m2"], batch["yx"]),
                unroll="python",
            )

        batch = {"image": image, "mask": mask, "m1": m1, "m2": m2, "yx": yx}
        return self._step(self.train_opt, loss_fn, params, opt_leaves, step, batch)

    def finetune(self, params, opt_leaves, step, image, target, weight, m1a, m1b, m2a, m2b, yx):
        """One VWSL step; image, target, weight (B, S, S, 1). Returns as `train`."""
        fc = self.fc

        def loss_fn(p: Params, batch: dict[str, jax.Array], _key: None):
            loss, _ = vwsl_loss(
                p,
                batch["image"][..., 0],
                batch["target"][..., 0],
                batch["weight"][..., 0],
                cfg=self.mc,
                fc=fc,
                masks=batch["masks"],
                patch_yx=batch["yx"],
                unroll="python",
            )
            return loss, jnp.array(False)

        batch = {
            "image": image,
            "target": target,
            "weight": weight,
            "masks": (m1a, m1b, m2a, m2b),
            "yx": yx,
        }
        return self._step(self.ft_opt, loss_fn, params, opt_leaves, step, batch)


# ------------------------------------------------------------------------------ TF wrapper


def _build_module(fns: Functions) -> Any:
    """A tf.Module with variables and one tf.function per signature."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    mc, spec = fns.mc, fns.spec
    b, s = spec.batch, spec.size
    img_spec = tf.TensorSpec((b, s, s, 1), tf.float32)
    m1i, m2i = fns.mask_shapes(train=False)
    m1t, m2t = fns.mask_shapes(train=True)
    infer_tf = jax2tf.convert(fns.infer, with_gradient=False)
    train_tf = jax2tf.convert(fns.train, with_gradient=False)
    ft_tf = jax2tf.convert(fns.finetune, with_gradient=False)
    n_corner = s - mc.patch + 1

    seeds = iter(range(1, 1_000_000))  # a distinct op seed per draw site

    def uniform(shape: tuple[int, ...]) -> Any:
        # Seeded per op: a loaded file replays the same stream of draws (reproducible runs);
        # the stream advances with every call. spec.seed = 0 leaves the runtime to seed it.
        if spec.seed == 0:
            return tf.random.uniform(shape)
        return tf.random.uniform(shape, seed=spec.seed * 1000 + next(seeds))

    def draw_mask(shape: tuple[int, ...]) -> Any:
        return tf.cast(uniform(shape) < mc.fire_rate, tf.float32)

    def draw_yx() -> Any:
        u = uniform((b, 2))
        return tf.minimum(tf.cast(tf.floor(u * n_corner), tf.int32), n_corner - 1)

    class NCAModule(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = [
                tf.Variable(np.asarray(x), name=signature_name(n))
                for n, x in zip(fns.names, fns.params0, strict=True)
            ]
            self.train_opt = [tf.Variable(np.asarray(x)) for x in fns.train_opt0]
            self.ft_opt = [tf.Variable(np.asarray(x)) for x in fns.ft_opt0]
            self.train_step = tf.Variable(np.int32(0))
            self.ft_step = tf.Variable(np.int32(0))

        def _read(self, vs: list) -> list:
            return [v.read_value() for v in vs]

        def _assign(self, vs: list, xs: list) -> list:
            return [v.assign(x) for v, x in zip(vs, xs, strict=True)]

        def _infer(self, image, m1, m2):
            return infer_tf(self._read(self.w), image, m1, m2)

        def _step(self, fn, opt: list, step: Any, *inputs: Any) -> Any:
            """One converted optimizer step: read the variables, assign the results, -> loss."""
            p, o, st, loss = fn(self._read(self.w), self._read(opt), step.read_value(), *inputs)
            deps = self._assign(self.w, p) + self._assign(opt, o) + [step.assign(st)]
            with tf.control_dependencies(deps):
                return tf.identity(loss)

        def _train(self, *inputs):  # image, mask, masks1, masks2, patch_yx
            return self._step(train_tf, self.train_opt, self.train_step, *inputs)

        def _finetune(self, *inputs):  # image, target, weight, 4 x masks, patch_yx
            return self._step(ft_tf, self.ft_opt, self.ft_step, *inputs)

        @tf.function(autograph=False, input_signature=[img_spec])
        def infer(self, image):
            return {"probabilities": self._infer(image, draw_mask(m1i), draw_mask(m2i))}

        @tf.function(autograph=False, input_signature=[img_spec])
        def sample(self, image):
            probs = tf.stack(
                [self._infer(image, draw_mask(m1i), draw_mask(m2i)) for _ in range(spec.samples)]
            )
            mean = tf.reduce_mean(probs, axis=0)
            std = tf.sqrt(tf.reduce_mean(tf.square(probs - mean), axis=0))
            return {"mean": mean, "std": std}

        @tf.function(autograph=False, input_signature=[img_spec, img_spec])
        def train(self, image, mask):
            loss = self._train(image, mask, draw_mask(m1t), draw_mask(m2t), draw_yx())
            return {"loss": loss}

        @tf.function(autograph=False, input_signature=[img_spec] * 3)
        def finetune(self, image, target, weight):
            loss = self._finetune(
                image,
                target,
                weight,
                draw_mask(m1t),
                draw_mask(m1t),
                draw_mask(m2t),
                draw_mask(m2t),
                draw_yx(),
            )
            return {"loss": loss}

        @tf.function(autograph=False, input_signature=[])
        def get_weights(self):
            return {
                signature_name(n): v.read_value() for n, v in zip(fns.names, self.w, strict=True)
            }

        @tf.function(
            autograph=False,
            input_signature=[
                tf.TensorSpec(x.shape, tf.float32, name=signature_name(n))
                for n, x in zip(fns.names, fns.params0, strict=True)
            ],
        )
        def set_weights(self, *xs):
            deps = self._assign(self.w, list(xs))
            with tf.control_dependencies(deps):
                return {"count": tf.constant(len(xs), tf.int32)}

        @tf.function(autograph=False, input_signature=[])
        def get_optimizer_state(self):
            out = {f"train_opt_{i}": v.read_value() for i, v in enumerate(self.train_opt)}
            out.update({f"finetune_opt_{i}": v.read_value() for i, v in enumerate(self.ft_opt)})
            out["train_step"] = self.train_step.read_value()
            out["finetune_step"] = self.ft_step.read_value()
            return out

        @tf.function(
            autograph=False,
            input_signature=[
                img_spec,
                tf.TensorSpec(m1i, tf.float32),
                tf.TensorSpec(m2i, tf.float32),
            ],
        )
        def infer_fixed(self, image, masks1, masks2):
            return {"probabilities": self._infer(image, masks1, masks2)}

        @tf.function(
            autograph=False,
            input_signature=[
                img_spec,
                img_spec,
                tf.TensorSpec(m1t, tf.float32),
                tf.TensorSpec(m2t, tf.float32),
                tf.TensorSpec((b, 2), tf.int32),
            ],
        )
        def train_fixed(self, image, mask, masks1, masks2, patch_yx):
            return {"loss": self._train(image, mask, masks1, masks2, patch_yx)}

        @tf.function(
            autograph=False,
            input_signature=[img_spec] * 3
            + [tf.TensorSpec(m1t, tf.float32)] * 2
            + [tf.TensorSpec(m2t, tf.float32)] * 2
            + [tf.TensorSpec((b, 2), tf.int32)],
        )
        def finetune_fixed(
            self, image, target, weight, masks1a, masks1b, masks2a, masks2b, patch_yx
        ):
            loss = self._finetune(
                image, target, weight, masks1a, masks1b, masks2a, masks2b, patch_yx
            )
            return {"loss": loss}

    return NCAModule()


def convert(cfg: RunConfig, params: Params, spec: ExportSpec) -> bytes:
    """The .tflite flatbuffer for `params` of the model in `cfg` (builtin ops only)."""
    import tensorflow as tf

    spec.validate(cfg)
    fns = Functions(cfg, spec, params)
    module = _build_module(fns)
    keys = signature_keys(spec)
    sigs = {k: getattr(module, k).get_concrete_function() for k in keys}
    with tempfile.TemporaryDirectory() as d:
        tf.saved_model.save(module, d, signatures=sigs)
        conv = tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=keys)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.experimental_enable_resource_variables = True
        conv._experimental_unfold_large_splat_constant = True
        return conv.convert()


def subgraph_ops(model: bytes) -> list[set[str]]:
    """The op names of EVERY subgraph of a .tflite flatbuffer (one set per subgraph; each
    signature has its own subgraph), read from the file's schema: builtin ops by their
    BuiltinOperator name, custom ops (Flex ones among them) by their custom code."""
    from tensorflow.lite.python import schema_py_generated as fb

    m = fb.Model.GetRootAsModel(bytearray(model), 0)
    builtin = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    names = []
    for i in range(m.OperatorCodesLength()):
        c = m.OperatorCodes(i)
        code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
        custom = c.CustomCode()
        names.append(custom.decode() if custom else builtin.get(code, f"BUILTIN_{code}"))
    out = []
    for s in range(m.SubgraphsLength()):
        g = m.Subgraphs(s)
        out.append({names[g.Operators(j).OpcodeIndex()] for j in range(g.OperatorsLength())})
    return out


def op_names(model: bytes) -> list[str]:
    """Sorted distinct op names over all subgraphs of a .tflite flatbuffer."""
    return sorted(set().union(*subgraph_ops(model)))


def export(
    cfg: RunConfig,
    params: Params,
    spec: ExportSpec,
    out: str | os.PathLike,
    source: str = "",
) -> dict[str, Any]:
    """Writes out (.tflite) and out + '.json' (config, spec, signatures, ops, size) atomically."""
    out = Path(out)
    model = convert(cfg, params, spec)
    ops = op_names(model)
    info = {
        "source_run": source,
        "config": cfg.to_dict(),
        "spec": dataclasses.asdict(spec),
        "weights": flatten_names(params),
        "signatures": signature_keys(spec),
        "ops": ops,
        "flex_ops": [o for o in ops if o.startswith("Flex") or o not in builtin_op_names()],
        "bytes": len(model),
    }
    atomic_write_bytes(out, model)
    atomic_write_text(sidecar(out), json.dumps(info, indent=2) + "\n")
    return info


def builtin_op_names() -> set[str]:
    """Every builtin op name of the TFLite schema."""
    from tensorflow.lite.python import schema_py_generated as fb

    return {k for k in vars(fb.BuiltinOperator) if not k.startswith("_")}


def signature_keys(spec: ExportSpec) -> list[str]:
    """The signatures a file of this spec holds (weights access and the optimizer state always)."""
    keys = [k for k in SIGNATURES if k in spec.signatures or k in ("get_weights", "set_weights")]
    keys += list(EXTRA_SIGNATURES)
    return keys + (list(FIXED_SIGNATURES) if spec.fixed_randomness else [])


def flatten_names(params: Params) -> list[str]:
    return list(flatten_params(params))


def sidecar(model_path: str | os.PathLike) -> Path:
    return Path(f"{model_path}.json")
