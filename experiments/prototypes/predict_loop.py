"""Prototype (issue 17, goal 2, session 20): the CPU sampling path as a Python loop of one jitted
prediction, against the library's lax.map inside one jitted function.

Three quiet benches (sessions 4 and 20) timed the 10 predictions of one 256 px image as a
Python loop of a jitted single prediction at 7.54 / 12.16 / 12.28 s against 8.91 / 15.05 /
14.40 s for `make_predict`'s lax.map, but one after the other. This times the two interleaved
in one process, with the same keys, and checks that the probabilities are the same. (The
library has used the loop since: `make_predict` below is the loop, and the lax.map is kept
here as it was.)

Usage: python experiments/prototypes/predict_loop.py [--size 256] [--samples 10] [--reps 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax.bench import _bench_params, timeit_interleaved
from nca_jax.config import ModelConfig
from nca_jax.model import predict_logits, sample_keys
from nca_jax.predict import make_predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    mc = ModelConfig()
    params = _bench_params(mc)
    img = jnp.asarray(np.random.default_rng(0).uniform(size=(1, a.size, a.size)), jnp.float32)
    key, index = jax.random.key(1), jnp.zeros((1,), jnp.int32)
    library = make_predict(mc, a.samples, 1)  # the loop, since session 20

    @jax.jit
    def lax_map(params, images, key, index):  # make_predict(parallel=1) before session 20
        def per_image(ik):
            def sample(k):
                return jax.nn.sigmoid(predict_logits(params, ik[0][None], cfg=mc, key=k))[0]

            return jax.lax.map(sample, sample_keys(ik[1], a.samples), batch_size=1)

        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        return jnp.swapaxes(jax.lax.map(per_image, (images, keys)), 0, 1)

    one = jax.jit(lambda p, i, k: jax.nn.sigmoid(predict_logits(p, i, cfg=mc, key=k)))

    def loop() -> jax.Array:
        keys = sample_keys(jax.random.fold_in(key, index[0]), a.samples)
        return jnp.stack([one(params, img, keys[j]) for j in range(a.samples)])

    ref = np.asarray(lax_map(params, img, key, index))[:, 0]
    got = np.asarray(loop())[:, 0]
    lib = np.asarray(library(params, img, key, index))[:, 0]
    print(
        f"max |loop - lax.map| = {np.max(np.abs(ref - got)):.2e}, "
        f"max |make_predict - loop| = {np.max(np.abs(lib - got)):.2e}",
        flush=True,
    )
    t = timeit_interleaved(
        {"lax.map": lambda: lax_map(params, img, key, index), "loop": loop}, a.reps
    )
    print(
        f"{a.samples} predictions of 1 x {a.size}: lax.map {t['lax.map']:.2f} s, Python loop "
        f"{t['loop']:.2f} s ({t['lax.map'] / t['loop']:.2f}x)",
        flush=True,
    )


if __name__ == "__main__":
    main()
