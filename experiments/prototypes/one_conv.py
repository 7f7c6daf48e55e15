"""Prototype (issue 17, session 20): the perception's two 3x3 convolutions (16 -> 16 each) as
one convolution 16 -> 32 with the two kernels side by side, timed interleaved against the
library's two convolutions in one training step and one prediction. Same parameters; the
values agree to float rounding (printed).

Usage: python experiments/prototypes/one_conv.py [--batch 4] [--reps 5]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import model
from nca_jax.bench import predict_runner, timeit_interleaved, train_runner
from nca_jax.config import ModelConfig


def perceive_one_conv(pp, state):
    """state (B, H, W, C) -> (B, H, W, 3C): [state, conv0(state), conv1(state)] as one conv."""
    k = jnp.concatenate([pp["conv0"]["kernel"], pp["conv1"]["kernel"]], -1)  # (3, 3, C, 2C)
    b = jnp.concatenate([pp["conv0"]["bias"], pp["conv1"]["bias"]])
    padded = jnp.pad(state, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    p = jax.lax.conv_general_dilated(
        padded, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.concatenate([state, p + b], axis=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="*", default=[4])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    # the variant goes in through the library's "im2col" hook: apply_rule calls
    # model.perceive_im2col for it, patched here before the variant is traced
    library = model.perceive_im2col
    variants = {
        "two convs": (ModelConfig(), library),
        "one conv": (ModelConfig(perceive="im2col"), perceive_one_conv),
    }
    cases = {
        f"training step, batch {b}": (lambda m, b=b: train_runner(m, a.size, b)) for b in a.batch
    }
    cases[f"one prediction, 1 x {a.size}"] = lambda m: predict_runner(m, a.size)
    for name, make in cases.items():
        fns, first = {}, {}
        for v, (mc, perceive) in variants.items():
            model.perceive_im2col = perceive
            fns[v] = make(mc)
            first[v] = np.asarray(fns[v]())  # traces and compiles with this variant
        model.perceive_im2col = library
        diff = float(np.max(np.abs(first["two convs"] - first["one conv"])))
        t = timeit_interleaved(fns, a.reps)
        print(
            f"{name}: two convs {t['two convs']:.3f} s, one conv {t['one conv']:.3f} s "
            f"({t['two convs'] / t['one conv']:.2f}x); first outputs differ by {diff:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
