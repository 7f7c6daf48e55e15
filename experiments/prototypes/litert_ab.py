"""Prototype (issue 17, goal 3, session 30): one signature of several exported files, calls
interleaved (A, B, A, B, ...), medians and minimums; `bench.py --tflite A B` does the same for
every signature with fewer calls.

Usage: python experiments/prototypes/litert_ab.py SIGNATURE REPS FILE [FILE ...]
"""

from __future__ import annotations

import statistics
import sys
import time

from nca_jax.bench import _signature_inputs
from nca_jax.device_train import TFLiteModel


def main() -> None:
    sig, reps, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    models = [TFLiteModel(f, 2) for f in files]
    kw = _signature_inputs(models[0].batch, models[0].size)[sig]
    for m in models:
        m.run(sig, **kw)
    ts: list[list[float]] = [[] for _ in models]
    for _ in range(reps):
        for m, t in zip(models, ts, strict=True):
            t0 = time.perf_counter()
            m.run(sig, **kw)
            t.append(time.perf_counter() - t0)
    for f, t in zip(files, ts, strict=True):
        print(f"{sig} {f}: median {statistics.median(t):.3f} s, min {min(t):.3f} s")


if __name__ == "__main__":
    main()
