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
A `frozen` file is for inference only: the weights are constants, the file holds infer and
sample (and infer_fixed) and nothing that trains or reads weights. LiteRT's XNNPACK delegate
runs its convolutions and matmuls; in a trainable file, whose weights are variables, it runs
matmuls but not convolutions, so Med-NCA's perception is exported as one matmul (im2col).
Weight names are the weights.npz names with '/' written as '__' (signature keys must be plain).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from nca_jax.checkpoint import flatten_params, unflatten_params
from nca_jax.config import (
    PERCEIVE_IMPLS,
    FinetuneConfig,
    RunConfig,
    TrainConfig,
    atomic_write_bytes,
    atomic_write_text,
)
from nca_jax.errors import ExportError  # noqa: F401 (re-exported)
from nca_jax.model import Params, Randomness, predict_logits
from nca_jax.predict import bar_off
from nca_jax.training import TrainState, make_optimizer, supervised_loss, update_state
from nca_jax.vwsl import vwsl_loss

SIGNATURES = ("infer", "sample", "train", "finetune", "get_weights", "set_weights")
FROZEN_SIGNATURES = ("infer", "sample")  # what an inference-only file can hold
EXTRA_SIGNATURES = ("get_optimizer_state",)


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
    frozen: bool = False  # weights as constants: inference only (infer, sample), delegable
    # How Med-NCA's perception convolutions (a UNet's: all its convolutions and upsampling)
    # are written into the graph (same values): "conv",
    # "im2col" (one matmul), or "auto": im2col in a trainable file, whose weights are variables
    # (LiteRT's XNNPACK delegate runs matmuls with variable weights but leaves a CONV_2D with
    # a variable filter to LiteRT's slower kernel), conv in a frozen one (constant filters:
    # delegated, and faster than the matmul)
    perceive: str = "auto"

    def perceive_impl(self, mc: Any) -> str:
        """The model.perceive the graph is built with, for the ModelConfig `mc`."""
        if self.perceive != "auto":
            return self.perceive
        return "im2col" if mc.fast_backward and not self.frozen else "conv"

    def validate(self, cfg: RunConfig) -> None:
        mc = cfg.model
        if self.batch < 1:
            raise ExportError(f"--batch must be >= 1, got {self.batch}")
        if mc.kind == "unet":  # any size its pooling levels divide
            levels = 2 ** (mc.unet_blocks - 1)
            if self.size < 1 or self.size % levels:
                raise ExportError(f"--size must be a positive multiple of {levels} for this UNet")
        elif self.size < 1 or self.size % mc.downscale:
            raise ExportError(f"--size must be a positive multiple of {mc.downscale}")
        elif self.size // mc.downscale != mc.patch:
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
        if self.perceive not in ("auto", *PERCEIVE_IMPLS):
            raise ExportError(
                f"perceive must be one of {('auto', *PERCEIVE_IMPLS)}, got {self.perceive!r}"
            )
        if self.perceive == "im2col" and not mc.fast_backward:
            raise ExportError("perceive im2col needs the model's fast_backward (it is false)")
        unknown = set(self.signatures) - set(SIGNATURES)
        if unknown or not self.signatures:
            raise ExportError(f"signatures must be a non-empty subset of {SIGNATURES}")
        if self.frozen and not set(self.signatures) & set(FROZEN_SIGNATURES):
            raise ExportError(
                f"a frozen (inference-only) file holds {FROZEN_SIGNATURES}: none of them asked"
            )


def signature_name(weight_name: str) -> str:
    return weight_name.replace("/", "__")


def weight_name(signature_key: str) -> str:
    return signature_key.replace("__", "/")


# ------------------------------------------------------------------------- pure JAX functions


class Functions:
    """The exported computations as JAX functions of flat arrays (lists in a fixed order).

    params: the weights.npz arrays in sorted-name order; opt_*: optax Adam state leaves."""

    def __init__(self, cfg: RunConfig, spec: ExportSpec, params: Params):
        # same function, its convolutions computed as the spec asks, and Med-NCA's MLP on all
        # cells at once (a converted scan keeps its buffers; no gather of the fired cells), and
        # never the fused CPU kernel (an FFI call, which no TFLite runtime has)
        mc = dataclasses.replace(
            cfg.model,
            perceive=spec.perceive_impl(cfg.model),
            mlp_chunk=0,
            mlp_fired=0,
            fused_forward=0,
            fused_train=0,
        )
        cfg = dataclasses.replace(cfg, model=mc)
        self.cfg, self.spec, self.mc = cfg, spec, cfg.model
        flat = flatten_params(params)
        self.names = list(flat)
        self.params0 = [flat[k] for k in self.names]
        # the phone's `train` is the plain optimizer step: no weight average (train.ema_decay)
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


@dataclasses.dataclass(frozen=True)
class Signature:
    """One stochastic signature: its data inputs ((B, S, S, 1) float32 each), its random inputs
    (name, kind: m1i / m2i inference fire masks, m1t / m2t training ones, yx patch corners) in
    the order they are drawn, and its output key. NAME draws the random inputs on the device;
    NAME_fixed takes them as inputs (tests compare it with the training path)."""

    name: str
    data: tuple[str, ...]
    random: tuple[tuple[str, str], ...]
    output: str


STOCHASTIC = (
    Signature("infer", ("image",), (("masks1", "m1i"), ("masks2", "m2i")), "probabilities"),
    Signature(
        "train",
        ("image", "mask"),
        (("masks1", "m1t"), ("masks2", "m2t"), ("patch_yx", "yx")),
        "loss",
    ),
    Signature(
        "finetune",
        ("image", "target", "weight"),
        (
            ("masks1a", "m1t"),
            ("masks1b", "m1t"),
            ("masks2a", "m2t"),
            ("masks2b", "m2t"),
            ("patch_yx", "yx"),
        ),
        "loss",
    ),
)
FIXED_SIGNATURES = tuple(f"{sig.name}_fixed" for sig in STOCHASTIC)


class _Draws:
    """The device's random draws, seeded per op (spec.seed != 0): a loaded file replays the same
    stream (reproducible runs), which advances with every call; seed 0 leaves the runtime to
    seed them. Each draw site gets the next op seed in tracing order."""

    def __init__(self, fns: Functions) -> None:
        self.mc, self.spec = fns.mc, fns.spec
        self.shapes = dict(zip(("m1i", "m2i"), fns.mask_shapes(train=False), strict=True))
        self.shapes.update(zip(("m1t", "m2t"), fns.mask_shapes(train=True), strict=True))
        self.shapes["yx"] = (self.spec.batch, 2)
        self.n_corner = self.spec.size - self.mc.patch + 1
        self._seeds = iter(range(1, 1_000_000))

    def tensor_spec(self, kind: str, name: str) -> Any:
        import tensorflow as tf

        dtype = tf.int32 if kind == "yx" else tf.float32
        return tf.TensorSpec(self.shapes[kind], dtype, name=name)

    def _uniform(self, shape: tuple[int, ...]) -> Any:
        import tensorflow as tf

        if self.spec.seed == 0:
            return tf.random.uniform(shape)
        return tf.random.uniform(shape, seed=self.spec.seed * 1000 + next(self._seeds))

    def draw(self, kind: str) -> Any:
        import tensorflow as tf

        shape = self.shapes[kind]
        if kind == "yx":
            u = self._uniform(shape)
            return tf.minimum(tf.cast(tf.floor(u * self.n_corner), tf.int32), self.n_corner - 1)
        # drawn as 4-D (steps * B, H, W, 1): LiteRT's LESS broadcasts the scalar rate itself up
        # to 4-D, where on the 5-D masks the converter adds a single-threaded BROADCAST_TO
        u = self._uniform((shape[0] * shape[1], *shape[2:]))
        return tf.reshape(tf.cast(u < self.mc.fire_rate, tf.float32), shape)


def _module_class() -> type:
    """The tf.Module class (built on first use, so that importing this module needs no
    TensorFlow): variables for the weights, both optimizers' states and step counters; the
    converted JAX functions as cores; the signatures generated from STOCHASTIC."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    class ExportModule(tf.Module):
        def __init__(self, fns: Functions) -> None:
            super().__init__()
            self.names = fns.names
            if fns.spec.frozen:  # constants: inference only, and delegable
                self.w = [tf.constant(np.asarray(x)) for x in fns.params0]
                fns_train_opt0, fns_ft_opt0 = [], []
            else:
                self.w = [
                    tf.Variable(np.asarray(x), name=signature_name(n))
                    for n, x in zip(fns.names, fns.params0, strict=True)
                ]
                fns_train_opt0, fns_ft_opt0 = fns.train_opt0, fns.ft_opt0
            self.train_opt = [tf.Variable(np.asarray(x)) for x in fns_train_opt0]
            self.ft_opt = [tf.Variable(np.asarray(x)) for x in fns_ft_opt0]
            self.train_step = tf.Variable(np.int32(0))
            self.ft_step = tf.Variable(np.int32(0))
            self._infer_tf = jax2tf.convert(fns.infer, with_gradient=False)
            self._train_tf = jax2tf.convert(fns.train, with_gradient=False)
            self._ft_tf = jax2tf.convert(fns.finetune, with_gradient=False)
            self.cores = {"infer": self._infer, "train": self._train, "finetune": self._finetune}

        @staticmethod
        def _read(vs: list) -> list:
            return [v.read_value() if isinstance(v, tf.Variable) else v for v in vs]

        @staticmethod
        def _assign(vs: list, xs: list) -> list:
            return [v.assign(x) for v, x in zip(vs, xs, strict=True)]

        def _infer(self, image: Any, m1: Any, m2: Any) -> Any:
            return self._infer_tf(self._read(self.w), image, m1, m2)

        def _step(self, fn: Any, opt: list, step: Any, *inputs: Any) -> Any:
            """One converted optimizer step: read the variables, assign the results, -> loss."""
            p, o, st, loss = fn(self._read(self.w), self._read(opt), step.read_value(), *inputs)
            deps = self._assign(self.w, p) + self._assign(opt, o) + [step.assign(st)]
            with tf.control_dependencies(deps):
                return tf.identity(loss)

        def _train(self, *inputs: Any) -> Any:  # image, mask, masks1, masks2, patch_yx
            return self._step(self._train_tf, self.train_opt, self.train_step, *inputs)

        def _finetune(self, *inputs: Any) -> Any:  # image, target, weight, 4 x masks, patch_yx
            return self._step(self._ft_tf, self.ft_opt, self.ft_step, *inputs)

        def _get_weights(self) -> dict[str, Any]:
            return {
                signature_name(n): v.read_value() for n, v in zip(self.names, self.w, strict=True)
            }

        def _set_weights(self, *xs: Any) -> dict[str, Any]:
            with tf.control_dependencies(self._assign(self.w, list(xs))):
                return {"count": tf.constant(len(xs), tf.int32)}

        def _get_optimizer_state(self) -> dict[str, Any]:
            out = {f"train_opt_{i}": v.read_value() for i, v in enumerate(self.train_opt)}
            out.update({f"finetune_opt_{i}": v.read_value() for i, v in enumerate(self.ft_opt)})
            out["train_step"] = self.train_step.read_value()
            out["finetune_step"] = self.ft_step.read_value()
            return out

    return ExportModule


def _build_module(fns: Functions, keys: list[str]) -> Any:
    """The tf.Module with one tf.function per signature in `keys` (each draws its op seeds when
    traced, in the order convert() traces them); no function is made for the others."""
    import tensorflow as tf

    module = _module_class()(fns)
    draws = _Draws(fns)
    b, s = fns.spec.batch, fns.spec.size

    def data_specs(sig: Signature) -> list[Any]:
        return [tf.TensorSpec((b, s, s, 1), tf.float32, name=n) for n in sig.data]

    def fn(f: Callable, specs: list[Any]) -> Any:
        return tf.function(f, input_signature=specs, autograph=False)

    def drawn_and_fixed(sig: Signature) -> tuple[Callable, Callable]:
        # closures, not default arguments: tf.function would take those for inputs
        core = module.cores[sig.name]

        def drawn(*data: Any) -> dict[str, Any]:
            return {sig.output: core(*data, *(draws.draw(kind) for _, kind in sig.random))}

        def fixed(*inputs: Any) -> dict[str, Any]:
            return {sig.output: core(*inputs)}

        return drawn, fixed

    for sig in STOCHASTIC:
        drawn, fixed = drawn_and_fixed(sig)
        if sig.name in keys:
            setattr(module, sig.name, fn(drawn, data_specs(sig)))
        if f"{sig.name}_fixed" in keys:
            rand = [draws.tensor_spec(kind, name) for name, kind in sig.random]
            setattr(module, f"{sig.name}_fixed", fn(fixed, data_specs(sig) + rand))

    infer_sig = STOCHASTIC[0]

    def sample(image: Any) -> dict[str, Any]:
        probs = tf.stack(
            [
                module.cores["infer"](image, *(draws.draw(k) for _, k in infer_sig.random))
                for _ in range(fns.spec.samples)
            ]
        )
        mean = tf.reduce_mean(probs, axis=0)
        std = tf.sqrt(tf.reduce_mean(tf.square(probs - mean), axis=0))
        return {"mean": mean, "std": std}

    if "sample" in keys:
        module.sample = fn(sample, data_specs(infer_sig))
    if fns.spec.frozen:  # no variables to read or write
        return module
    module.get_weights = fn(module._get_weights, [])
    weight_specs = [
        tf.TensorSpec(x.shape, tf.float32, name=signature_name(n))
        for n, x in zip(fns.names, fns.params0, strict=True)
    ]
    module.set_weights = fn(module._set_weights, weight_specs)
    module.get_optimizer_state = fn(module._get_optimizer_state, [])
    return module


def convert(
    cfg: RunConfig, params: Params, spec: ExportSpec, progress: bool | None = False
) -> bytes:
    """The .tflite flatbuffer for `params` of the model in `cfg` (builtin ops only);
    progress: a bar over the stages (None = only on a terminal)."""
    import tensorflow as tf

    spec.validate(cfg)
    fns = Functions(cfg, spec, params)
    keys = signature_keys(spec, cfg.model.kind)
    if not keys:
        raise ExportError(f"a frozen {cfg.model.kind} file would hold none of {spec.signatures}")
    module = _build_module(fns, keys)
    bar = tqdm(total=len(keys) + 2, desc="export", unit="stage", disable=bar_off(progress))
    sigs = {}
    for k in keys:  # tracing order fixes the device draws' op seeds
        bar.set_postfix_str(f"tracing {k}")
        sigs[k] = getattr(module, k).get_concrete_function()
        bar.update(1)
    with tempfile.TemporaryDirectory() as d:
        bar.set_postfix_str("saved model")
        tf.saved_model.save(module, d, signatures=sigs)
        bar.update(1)
        bar.set_postfix_str("converting")
        conv = tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=keys)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.experimental_enable_resource_variables = True
        conv._experimental_unfold_large_splat_constant = True
        model = conv.convert()
        bar.update(1)
        bar.close()
        return model


def operators(model: bytes) -> Iterator[tuple[int, str, Any, Any]]:
    """Every operator of a .tflite flatbuffer, read from the file's schema: (subgraph index, op
    name, the op, its subgraph), builtin ops by their BuiltinOperator name, custom ops (Flex
    ones among them) by their custom code. The op and subgraph are the schema's flat readers
    (InputsLength(), Outputs(i), Tensors(i).ShapeAsNumpy(), ...)."""
    from tensorflow.lite.python import schema_py_generated as fb

    m = fb.Model.GetRootAsModel(bytearray(model), 0)
    builtin = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    names = []
    for i in range(m.OperatorCodesLength()):
        c = m.OperatorCodes(i)
        code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
        custom = c.CustomCode()
        names.append(custom.decode() if custom else builtin.get(code, f"BUILTIN_{code}"))
    for s in range(m.SubgraphsLength()):
        g = m.Subgraphs(s)
        for j in range(g.OperatorsLength()):
            op = g.Operators(j)
            yield s, names[op.OpcodeIndex()], op, g


def subgraph_ops(model: bytes) -> list[set[str]]:
    """The op names of EVERY subgraph of a .tflite flatbuffer (one set per subgraph; each
    signature has its own subgraph)."""
    from tensorflow.lite.python import schema_py_generated as fb

    count = fb.Model.GetRootAsModel(bytearray(model), 0).SubgraphsLength()
    out: list[set[str]] = [set() for _ in range(count)]
    for s, name, _, _ in operators(model):
        out[s].add(name)
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
    progress: bool | None = False,
    train_mask_share: float | None = None,
) -> dict[str, Any]:
    """Writes out (.tflite) and out + '.json' (config, spec, signatures, ops, size, and the
    source run's train_mask_share for the device's safety net when given) atomically."""
    out = Path(out)
    model = convert(cfg, params, spec, progress=progress)
    ops = op_names(model)
    info = {
        "source_run": source,
        "config": cfg.to_dict(),
        "spec": dataclasses.asdict(spec),
        "weights": flatten_names(params),
        "signatures": signature_keys(spec, cfg.model.kind),
        # how the graph computes the convolutions (the spec may say "auto")
        "perceive": spec.perceive_impl(cfg.model),
        "ops": ops,
        "flex_ops": [o for o in ops if o.startswith("Flex") or o not in builtin_op_names()],
        "bytes": len(model),
    }
    if train_mask_share is not None:
        info["train_mask_share"] = float(train_mask_share)
    atomic_write_bytes(out, model)
    atomic_write_text(sidecar(out), json.dumps(info, indent=2) + "\n")
    return info


def builtin_op_names() -> set[str]:
    """Every builtin op name of the TFLite schema."""
    from tensorflow.lite.python import schema_py_generated as fb

    return {k for k in vars(fb.BuiltinOperator) if not k.startswith("_")}


# a deterministic model (the UNet) has no samples to draw and no VWSL to run
STOCHASTIC_ONLY = ("sample", "finetune", "finetune_fixed")


def signature_keys(spec: ExportSpec, kind: str = "med-nca") -> list[str]:
    """The signatures a file of this spec holds (weights access and the optimizer state always;
    for a UNet neither `sample` nor `finetune`; a frozen file only infer and sample)."""
    if spec.frozen:
        keys = [k for k in FROZEN_SIGNATURES if k in spec.signatures]
        keys += ["infer_fixed"] if spec.fixed_randomness and "infer" in keys else []
        return [k for k in keys if kind != "unet" or k not in STOCHASTIC_ONLY]
    keys = [k for k in SIGNATURES if k in spec.signatures or k in ("get_weights", "set_weights")]
    keys += list(EXTRA_SIGNATURES)
    keys += list(FIXED_SIGNATURES) if spec.fixed_randomness else []
    return [k for k in keys if kind != "unet" or k not in STOCHASTIC_ONLY]


def flatten_names(params: Params) -> list[str]:
    return list(flatten_params(params))


def sidecar(model_path: str | os.PathLike) -> Path:
    return Path(f"{model_path}.json")
