"""Prototype (issue 17, goal 3, session 25): call one signature of an exported file in a loop,
for a profiler to watch (perf names LiteRT's kernels and XNNPACK's micro-kernels).

Usage:
    perf record -e cpu-clock -F 999 -g -o train.perf \\
        python experiments/prototypes/litert_loop.py FILE train [--calls 12] [--threads 2]
    perf report -i train.perf --no-children --sort symbol -g none
    perf report -i train.perf --children --sort symbol -g none | grep "ops::builtin"
(The machine has no hardware counters: the software clock `cpu-clock` works.)
"""

from __future__ import annotations

import argparse
import statistics
import time

from nca_jax.bench import _signature_inputs
from nca_jax.device_train import TFLiteModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("signature", choices=["infer", "sample", "train", "finetune"])
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    model = TFLiteModel(a.file, a.threads)
    kw = _signature_inputs(model.batch, model.size)[a.signature]
    model.run(a.signature, **kw)
    ts = []
    for _ in range(a.calls):
        t = time.perf_counter()
        model.run(a.signature, **kw)
        ts.append(time.perf_counter() - t)
    print(f"{a.signature}: median {statistics.median(ts):.3f} s over {a.calls} calls")


if __name__ == "__main__":
    main()
