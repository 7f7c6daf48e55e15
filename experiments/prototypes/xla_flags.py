"""Prototype (issue 17, session 22): XLA CPU flags that hand more ops to YNNPACK.

XLA reads its flags once per process, so each setting runs in a child process of its own, one
after another, the default first and last (the spread of those two is this machine's noise).
Each child times the training step (batch 4) and one prediction of the library, interleaved,
and the float32 matmul rate. Tried in session 22: `--xla_cpu_experimental_ynn_fusion_type`
with +eltwise, +reduce and both (YNNPACK's element-wise and reduction fusions; the default
hands it only dots), and +individual_convolution (jaxlib 0.10.2 leaves the convolutions to
Eigen all the same: no YNN fusion appears in the compiled HLO).

Usage: python experiments/prototypes/xla_flags.py [--reps 3] [--ynn "" +eltwise +reduce ""]
("" = XLA's default; each other value goes to --xla_cpu_experimental_ynn_fusion_type)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, jax
from nca_jax.bench import matmul_gflops, predict_runner, timeit_interleaved, train_runner
from nca_jax.config import ModelConfig
mc = ModelConfig()
fns = {"train": train_runner(mc, 256, 4), "predict": predict_runner(mc, 256)}
med = timeit_interleaved(fns, REPS)
print("RESULT", json.dumps({**med, "matmul_gflops": matmul_gflops()}))
"""

DEFAULT_YNN = ["", "+eltwise", "+reduce", "+eltwise,+reduce", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ynn", nargs="*", default=DEFAULT_YNN)
    a = ap.parse_args()
    for ynn in a.ynn:
        flags = f"--xla_cpu_experimental_ynn_fusion_type={ynn}" if ynn else ""
        env = {**os.environ, "XLA_FLAGS": flags}
        code = CHILD.replace("REPS", str(a.reps))
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT"))[7:])
        print(
            f"{flags or '(default)':58s} train {r['train']:.3f} s  predict {r['predict']:.3f} s"
            f"  matmul {r['matmul_gflops']:.0f} GFLOP/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
