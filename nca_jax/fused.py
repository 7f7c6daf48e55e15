"""One NCA step as one fused CPU kernel, and its backward as another (`csrc/nca_step.cc`, XLA
FFI calls).

XLA on CPU writes every op's output of a step (padding, two convolutions, the features, the
(cells, 128) hidden array, ...) to memory and reads it back. The kernel does a level's step in
two passes over the image rows with everything but the 48 features per cell in cache:
convolutions and the batch norm's statistics, then the folded MLP on the fired cells and the
update. Same function as `model.nca_step` (tests: to float rounding). The backward kernel
recomputes the features and statistics from the step's input state (the only residual kept),
then takes the fired cells' MLP backward, the norm's gradient in its folded form (mlp.py
`_stats_grads`) and the convolutions' transposes in three more passes; same gradients as
XLA's path (tests: to float rounding). Predictions use it where `ModelConfig.fused_forward`
resolves to it, training and fine-tuning where `ModelConfig.fused_train` does.

The kernel is compiled with the system's C++ compiler (g++, or $CXX) on first use into
$NCA_JAX_CACHE (default ~/.cache/nca_jax), under a name that hashes the source, the flags and
jaxlib's version; it needs x86-64 with AVX-512 and OpenMP. `kernel_status()` says whether it is
usable here and, if not, why; `resolve(cfg, train)` decides per config.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from nca_jax.errors import ConfigError

SOURCE = Path(__file__).resolve().parent / "csrc" / "nca_step.cc"
TARGET = "nca_jax_step_fwd"
TARGET_BWD = "nca_jax_step_bwd"
CHANNELS, HIDDEN = 16, 128  # the sizes the kernel is written for (the paper's)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cache_dir() -> Path:
    return Path(os.environ.get("NCA_JAX_CACHE", Path.home() / ".cache" / "nca_jax"))


def build(out_dir: Path | None = None) -> Path:
    """Compiles the kernel into out_dir (default `cache_dir()`) unless it is there already;
    returns the library's path. Written to a temporary name, then renamed (no half-written
    library). Raises ConfigError naming the compiler and its first error lines."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise ConfigError(f"fused kernel: no C++ compiler {cxx!r} on PATH (set CXX)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cxx, *FLAGS)).encode())
    digest.update(importlib.metadata.version("jaxlib").encode())  # the FFI headers' version
    out_dir = cache_dir() if out_dir is None else out_dir
    so = out_dir / f"libnca_step-{digest.hexdigest()[:16]}.so"
    if so.exists():
        return so
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            errs = [ln for ln in r.stderr.splitlines() if "error" in ln][:3]
            raise ConfigError(
                f"fused kernel: {cxx} could not compile {SOURCE}: "
                + (" | ".join(errs) or r.stderr.strip()[-300:])
            )
        os.replace(tmp, so)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return so


@functools.cache
def kernel_status() -> tuple[bool, str]:
    """(usable, why): builds, loads and registers the kernel once per process. Usable needs
    Linux on x86-64 with AVX-512F and a C++ compiler with OpenMP."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"the kernel is written for x86-64 Linux, not {platform.machine()}"
    if "avx512f" not in _cpu_flags():
        return False, "this CPU has no AVX-512F"
    try:
        so = build()
        lib = ctypes.cdll.LoadLibrary(str(so))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.NcaStepFwd), platform="cpu")
        jax.ffi.register_ffi_target(TARGET_BWD, jax.ffi.pycapsule(lib.NcaStepBwd), platform="cpu")
    except (ConfigError, OSError) as e:
        return False, str(e)
    return True, f"built at {so}"


def supported(cfg: Any) -> str | None:
    """None if the config's step is one the kernel computes, else the reason it is not."""
    if cfg.kind != "med-nca":
        return f"model.kind {cfg.kind!r} has no NCA step"
    if (cfg.channels, cfg.hidden) != (CHANNELS, HIDDEN):
        return f"the kernel is written for channels {CHANNELS} and hidden {HIDDEN}"
    return None


def resolve(cfg: Any, train: bool = False) -> bool:
    """Whether this ModelConfig's NCA steps run the fused kernel: those of predictions
    (cfg.fused_forward), or with train=True those of training and fine-tuning (cfg.fused_train,
    the kernel's backward too). 1 = yes (a ConfigError if it cannot), 0 = no, -1 = auto (on
    the CPU backend where it is usable; for training only with cfg.fast_backward, since
    fast_backward false asks for XLA's own gradient, the reference)."""
    name = "fused_train" if train else "fused_forward"
    want = getattr(cfg, name)
    if want == 0 or (want == -1 and train and not cfg.fast_backward):
        return False
    why = supported(cfg)
    if why is None and jax.default_backend() != "cpu":
        why = f"the default backend is {jax.default_backend()}; the kernel runs on the CPU"
    if why is None:
        ok, why = kernel_status()
        if ok:
            return True
    if want == 1:
        raise ConfigError(f"model.{name} is 1 but the fused kernel cannot run: {why}")
    return False


@custom_vmap
def _grouped(state: jax.Array, mask: jax.Array, weights: tuple, eps: jax.Array) -> jax.Array:
    """state (G, B, H, W, C), mask (G, B, H, W), eps (1,) -> new state (G, B, H, W, C)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(state.shape, jnp.float32))
    return call(state, mask, *weights, eps)


@_grouped.def_vmap
def _grouped_vmap(axis_size, in_batched, state, mask, weights, eps):
    """vmap as more groups: state and mask broadcast to the batch, (N, G, ...) -> (N G, ...);
    each group keeps its own statistics. Batched weights are not supported."""
    sb, mb, wb, eb = in_batched
    if any(jax.tree_util.tree_leaves(wb)) or eb:
        raise ValueError("the fused NCA step cannot be vmapped over its parameters")
    n = axis_size
    if not sb:
        state = jnp.broadcast_to(state, (n, *state.shape))
    if not mb:
        mask = jnp.broadcast_to(mask, (n, *mask.shape))
    out = _grouped(
        state.reshape(-1, *state.shape[2:]), mask.reshape(-1, *mask.shape[2:]), weights, eps
    )
    return out.reshape(state.shape), True


@custom_vmap
def _grouped_bwd(
    state: jax.Array, mask: jax.Array, weights: tuple, eps: jax.Array, g: jax.Array
) -> tuple:
    """The backward of `_grouped`: g (G, B, H, W, C) = the new state's cotangent -> (the
    state's (G, B, H, W, C), each weight's with a leading G: one gradient per group)."""
    n = state.shape[0]
    shapes = [state.shape, *((n, *w.shape) for w in weights)]
    call = jax.ffi.ffi_call(TARGET_BWD, [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes])
    ds, *dw = call(state, mask, *weights, eps, g)
    return ds, tuple(dw)


@_grouped_bwd.def_vmap
def _grouped_bwd_vmap(axis_size, in_batched, state, mask, weights, eps, g):
    """vmap as more groups, as `_grouped_vmap`: every output batched, (N, G, ...)."""
    sb, mb, wb, eb, gb = in_batched
    if any(jax.tree_util.tree_leaves(wb)) or eb:
        raise ValueError("the fused NCA step cannot be vmapped over its parameters")
    n = axis_size
    state, mask, g = (
        x if b else jnp.broadcast_to(x, (n, *x.shape))
        for x, b in ((state, sb), (mask, mb), (g, gb))
    )
    ds, dw = _grouped_bwd(
        *(x.reshape(-1, *x.shape[2:]) for x in (state, mask)),
        weights,
        eps,
        g.reshape(-1, *g.shape[2:]),
    )
    dw = tuple(d.reshape(n, -1, *d.shape[1:]) for d in dw)
    return (ds.reshape(state.shape), dw), (True, tuple(True for _ in dw))


@jax.custom_vjp
def _step(state: jax.Array, mask: jax.Array, weights: tuple, eps: jax.Array) -> jax.Array:
    return _grouped(state[None], mask[None], weights, eps)[0]


def _step_fwd(state, mask, weights, eps):
    return _step(state, mask, weights, eps), (state, mask, weights, eps)


def _step_bwd(res, g):
    """The kernel's backward (it recomputes the step's features and statistics): the
    state's and the weights' gradients; none for the fire mask and eps."""
    state, mask, weights, eps = res
    ds, dw = _grouped_bwd(state[None], mask[None], weights, eps, g[None])
    return ds[0], jnp.zeros_like(mask), tuple(d[0] for d in dw), jnp.zeros_like(eps)


_step.defvjp(_step_fwd, _step_bwd)


def step(
    level_params: dict, state: jax.Array, mask: jax.Array, cfg: Any, channels: jax.Array
) -> jax.Array:
    """One stochastic NCA step through the kernel: state (B, H, W, C), fire mask
    (B, H, W, 1) of 0/1 -> new state (B, H, W, C); `model.nca_step`'s values. channels (C,):
    dense_out's kernel is multiplied by it (`model._update_channels`: the image is kept).

    The conv and dense_in biases are not passed: the batch-stats norm cancels them."""
    pp = level_params["perceive"]
    weights = (
        jnp.concatenate([pp["conv0"]["kernel"], pp["conv1"]["kernel"]], -1),  # (3, 3, C, 2C)
        level_params["dense_in"]["kernel"],
        level_params["norm"]["scale"],
        level_params["norm"]["bias"],
        level_params["dense_out"]["kernel"] * channels,
    )
    weights = tuple(w.astype(jnp.float32) for w in weights)
    eps = jnp.full((1,), cfg.bn_eps, jnp.float32)
    return _step(state.astype(jnp.float32), mask[..., 0].astype(jnp.float32), weights, eps)
