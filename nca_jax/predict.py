"""Predictions: every stochastic prediction of the project goes through this module.

An image is predicted alone (a batch of one, its own batch-norm statistics) with the sample keys
fold_in(fold_in(key, image index), j); on CPU the predictions run one after another (jitted
calls in a Python loop), on GPU/TPU side by side (vmap). Same keys, same values either way
(tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nca_jax.config import ModelConfig
from nca_jax.fused import resolve as resolve_fused
from nca_jax.model import Params, predict_history, predict_logits, sample_keys

ALL = 1 << 30  # "as many as there are": every prediction side by side


def default_parallel() -> int:
    """Predictions computed side by side by default: 1 on CPU, where one after another is
    fastest (2 cores, 10 samples of 256 px: 0.75 s per prediction vs 1.23 s as one vmap), and
    all of them on GPU/TPU."""
    return 1 if jax.default_backend() == "cpu" else ALL


def make_predict(
    mc: ModelConfig, samples: int, parallel: int | None = None
) -> Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]:
    """Returns f(params, images (N,H,W), key, index (N,)) -> probabilities (samples, N, H, W).

    Each image is predicted alone (batch of one, its own batch-norm statistics) with keys
    fold_in(fold_in(key, index[i]), j) for sample j, so results do not depend on chunking.
    parallel: how many predictions run side by side (vmap); None = default_parallel(), or
    all of one image's samples where the fused CPU kernel runs the steps (`fused.resolve`:
    the samples are the groups of one kernel call per step, 1.07x a loop at 256 px). With
    all samples side by side, f is one jitted function. Otherwise the groups of `parallel`
    predictions are jitted calls that follow one another from Python: on CPU that loop is
    1.24x faster than the same predictions in one lax.map (session 20, interleaved). Same
    keys, same values either way (tested)."""
    par = parallel
    if par is None:  # the fused kernel takes one image's samples as groups of one call
        par = samples if resolve_fused(mc) else default_parallel()
    if par < 1:
        raise ValueError(f"parallel must be >= 1, got {par}")
    if par > 1:  # under vmap the fired-cells path's branch would run both ways
        mc = dataclasses.replace(mc, mlp_fired=0)

    def group(params: Params, image: jax.Array, keys: jax.Array) -> jax.Array:
        """image (H, W), keys (g,) -> the g predictions side by side, (g, H, W)."""

        def sample(k: jax.Array) -> jax.Array:
            return jax.nn.sigmoid(predict_logits(params, image[None], cfg=mc, key=k))[0]

        if keys.shape[0] == 1:
            return sample(keys[0])[None]
        return jax.vmap(sample)(keys)

    def image_keys(key: jax.Array, index: jax.Array) -> jax.Array:
        """(N,) image indices -> (N, samples) sample keys."""
        return jax.vmap(lambda i: sample_keys(jax.random.fold_in(key, i), samples))(index)

    if par >= samples:

        def f(params: Params, images: jax.Array, key: jax.Array, index: jax.Array) -> jax.Array:
            probs = jax.lax.map(
                lambda ik: group(params, *ik),
                (images, image_keys(key, index)),
                batch_size=max(1, par // samples),
            )
            return jnp.swapaxes(probs, 0, 1)

        return jax.jit(f)

    run_group, keys_of = jax.jit(group), jax.jit(image_keys)

    def loop(params: Params, images: jax.Array, key: jax.Array, index: jax.Array) -> jax.Array:
        keys = keys_of(key, index)
        per_image = [
            jnp.concatenate(
                [run_group(params, images[i], keys[i, j : j + par]) for j in range(0, samples, par)]
            )
            for i in range(images.shape[0])
        ]
        return jnp.stack(per_image, axis=1)

    return loop


def bar_off(progress: bool | None) -> bool | None:
    """tqdm's `disable` for a progress flag: True shows, False hides, None shows it only when
    stderr is a terminal (tqdm's own rule)."""
    return None if progress is None else not progress


def predict_dataset(
    predict: Callable,
    params: Params,
    images: np.ndarray,
    key: jax.Array,
    chunk: int = 4,
    progress: bool | None = False,
    desc: str = "predicting",
) -> np.ndarray:
    """Runs `predict` (from make_predict) over images (N,H,W) in chunks -> (samples, N, H, W).
    progress: a progress bar (tqdm, stderr) counting images; None = only on a terminal."""
    out = []
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=bar_off(progress))
    for i in range(0, len(images), chunk):
        part = images[i : i + chunk]
        idx = np.arange(i, i + len(part), dtype=np.int32)
        if len(part) < chunk:  # pad so the jitted function sees one shape only
            pad = chunk - len(part)
            part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            idx = np.concatenate([idx, np.repeat(idx[-1:], pad)])
        out.append(np.asarray(predict(params, jnp.asarray(part), key, jnp.asarray(idx))))
        bar.update(min(chunk, len(images) - i))
    bar.close()
    return np.concatenate(out, axis=1)[:, : len(images)]


def sample(
    params: Params,
    mc: ModelConfig,
    images: np.ndarray,
    key: jax.Array,
    n: int,
    chunk: int = 4,
    progress: bool | None = False,
    desc: str = "sampling",
) -> np.ndarray:
    """n stochastic predictions of every image (N, H, W) -> probabilities (n, N, H, W)."""
    return predict_dataset(
        make_predict(mc, n), params, images, key, chunk=chunk, progress=progress, desc=desc
    )


def make_history(
    mc: ModelConfig,
) -> Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """Returns jit(f)(params, image (H, W), key, index ()) -> lung probabilities after every
    step (level 1 (steps, H, W) upsampled, level 2 (steps, H, W)) of the image's first sample:
    the same keys as sample 0 of make_predict, so level2[-1] equals that prediction."""

    def f(params: Params, image: jax.Array, key: jax.Array, index: jax.Array):
        k = sample_keys(jax.random.fold_in(key, index), 1)[0]
        l1, l2 = predict_history(params, image[None], cfg=mc, key=k)
        return jax.nn.sigmoid(l1[:, 0]), jax.nn.sigmoid(l2[:, 0])

    return jax.jit(f)
