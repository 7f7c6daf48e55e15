"""Prototype (issue 17, goal 3, session 30): the folded norm's (48, 48) covariance of the
level-2 MLP input, (65,536, 48) rows at 256 px, in LiteRT, written several ways.

A profile of the trainable file's `infer` (session 29) put about a sixth of its time around
this product: a BATCH_MATMUL with adj_x, a transpose and XNNPACK's scalar packing of the
(65,536, 48) operand. This converts small graphs, one per formulation (the rows' product
as adj_x, as a transposed copy times the rows, as a MatMul of the transposed copy with adj_y,
and the rows in P blocks whose products are summed), and times them interleaved with the
XNNPACK delegate, checking each against a float64 product.

Usage: python experiments/prototypes/litert_cov.py [--threads 2] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

N, F = 65_536, 48


def formulations() -> dict[str, Callable]:
    """name -> f(x (N, F)) -> x^T x (F, F), as TensorFlow ops."""
    import tensorflow as tf

    def blocks(p: int, transposed: bool) -> Callable:
        def f(x):
            xr = tf.reshape(x, (p, N // p, F))
            if transposed:
                xt = tf.transpose(xr, (0, 2, 1))
                return tf.reduce_sum(tf.matmul(xt, xt, transpose_b=True), axis=0)
            return tf.reduce_sum(tf.matmul(xr, xr, transpose_a=True), axis=0)

        return f

    out = {
        "adj_x (the export's)": lambda x: tf.matmul(x, x, transpose_a=True),
        "transpose, then matmul": lambda x: tf.matmul(tf.transpose(x), x),
        "transpose, matmul adj_y": lambda x: tf.matmul(
            tf.transpose(x), tf.transpose(x), transpose_b=True
        ),
    }
    for p in (16, 64, 256):
        out[f"{p} blocks, adj_x"] = blocks(p, False)
        out[f"{p} blocks, transposed"] = blocks(p, True)
    return out


def convert(fn: Callable) -> bytes:
    import tensorflow as tf

    spec = [tf.TensorSpec((N, F), tf.float32)]
    cf = tf.function(fn, input_signature=spec).get_concrete_function()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([cf])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return conv.convert()


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    x = np.random.default_rng(0).normal(size=(N, F)).astype(np.float32)
    want = x.T.astype(np.float64) @ x
    runs = {}
    for name, fn in formulations().items():
        it = Interpreter(model_content=convert(fn), num_threads=a.threads)
        it.allocate_tensors()
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        got = it.get_tensor(it.get_output_details()[0]["index"])
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        runs[name] = (it, err, [])
    for _ in range(a.reps):
        for it, _, ts in runs.values():
            t = time.perf_counter()
            it.invoke()
            ts.append(time.perf_counter() - t)
    for name, (_, err, ts) in runs.items():
        print(f"{name:26s} {1e3 * statistics.median(ts):6.2f} ms  (relative error {err:.1e})")


if __name__ == "__main__":
    main()
