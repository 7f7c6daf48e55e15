"""Prototype (issue 17, goal 3, session 31): the level-2 MLP of an exported `infer` as a
FULLY_CONNECTED with computed weights, fused bias and fused ReLU, in LiteRT's CompiledModel
with XNNPACK's DYNAMIC_FULLY_CONNECTED flag.

The trainable file writes relu(xc @ (w1 * a) + c) @ w2 as BATCH_MATMUL, then ADD with a fused
ReLU: the (65,536, 128) hidden array is written by the product and read and written again by
the ADD. A FULLY_CONNECTED op takes the bias and the ReLU in its own pass, but XNNPACK's
delegate takes one with computed weights only when the runtime sets the flag
TFLITE_XNNPACK_DELEGATE_FLAG_DYNAMIC_FULLY_CONNECTED (0x8), which the Interpreter's default
delegate does not, and CompiledModel's CpuOptions(xnnpack_flags=) can. This converts small
graphs (the MLP alone, weights as inputs so that they are computed tensors) and times each
form in each runtime, calls interleaved.

Measured in session 31 (65,536 rows, 2 threads, 21 calls each): the converter fuses neither
the computed bias nor the ReLU into FULLY_CONNECTED (the graph keeps its ADD), so the FC form
is the BMM form's work: 7.19 ms with the flag against 7.42 ms for today's BATCH_MATMUL form in
the Interpreter, and 36.8 ms without the flag (LiteRT's own kernel). The flag makes computed-
weight FULLY_CONNECTED ops delegated, which nothing in the export needs (mlp.transposed keeps
them BATCH_MATMUL).

Usage: python experiments/prototypes/litert_dynamic_fc.py [--rows 65536] [--threads 2] [--reps 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.prototypes.litert_transposed import convert
from nca_jax.export import operators

DYNAMIC_FC = 0x8


def bmm_form(x, w1, a, c, w2):
    """What the export writes today: BATCH_MATMUL, ADD (+ReLU), BATCH_MATMUL."""
    return jax.nn.relu(x @ (w1 * a) + c) @ w2


def fc_form(x, w1, a, c, w2):
    """x @ W.T with W computed and kept transposed: FULLY_CONNECTED (bias, ReLU fused?)."""
    wt = jax.lax.optimization_barrier((w1 * a).T)
    w2t = jax.lax.optimization_barrier(w2.T)
    h = jax.nn.relu(jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ()))) + c)
    return jax.lax.dot_general(h, w2t, (((1,), (1,)), ((), ())))


FORMS: dict[str, Callable] = {"bmm": bmm_form, "fc": fc_form}


def interpreter_call(
    model: bytes, threads: int, args: list[np.ndarray]
) -> Callable[[], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=threads)
    it.allocate_tensors()
    ins, out = it.get_input_details(), it.get_output_details()[0]["index"]
    for d, v in zip(ins, args, strict=True):
        it.set_tensor(d["index"], v)

    def call() -> np.ndarray:
        it.invoke()
        return it.get_tensor(out)

    return call


def compiled_call(
    path: str, threads: int, flags: int | None, args: list[np.ndarray]
) -> Callable[[], np.ndarray]:
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.options import CpuOptions, HardwareAccelerator, Options

    opts = Options(
        hardware_accelerators=HardwareAccelerator.CPU,
        cpu_options=CpuOptions(num_threads=threads, xnnpack_flags=flags),
    )
    cm = CompiledModel.from_file(path, options=opts)
    sig = cm.get_signature_list()
    name = next(iter(sig))
    ins = list(cm.get_input_tensor_details(name))
    ib = {n: cm.create_input_buffer_by_name(name, n) for n in ins}
    odet = cm.get_output_tensor_details(name)
    ob = {n: cm.create_output_buffer_by_name(name, n) for n in odet}
    for n, v in zip(sorted(ins), args, strict=True):  # jax2tf's names: args_0, args_1, ...
        ib[n].write(v)
    (oname,) = odet

    def call() -> np.ndarray:
        cm.run_by_name(name, ib, ob)
        shape = odet[oname]["shape"]
        return ob[oname].read(int(np.prod(shape)), np.float32).reshape(shape)

    return call


def main() -> None:
    import collections
    import os
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    args = [
        rng.normal(size=(a.rows, 48)).astype(np.float32),
        rng.normal(size=(48, 128)).astype(np.float32) / 7,
        rng.uniform(0.5, 1.5, size=(128,)).astype(np.float32),
        rng.normal(size=(128,)).astype(np.float32),
        rng.normal(size=(128, 16)).astype(np.float32) / 11,
    ]
    want = np.asarray(bmm_form(*map(jnp.asarray, args)))
    tmp = tempfile.mkdtemp()
    calls: dict[str, Callable[[], np.ndarray]] = {}
    for name, form in FORMS.items():
        model = convert(form, [v.shape for v in args])
        ops = collections.Counter(op for _, op, _, _ in operators(model))
        print(f"{name}: ops {dict(ops)}", flush=True)
        path = os.path.join(tmp, f"{name}.tflite")
        with open(path, "wb") as f:
            f.write(model)
        calls[f"{name}, interpreter"] = interpreter_call(model, a.threads, args)
        for flags in (None, DYNAMIC_FC):
            try:
                calls[f"{name}, compiled, flags {flags}"] = compiled_call(
                    path, a.threads, flags, args
                )
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name}, compiled, flags {flags}: {str(e).splitlines()[0]}")
    for k, f in calls.items():
        err = float(np.abs(f() - want).max())
        print(f"{k}: max |diff| to JAX {err:.3g}", flush=True)
    ts: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(a.reps):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    base = statistics.median(ts["bmm, interpreter"])
    for k, v in ts.items():
        m = statistics.median(v)
        print(f"{k}: median {m * 1e3:.2f} ms, min {min(v) * 1e3:.2f} ms ({base / m:.2f}x)")


if __name__ == "__main__":
    main()
