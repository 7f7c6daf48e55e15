"""Prototype (issue 17, goal 3, session 23): LiteRT's CompiledModel API against its Interpreter
on one signature of one file, in one process, the calls interleaved.

ai-edge-litert 2.x has a second runtime entry point, `CompiledModel` (CPU options: threads,
kernel mode, `enable_ynnpack`). The project's phone stand-in uses the `Interpreter` with the
XNNPACK delegate. This checks that CompiledModel gives the same outputs on the first call (the
files draw their fire masks from a stream seeded in the file, so the first calls of two fresh
runtimes must agree exactly) and times both, and CompiledModel with YNNPACK where the build
has it.

Usage: python experiments/prototypes/litert_compiled.py FILE SIGNATURE [--threads 2] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

BINARY_INPUTS = ("mask", "target")  # 0/1 inputs: a label, a VWSL target


def signature_inputs(details: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0, 1) float32 inputs of the signature's shapes (masks and targets thresholded)."""
    rng = np.random.default_rng(seed)
    out = {k: rng.uniform(size=d["shape"]).astype(np.float32) for k, d in details.items()}
    for k in BINARY_INPUTS:
        if k in out:
            out[k] = (out[k] > 0.5).astype(np.float32)
    return out


def compiled_runner(
    path: str, sig: str, threads: int, ynnpack: bool, inputs: dict[str, np.ndarray]
) -> tuple[Callable[[], None], dict[str, np.ndarray]]:
    """A CompiledModel on the CPU: a call that runs `sig` on `inputs`, and its first outputs."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.options import CpuOptions, HardwareAccelerator, Options

    opts = Options(
        hardware_accelerators=HardwareAccelerator.CPU,
        cpu_options=CpuOptions(num_threads=threads, enable_ynnpack=ynnpack),
    )
    cm = CompiledModel.from_file(path, options=opts)
    ib = {n: cm.create_input_buffer_by_name(sig, n) for n in cm.get_input_tensor_details(sig)}
    odet = cm.get_output_tensor_details(sig)
    ob = {n: cm.create_output_buffer_by_name(sig, n) for n in odet}
    for n, b in ib.items():
        b.write(inputs[n])

    def call() -> None:
        cm.run_by_name(sig, ib, ob)

    call()
    first = {
        n: b.read(int(np.prod(odet[n]["shape"])), np.float32).reshape(odet[n]["shape"])
        for n, b in ob.items()
    }
    return call, first


def main() -> None:
    from ai_edge_litert.interpreter import Interpreter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("signature")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    runner = Interpreter(model_path=a.file, num_threads=a.threads).get_signature_runner(a.signature)
    inputs = signature_inputs(runner.get_input_details())
    ref = {k: np.asarray(v) for k, v in runner(**inputs).items()}
    calls: dict[str, Callable[[], object]] = {"interpreter": lambda: runner(**inputs)}
    for ynn in (False, True):
        name = f"compiled model, ynnpack={ynn}"
        try:
            call, first = compiled_runner(a.file, a.signature, a.threads, ynn, inputs)
        except RuntimeError as e:  # a build without YNNPACK refuses the option
            print(f"{name}: not available ({str(e).splitlines()[0]})", flush=True)
            continue
        diff = max(float(np.max(np.abs(first[k] - ref[k]))) for k in ref)
        print(f"{name}: first call's outputs differ from the interpreter's by {diff:.3g}")
        calls[name] = call
    ts: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(a.reps):
        for k, f in calls.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    base = statistics.median(ts["interpreter"])
    for k, v in ts.items():
        m = statistics.median(v)
        print(
            f"{a.file} {a.signature}, {a.threads} threads, {k}: {m:.3f} s ({base / m:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
