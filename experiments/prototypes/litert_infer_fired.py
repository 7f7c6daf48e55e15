"""Prototype (issue 17, goal 3, session 27): the MLP of an exported `infer` and `train` only
on the cells that fire, as the library's CPU path computes it (`model.mlp_fired`, session 26).

The export turns `mlp_fired` off, for two reasons: the library gathers the fired rows with
`jnp.nonzero` (a WHILE loop and a scatter that LiteRT refuses to prepare) and falls back to
every cell with a `lax.cond` (an IF, whose subgraphs the delegate may not take). Here, for this
process only, `--fired cond` exports the library's function as it is, and `--fired slots` the
fired rows in their slots alone, in ops LiteRT runs (`slots_only_mlp`, with its own backward;
no fallback: a step firing more cells than `mlp.fired_capacity` would lose the rest; a
Binomial count above it has probability below 1e-15, but a library cannot ship that). Time
the files against today's export (`--fired off`), calls interleaved, with bench.py:

    python experiments/prototypes/litert_infer_fired.py --out runs/phone/fired --fired off slots
    python bench.py --tflite-only --tflite runs/phone/fired/*.tflite --reps 5 --tflite-threads 2 \
        --json OUT.json

After writing the files, each one's `infer` runs once in LiteRT on the same image (each file
draws the same masks); the largest difference of the probabilities is printed, and with
`train` the losses of three `train` calls on one image (the same draws: equal to rounding).

Result (session 28, AMD EPYC kind, 1 x 256, 2 threads, calls interleaved): the same
probabilities (difference 0) and the same three `train` losses as today's file, but SLOWER:
trainable `infer` 0.80x, `train` 0.95x, frozen `infer` 0.86x
(results/bench/tflite-infer-fired-{trainable,frozen}.json). The cumulative sum, the gather and
the scatter are not XNNPACK operators: they run on LiteRT's own kernels, between delegated
parts, and cost more than the half of the MLP they save. The export keeps every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import export, mlp
from nca_jax.config import load_config
from nca_jax.model import init_params


def _slots_fwd(x, rows, slot, valid, w1, scale, shift, w2, eps):  # noqa: ANN001, ANN202
    xc, m, cov, rstd, a, wf, c = mlp._folded_stats(x, w1, scale, shift, eps)
    xr = xc[rows]
    r = jax.nn.relu(xr @ wf + c)
    out = r @ w2
    full = jnp.concatenate([out, jnp.zeros((1, out.shape[1]), out.dtype)])[slot]
    return full, (xc, m, w1, scale, w2, cov, rstd, a, c, xr, r, rows, slot, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def slots_mlp(x, rows, slot, valid, w1, scale, shift, w2, eps):  # noqa: ANN001, ANN201
    """The folded MLP's output (N, C) on the rows in their slots: rows (S,) the row in each
    slot, slot (N,) each row's slot (S: none, the spare zero row), valid (S,) 1 where a slot
    holds a row; x (N, F), whose statistics take every row."""
    return _slots_fwd(x, rows, slot, valid, w1, scale, shift, w2, eps)[0]


def _slots_bwd(eps, res, g):  # noqa: ANN001, ANN202
    del eps
    xc, _, w1, _, w2, _, _, a, _, xr, r, rows, slot, valid = res
    gr = g[rows] * valid[:, None]  # an empty slot: no gradient
    dpre = (gr @ mlp.transposed(w2)) * jnp.ceil(jnp.minimum(r, 1.0))
    dxr = dpre @ mlp.transposed(w1 * a)
    dx_rows = jnp.concatenate([dxr, jnp.zeros((1, dxr.shape[1]), dxr.dtype)])[slot]
    dx, dw1, _, dscale, dshift, dw2 = mlp._folded_grads(
        xr.T @ dpre, jnp.sum(dpre, axis=0), dx_rows, r.T @ gr, res[:9]
    )
    return dx, None, None, None, dw1, dscale, dshift, dw2


slots_mlp.defvjp(_slots_fwd, _slots_bwd)


def slots_only_mlp(x, w1, b1, scale, shift, w2, eps, *, chunk, fired=None, rate=0.5):  # noqa: ANN001, ANN201
    """mlp.folded_mlp's function with the fired rows in slots alone (no fallback), in ops that
    LiteRT runs: x (N, F) -> (N, C). Each fired row's slot is its rank among the fired rows
    (a cumulative sum); the rows are scattered into their slots (unfired rows into a spare
    slot past the end), the MLP runs on the slots, and every row gathers its slot's output (an
    unfired row: the spare slot's zeros). A fired row past the slots would also get zeros.
    b1 cancels in the folded norm (its gradient is 0), as in the library."""
    del chunk
    if fired is None:
        return mlp.cell_mlp_folded(x, w1, b1, scale, shift, w2, eps)
    n = x.shape[0]
    cap = mlp.fired_capacity(n, rate)
    if cap >= n:
        return mlp.cell_mlp_folded(x, w1, b1, scale, shift, w2, eps) * fired[:, None]
    on = fired > 0
    rank = jnp.cumsum(on.astype(jnp.int32)) - 1
    slot = jnp.where(on, jnp.minimum(rank, cap), cap)
    rows = jnp.zeros(cap + 1, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32))[:cap]
    valid = (jnp.arange(cap) <= rank[-1]).astype(x.dtype)
    return slots_mlp(x, rows, slot, valid, w1, scale, shift, w2, eps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/paper.json")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--fired", nargs="+", choices=("off", "cond", "slots"), default=["off", "slots"]
    )
    ap.add_argument("--frozen", action="store_true")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--signatures", nargs="+", default=["infer"], help="infer, train (trainable)")
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
        spec = export.ExportSpec(
            signatures=tuple(args.signatures), frozen=args.frozen, size=args.size
        )
        name = f"{'frozen' if args.frozen else 'trainable'}-infer-fired-{mode}.tflite"
        info = export.export(cfg, params, spec, out / name, source="untrained, init seed 0")
        print(name, info.get("bytes"), sorted(set(info.get("ops", []))), flush=True)
    mlp.folded_mlp = orig_folded
    files = sorted(out.glob(f"{'frozen' if args.frozen else 'trainable'}-infer-fired-*.tflite"))
    if len(files) > 1:
        from ai_edge_litert.interpreter import Interpreter

        # the same image; each file draws the same masks (the same op seeds, in the same order)
        image = np.random.default_rng(0).random((1, args.size, args.size, 1), np.float32)
        mask = (image > 0.5).astype(np.float32)
        probs, losses = {}, {}
        for f in files:
            it = Interpreter(model_path=str(f))
            probs[f.name] = next(iter(it.get_signature_runner("infer")(image=image).values()))
            if "train" in args.signatures and not args.frozen:
                train = it.get_signature_runner("train")
                losses[f.name] = [float(train(image=image, mask=mask)["loss"]) for _ in range(3)]
        first, *rest = probs
        for n in rest:
            diff = float(np.abs(probs[n] - probs[first]).max())
            print(f"{n} vs {first}: max abs difference of the probabilities {diff:.2e}")
        for n, loss in losses.items():
            print(f"{n}: losses of three train calls {loss}")


if __name__ == "__main__":
    main()
