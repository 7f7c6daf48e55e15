"""Prototype (issue 17, goal 3, session 27): the MLP of an exported `infer` only on the cells
that fire, as the library's CPU path computes it (`model.mlp_fired`, session 26).

The export turns `mlp_fired` off: the gather of the fired rows (`jnp.nonzero` with a size)
and the `lax.cond` that falls back to every cell when more fired than the slots hold. Here,
for this process only, `--fired cond` exports the library's function as it is (the cond
becomes a LiteRT IF with two subgraphs) and `--fired slots` the fired rows in their slots alone, in
ops LiteRT runs (`slots_only_mlp`; no fallback: a step firing more cells than
`mlp.fired_capacity` would lose the rest; a Binomial count above it has probability below
1e-15, but a library cannot ship that). Time the files
against today's export, calls interleaved, with bench.py:

    python experiments/prototypes/litert_infer_fired.py --out runs/phone/fired --fired off slots
    python bench.py --tflite-only --tflite runs/phone/fired/*.tflite --reps 5 --tflite-threads 2 \
        --json OUT.json

Before writing each file, its `infer` is run once in LiteRT beside today's file on the same
image and masks; the largest difference of the probabilities is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import export, mlp
from nca_jax.config import load_config
from nca_jax.model import init_params


def slots_only_mlp(x, w1, b1, scale, shift, w2, eps, *, chunk, fired=None, rate=0.5):  # noqa: ANN001, ANN201
    """mlp.folded_mlp's forward with the fired rows' slots alone (no fallback), in ops that
    LiteRT runs: x (N, F) -> (N, C). Each fired row's slot is its rank among the fired rows
    (a cumulative sum); the rows are scattered into their slots (unfired rows into a spare
    slot past the end), the MLP runs on the slots, and every row gathers its slot's output (an
    unfired row: the spare slot's zeros). A fired row past the slots would also get zeros."""
    del b1, chunk
    if fired is None:
        return mlp.cell_mlp_folded(x, w1, 0.0, scale, shift, w2, eps)
    n = x.shape[0]
    cap = mlp.fired_capacity(n, rate)
    on = fired > 0
    slot = jnp.where(on, jnp.minimum(jnp.cumsum(on.astype(jnp.int32)) - 1, cap), cap)
    rows = jnp.zeros(cap + 1, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32))[:cap]
    xc, _, _, _, _, wf, c = mlp._folded_stats(x, w1, scale, shift, eps)
    out = jax.nn.relu(xc[rows] @ wf + c) @ w2
    return jnp.concatenate([out, jnp.zeros((1, out.shape[1]), out.dtype)])[slot]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/paper.json")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--fired", nargs="+", choices=("off", "cond", "slots"), default=["off", "slots"]
    )
    ap.add_argument("--frozen", action="store_true")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    params = init_params(cfg.model, key=jax.random.key(0))
    orig_init, orig_folded = export.Functions.__init__, mlp.folded_mlp
    for mode in args.fired:

        def init(self, cfg, spec, params, _on=mode != "off"):  # noqa: ANN001
            orig_init(self, cfg, spec, params)
            self.mc = dataclasses.replace(self.mc, mlp_fired=int(_on))
            self.cfg = dataclasses.replace(self.cfg, model=self.mc)

        export.Functions.__init__ = init
        mlp.folded_mlp = slots_only_mlp if mode == "slots" else orig_folded  # this process only
        spec = export.ExportSpec(signatures=("infer",), frozen=args.frozen, size=args.size)
        name = f"{'frozen' if args.frozen else 'trainable'}-infer-fired-{mode}.tflite"
        info = export.export(cfg, params, spec, out / name, source="untrained, init seed 0")
        print(name, info.get("bytes"), sorted(set(info.get("ops", []))), flush=True)
    mlp.folded_mlp = orig_folded
    files = sorted(out.glob(f"{'frozen' if args.frozen else 'trainable'}-infer-fired-*.tflite"))
    if len(files) > 1:
        from ai_edge_litert.interpreter import Interpreter

        # the same image; each file draws the same masks (the same op seeds, in the same order)
        image = np.random.default_rng(0).random((1, args.size, args.size, 1), np.float32)
        probs = {}
        for f in files:
            run = Interpreter(model_path=str(f)).get_signature_runner("infer")
            probs[f.name] = next(iter(run(image=image).values()))
        first, *rest = probs
        for n in rest:
            diff = float(np.abs(probs[n] - probs[first]).max())
            print(f"{n} vs {first}: max abs difference of the probabilities {diff:.2e}")


if __name__ == "__main__":
    main()
