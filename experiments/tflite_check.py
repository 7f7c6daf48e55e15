"""TFLite export of a real run, checked at full size: exactness, agreement, speed.

Exports RUN with the fixed-randomness signatures (1 x 256 x 256), then measures
  - infer_fixed against the JAX prediction with the same fire masks (max abs difference);
  - train_fixed against one JAX step with the same masks and patch (loss, Adam moments);
  - Dice between the thresholded mean of the device's `sample` and of JAX's 10 samples, and
    between two JAX 10-sample means with other keys (the sampling noise), on N images;
  - per-call seconds of every signature against the jitted JAX function (bench_tflite);
and writes OUT (JSON). Usage:
    python experiments/tflite_check.py --run results/runs/shenzhen-seed0 \
        --data ../shared/data/cxr/shenzhen --split results/splits/shenzhen_test.txt \
        --n 5 --out results/tflite.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nca_jax import checkpoint as ckpt
from nca_jax import export as ex
from nca_jax.bench import bench_tflite
from nca_jax.data import load_split
from nca_jax.predict import make_predict, predict_dataset


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(a.sum() + b.sum(), 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--plain", help="an already exported plain file of RUN to time (else export)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from ai_edge_litert.interpreter import Interpreter

    cfg, params = ckpt.load_run(a.run)
    size = cfg.train.image_size  # the run's own size (256 for the paper's model)
    spec = ex.ExportSpec(size=size, fixed_randomness=True)
    data = load_split(a.data, a.split, size=spec.size, require_masks=False)
    res: dict = {"run": a.run, "spec": spec.__dict__}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.tflite"
        t0 = time.perf_counter()
        info = ex.export(cfg, params, spec, path, source=a.run)
        res["export_s"] = time.perf_counter() - t0
        res["bytes_with_fixed_signatures"] = info["bytes"]
        res["ops"], res["flex_ops"] = info["ops"], info["flex_ops"]
        fns = ex.Functions(cfg, spec, params)
        it = Interpreter(model_path=str(path))
        rng = np.random.default_rng(0)
        img = np.ascontiguousarray(data.images[:1, ..., None], np.float32)
        m1, m2 = [(rng.uniform(size=s) < 0.5).astype(np.float32) for s in fns.mask_shapes(False)]
        got = it.get_signature_runner("infer_fixed")(image=img, masks1=m1, masks2=m2)
        want = np.asarray(jax.jit(fns.infer)(fns.params0, img, m1, m2))
        res["infer_fixed_max_abs_diff"] = float(np.abs(got["probabilities"] - want).max())
        m1, m2 = [(rng.uniform(size=s) < 0.5).astype(np.float32) for s in fns.mask_shapes(True)]
        # a surrogate label (the model's own thresholded prediction): no test label is read
        msk = (want > 0.5).astype(np.float32)
        yx = np.array([[96, 64]], np.int32)
        got = it.get_signature_runner("train_fixed")(
            image=img, mask=msk, masks1=m1, masks2=m2, patch_yx=yx
        )
        _, o, _, loss = jax.jit(fns.train)(
            fns.params0, fns.train_opt0, jnp.int32(0), img, msk, m1, m2, yx
        )
        opt = it.get_signature_runner("get_optimizer_state")()
        res["train_fixed_loss"] = [float(got["loss"]), float(loss)]
        res["train_fixed_adam_max_abs_diff"] = max(
            float(np.abs(opt[f"train_opt_{i}"] - np.asarray(x)).max()) for i, x in enumerate(o)
        )
        sample = Interpreter(model_path=str(path)).get_signature_runner("sample")
        predict10 = make_predict(cfg.model, 10)  # the library's 10-sample prediction

        def f(x: np.ndarray, key: jax.Array) -> np.ndarray:
            return predict_dataset(predict10, params, x, key, chunk=1).mean(0)

        rows = []
        for i in range(min(a.n, len(data))):
            x = data.images[i : i + 1]
            dev = sample(image=np.ascontiguousarray(x[..., None]))["mean"][0, ..., 0] > 0.5
            j0 = f(x, jax.random.key(0))[0] > 0.5
            j1 = f(x, jax.random.key(1))[0] > 0.5
            rows.append(
                {"case": data.names[i], "device_vs_jax": dice(dev, j0), "jax_vs_jax": dice(j1, j0)}
            )
        res["sample_agreement"] = rows
        res["sample_dice_device_vs_jax_mean"] = float(np.mean([r["device_vs_jax"] for r in rows]))
        res["sample_dice_jax_vs_jax_mean"] = float(np.mean([r["jax_vs_jax"] for r in rows]))
    if a.plain:
        plain = Path(a.plain)
    else:
        plain = Path(tempfile.mkdtemp()) / "plain.tflite"
        ex.export(cfg, params, ex.ExportSpec(size=size), plain, source=a.run)
    res["bytes"] = plain.stat().st_size
    sizes = {}
    for sigs in (("infer",), ("infer", "sample"), ("infer", "sample", "train")):
        f = Path(tempfile.mkdtemp()) / "part.tflite"
        sizes["+".join(sigs)] = ex.export(
            cfg, params, ex.ExportSpec(size=size, signatures=sigs), f
        )["bytes"]
    sizes["all"] = res["bytes"]
    res["bytes_per_signature_set"] = sizes
    res["timing"] = bench_tflite(str(plain), a.reps)
    ckpt.write_json(a.out, res)
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
