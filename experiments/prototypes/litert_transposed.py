"""Prototype (issue 17, goal 3, session 25): how the TFLite converter lowers `x @ w.T` when w
is computed in the graph, and what that costs in LiteRT.

perf on LiteRT's `train` call showed a quarter of it in FULLY_CONNECTED on LiteRT's own Eigen
kernel: the converter folds a product by a transposed operand into FULLY_CONNECTED, and the
XNNPACK delegate refuses one whose weights are not constant. This converts a few forms of
relu(x @ (1.5 w).T) (the 1.5 makes the weights computed), lists each file's ops, checks the
value against NumPy and times 50 calls with 2 LiteRT threads.

Usage: python experiments/prototypes/litert_transposed.py [--rows 4096] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax.export import operators
from nca_jax.mlp import transposed

FORMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "x @ w.T": lambda x, w: x @ w.T,
    "einsum": lambda x, w: jnp.einsum("nk,mk->nm", x, w),
    "batch axis": lambda x, w: (x[None] @ jnp.swapaxes(w, 0, 1)[None])[0],
    "concatenated w.T": lambda x, w: x @ jnp.concatenate([w.T[:, :1], w.T[:, 1:]], axis=1),
    "mlp.transposed(w)": lambda x, w: x @ transposed(w),
}


def convert(fn: Callable, shapes: list[tuple[int, ...]]) -> bytes:
    import tensorflow as tf
    from jax.experimental import jax2tf

    tf_fn = tf.function(
        jax2tf.convert(fn, with_gradient=False),
        autograph=False,
        input_signature=[tf.TensorSpec(s, tf.float32) for s in shapes],
    )
    conv = tf.lite.TFLiteConverter.from_concrete_functions([tf_fn.get_concrete_function()], tf_fn)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return conv.convert()


def op_counts(model: bytes) -> dict[str, int]:
    return dict(collections.Counter(name for _, name, _, _ in operators(model)))


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(a.rows, 16)).astype(np.float32)
    w = rng.uniform(size=(128, 16)).astype(np.float32)
    want = np.maximum(x @ (1.5 * w).T, 0.0)
    for name, form in FORMS.items():
        model = convert(
            lambda x, w, form=form: jnp.maximum(form(x, w * 1.5), 0.0), [x.shape, w.shape]
        )
        it = Interpreter(model_content=model, num_threads=a.threads)
        it.allocate_tensors()
        ins, out = it.get_input_details(), it.get_output_details()[0]["index"]

        def call(it=it, ins=ins, out=out) -> np.ndarray:
            it.set_tensor(ins[0]["index"], x)
            it.set_tensor(ins[1]["index"], w)
            it.invoke()
            return it.get_tensor(out)

        err = float(np.abs(call() - want).max())
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(ts)
        print(f"{name:20s} {ms:7.3f} ms  max error {err:.1e}  {op_counts(model)}")


if __name__ == "__main__":
    main()
