"""`python export_tflite.py`: a trained run -> one .tflite file with on-device signatures."""

from __future__ import annotations

import argparse
import json
import time

from nca_jax import checkpoint as ckpt
from nca_jax.cli import run_cli
from nca_jax.config import load_config
from nca_jax.export import SIGNATURES, ExportSpec, export
from nca_jax.paths import check_output_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Export Med-NCA inference, training and VWSL fine-tuning to TFLite "
        "(builtin ops only; weights and Adam states are variables in the file)."
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="trained run folder (config.json + weights.npz)")
    src.add_argument(
        "--config", help="export an UNTRAINED model of this config (to train on the device)"
    )
    p.add_argument("--weights", help="weights .npz to put in the file instead of the run's")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the untrained weights")
    p.add_argument("--out", required=True, help="the .tflite file (a .json sidecar is written)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1.6e-3, help="supervised Adam learning rate")
    p.add_argument("--finetune-lr", type=float, default=3e-6, help="VWSL Adam learning rate")
    p.add_argument("--gamma", type=float, default=1e2, help="VWSL consistency weight")
    p.add_argument("--samples", type=int, default=10, help="predictions behind `sample`")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the on-device draws (each loaded file replays the same stream); "
        "0 = seeded by the runtime",
    )
    p.add_argument(
        "--signatures",
        nargs="+",
        default=list(SIGNATURES),
        help="signatures to export (default: all; get/set_weights always)",
    )
    p.add_argument(
        "--frozen",
        action="store_true",
        help="inference only: the weights as constants, infer and sample only; runtimes "
        "delegate it (XNNPACK), so it predicts faster than the trainable file",
    )
    p.add_argument(
        "--perceive",
        choices=["auto", "conv", "im2col"],
        default="auto",
        help="how Med-NCA's perception convolutions are written (same values): auto = one "
        "matmul (im2col) in a trainable file, which LiteRT's XNNPACK delegate runs with "
        "variable weights, and convolutions in a frozen file",
    )
    p.add_argument(
        "--fixed-randomness",
        action="store_true",
        help="also export infer_fixed/train_fixed/finetune_fixed (masks as inputs; tests)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    check_output_file(a.out, (a.run, a.weights, a.config))  # before the slow conversion
    spec = ExportSpec(
        batch=a.batch,
        size=a.size,
        train_lr=a.lr,
        finetune_lr=a.finetune_lr,
        gamma=a.gamma,
        samples=a.samples,
        fixed_randomness=a.fixed_randomness,
        seed=a.seed,
        signatures=tuple(a.signatures),
        frozen=a.frozen,
        perceive=a.perceive,
    )
    if a.run:
        cfg, params = ckpt.load_run(a.run, a.weights)
        source = a.run
        share = ckpt.run_summary(a.run).get("train_mask_share")
    else:
        import jax

        from nca_jax.model import init_params

        cfg = load_config(a.config)
        params = init_params(cfg.model, key=jax.random.key(a.init_seed))
        if a.weights:
            params = ckpt.load_weights(a.weights, cfg)
        source = f"untrained ({a.config}, init seed {a.init_seed})"
        share = None
    spec.validate(cfg)  # before the slow conversion
    t0 = time.perf_counter()
    info = export(cfg, params, spec, a.out, source=source, progress=None, train_mask_share=share)
    print(
        json.dumps(
            {
                "out": a.out,
                "bytes": info["bytes"],
                "signatures": info["signatures"],
                "ops": info["ops"],
                "flex_ops": info["flex_ops"],
                "export_s": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
