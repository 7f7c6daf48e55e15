"""Prototype (issue 17, goal 3, session 27): the MLP of an exported `infer` a block of cells at a
time, written out (no loop), so that LiteRT streams (block, 128) arrays through its cache
instead of one (65,536, 128) array per level-2 step through memory.

The library's chunked MLP is a lax.scan, which a converted graph would run as a WHILE loop; the
export therefore uses all cells at once (mlp_chunk 0). This script swaps in, for its own process
only, a forward that slices the centred rows into blocks, runs the MLP on each and concatenates
the outputs (in groups of at most four inputs: the XNNPACK delegate takes at most five), and
exports one `infer`-only file per block size. Time them against each other, calls
interleaved, with bench.py:

    python experiments/prototypes/litert_infer_chunks.py --out runs/phone/chunks \
        --chunks 0 4096 16384
    python bench.py --tflite-only --tflite runs/phone/chunks/*.tflite --reps 5 --tflite-threads 2 \
        --json OUT.json

Block 0 is today's export (every cell at once). The blocks compute the scan's function: the
script checks them against `mlp._chunks_fwd` on random rows before exporting, and
tests/test_experiments.py checks the same on small shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from nca_jax import export, mlp
from nca_jax.config import load_config
from nca_jax.model import init_params


def unrolled_chunks_fwd(
    xc: jax.Array, wf: jax.Array, c: jax.Array, w2: jax.Array, chunk: int
) -> jax.Array:
    """mlp._chunks_fwd's function, its blocks written out: (R, F) -> (R, C)."""
    outs = [jax.nn.relu(xc[i : i + chunk] @ wf + c) @ w2 for i in range(0, xc.shape[0], chunk)]
    while len(outs) > 1:
        outs = [jnp.concatenate(outs[i : i + 4], axis=0) for i in range(0, len(outs), 4)]
    return outs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/paper.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 16384])
    ap.add_argument("--frozen", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    params = init_params(cfg.model, key=jax.random.key(0))
    # the same function as the scan, checked on random rows
    k = jax.random.split(jax.random.key(1), 4)
    xc, wf = jax.random.normal(k[0], (10_000, 48)), jax.random.normal(k[1], (48, 128))
    c, w2 = jax.random.normal(k[2], (128,)), jax.random.normal(k[3], (128, 16))
    ref = mlp._chunks_fwd(xc, wf, c, w2, 4096)
    err = float(jnp.max(jnp.abs(unrolled_chunks_fwd(xc, wf, c, w2, 4096) - ref)))
    print(
        f"unrolled blocks vs the scan: max abs difference {err:.2e} (values up to "
        f"{float(jnp.max(jnp.abs(ref))):.1f})"
    )
    mlp._chunks_fwd = unrolled_chunks_fwd  # this process only
    orig_init = export.Functions.__init__
    for chunk in args.chunks:

        def init(self, cfg, spec, params, _chunk=chunk):  # noqa: ANN001
            orig_init(self, cfg, spec, params)
            self.mc = dataclasses.replace(self.mc, mlp_chunk=_chunk)
            self.cfg = dataclasses.replace(self.cfg, model=self.mc)

        export.Functions.__init__ = init
        spec = export.ExportSpec(signatures=("infer",), frozen=args.frozen)
        name = f"{'frozen' if args.frozen else 'trainable'}-infer-chunk{chunk}.tflite"
        info = export.export(cfg, params, spec, out / name, source="untrained, init seed 0")
        print(name, info.get("bytes"), info.get("ops"))


if __name__ == "__main__":
    main()
