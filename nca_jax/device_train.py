"""Phone stand-in: train, fine-tune and predict with ONLY a .tflite file and the LiteRT interpreter.

Never imports JAX or TensorFlow: it does what an app would do with the file written by
`export_tflite.py` (and its .json sidecar, which holds the model config and the input shape).

  python -m nca_jax.device_train train --model F.tflite --data DIR --epochs N --out RUN
  python -m nca_jax.device_train finetune --model F.tflite --data DIR --epochs N --out RUN
      [--weights W.npz]      (VWSL: sample -> targets -> finetune steps; masks never read)
      [--check-every K] [--check-images N] [--prior-share auto|P]
                             (the label-free safety net of finetune.py, from `sample` alone:
                             the last line is 'adapted: ...' or 'rolled back: ...')
  python -m nca_jax.device_train predict --model F.tflite --data DIR --out DIR2 [--weights W.npz]

RUN gets config.json, weights.npz (from `get_weights`, the names of a JAX run's weights.npz),
metrics.jsonl and run.json, so `evaluate.py --run RUN` and `finetune.py --run RUN` read it.
Each step's time is printed, with the projected wall time of the paper's protocol at that speed
(1500 epochs of 50 images, then 100 VWSL epochs of 50 images with their 10-sample targets).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nca_jax.cli import run_cli
from nca_jax.config import FinetuneConfig, atomic_write_bytes, atomic_write_text, to_json
from nca_jax.data import Dataset, load_folder, load_split
from nca_jax.errors import ConfigError, DeviceError
from nca_jax.guard import (
    PRIOR_BY_DEFAULT,
    choose,
    moment_check,
    resolve_prior_share,
    verdict_line,
)
from nca_jax.paths import check_output_folder
from nca_jax.render import save_image

PAPER_TRAIN_EPOCHS, PAPER_FINETUNE_EPOCHS, PAPER_IMAGES = 1500, 100, 50


class TFLiteModel:
    """A .tflite file written by export_tflite.py, with its sidecar and signature runners."""

    def __init__(self, path: str | Path, threads: int | None = None):
        """threads: the interpreter's CPU threads (None: LiteRT's default)."""
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        side = Path(f"{path}.json")
        if not self.path.is_file():
            raise DeviceError(f"{self.path}: no such model file")
        if not side.is_file():
            raise DeviceError(f"{side}: the export's sidecar is missing (write both files)")
        try:
            self.info = json.loads(side.read_text())
            self.batch, self.size = self.info["spec"]["batch"], self.info["spec"]["size"]
        except (ValueError, KeyError) as e:
            raise DeviceError(f"{side}: not an export sidecar ({e})") from e
        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=threads)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad file
            raise DeviceError(f"{self.path}: not a loadable .tflite file ({e})") from e
        self.signatures = set(self.interpreter.get_signature_list())
        self.frozen = bool(self.info["spec"].get("frozen", False))
        missing = {"get_weights", "set_weights"} - self.signatures
        if missing and not self.frozen:  # an inference-only file has no weights to read
            raise DeviceError(f"{self.path}: lacks the signatures {sorted(missing)}")
        self._runners: dict[str, Any] = {}

    def require(self, signature: str) -> None:
        """A one-line DeviceError unless the file holds `signature`."""
        if signature not in self.signatures and self.frozen:
            raise DeviceError(
                f"{self.path}: an inference-only (frozen) file has no {signature!r} signature "
                "(export without --frozen to train or to load weights on the device)"
            )
        if signature not in self.signatures:
            raise DeviceError(
                f"{self.path}: has no {signature!r} signature (export it with --signatures)"
            )

    def run(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self.require(signature)
        if signature not in self._runners:
            self._runners[signature] = self.interpreter.get_signature_runner(signature)
        return self._runners[signature](**inputs)

    def get_weights(self) -> dict[str, np.ndarray]:
        """{weights.npz name: array}."""
        return {k.replace("__", "/"): v for k, v in self.run("get_weights").items()}

    def set_weights(self, weights: dict[str, np.ndarray], source: str) -> None:
        current = self.get_weights()
        if set(weights) != set(current):
            raise DeviceError(
                f"{source}: weights do not fit the model (missing "
                f"{sorted(set(current) - set(weights))[:3]}, unexpected "
                f"{sorted(set(weights) - set(current))[:3]})"
            )
        for k, v in current.items():
            if weights[k].shape != v.shape:
                raise DeviceError(
                    f"{source}: weights do not fit the model ({k} is {weights[k].shape}, the "
                    f"model needs {v.shape})"
                )
        self.run(
            "set_weights",
            **{k.replace("/", "__"): np.asarray(v, np.float32) for k, v in weights.items()},
        )

    def batches(self, n: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Index batches of the file's batch size; shuffled with rng; the incomplete last one
        is dropped (as in JAX training), unless there are fewer images than one batch."""
        order = rng.permutation(n) if rng is not None else np.arange(n)
        if n < self.batch:
            raise DeviceError(f"{n} images are fewer than the model file's batch {self.batch}")
        return [order[i : i + self.batch] for i in range(0, n - self.batch + 1, self.batch)]


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x[..., None], dtype=np.float32)


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k], np.float32) for k in z.files}
    except FileNotFoundError as e:
        raise DeviceError(f"{path}: no such weights file") from e
    except Exception as e:  # noqa: BLE001
        raise DeviceError(f"{path}: not a readable weights .npz ({e})") from e


def write_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """An .npz of {name: array}, written to a temporary name and renamed."""
    buf = io.BytesIO()
    np.savez(buf, **weights)
    atomic_write_bytes(path, buf.getvalue())


def write_run(out: Path, model: TFLiteModel, record: dict[str, Any]) -> None:
    """config.json (the exported config), weights.npz (get_weights) and run.json."""
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out / "weights.npz", model.get_weights())
    atomic_write_text(out / "config.json", json.dumps(model.info["config"], indent=2) + "\n")
    atomic_write_text(out / "run.json", to_json(record, indent=2) + "\n")


def load_data(a: argparse.Namespace, size: int, masks: bool) -> Dataset:
    if a.split:
        return load_split(a.data, a.split, size=size, require_masks=masks)
    return load_folder(a.data, size=size, require_masks=masks)


def projection(
    model: TFLiteModel, train_s: float | None, ft_s: float | None, sample_s: float | None
) -> dict[str, float]:
    """Projected hours of the paper's protocol at the measured per-call times."""
    steps_per_epoch = PAPER_IMAGES / model.batch
    out = {}
    if train_s is not None:
        out["paper_training_h"] = PAPER_TRAIN_EPOCHS * steps_per_epoch * train_s / 3600
    if ft_s is not None and sample_s is not None:
        out["paper_finetuning_h"] = (
            PAPER_FINETUNE_EPOCHS * steps_per_epoch * ft_s + PAPER_IMAGES / model.batch * sample_s
        ) / 3600
    return out


def _epochs(
    model: TFLiteModel,
    signature: str,
    inputs: dict[str, np.ndarray],
    epochs: int,
    seed: int,
    out: Path,
    log_every: int,
    on_epoch_end: Callable[[int], dict[str, float] | None] | None = None,
) -> tuple[list[float], float]:
    """Runs `signature` over shuffled batches for `epochs` epochs; metrics.jsonl gets one row
    per epoch (with what on_epoch_end(epoch) returns); returns the step times and their
    median after the first."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(inputs.values())))
    times: list[float] = []
    lines = []
    steps = epochs * (n // model.batch)
    bar = tqdm(total=steps, desc=f"device {signature}", unit="step", disable=None)
    for epoch in range(1, epochs + 1):
        losses = []
        for idx in model.batches(n, rng):
            bar.update(1)
            t0 = time.perf_counter()
            r = model.run(signature, **{k: v[idx] for k, v in inputs.items()})
            times.append(time.perf_counter() - t0)
            losses.append(float(r["loss"]))
            if log_every and len(times) % log_every == 0:
                print(
                    f"{signature} step {len(times)}: loss {losses[-1]:.4f}, {times[-1]:.2f} s",
                    flush=True,
                )
            if not np.isfinite(losses[-1]):
                raise DeviceError(f"{signature}: loss became non-finite at epoch {epoch}")
        extra = on_epoch_end(epoch) if on_epoch_end is not None else None
        row = {"epoch": epoch, "loss": float(np.mean(losses)), **(extra or {})}
        lines.append(json.dumps(row))
        atomic_write_text(out / "metrics.jsonl", "\n".join(lines) + "\n")
    bar.close()
    warm = times[1:] if len(times) > 1 else times
    return times, float(np.median(warm))


def _open(
    a: argparse.Namespace, masks: bool, needs: str, marker: str = "run.json"
) -> tuple[TFLiteModel, Dataset, Path]:
    """The model file (with --weights loaded; it must hold the signature `needs`), the data at
    its size, the output folder (checked first: not an input, and only a folder holding
    `marker` that this module wrote is reused; created last, when nothing else failed)."""
    check_output_folder(
        a.out, (a.model, a.data, a.split, a.weights), marker=marker, what="output folder"
    )
    model = TFLiteModel(a.model, a.threads)
    model.require(needs)
    if a.weights:
        model.set_weights(read_weights(a.weights), a.weights)
    data = load_data(a, model.size, masks=masks)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return model, data, out


def _finish(
    a: argparse.Namespace,
    model: TFLiteModel,
    out: Path,
    mode: str,
    images: int,
    steps: int,
    t0: float,
    **extra: Any,
) -> int:
    """Writes the run folder and prints its record (then the verdict line, when there is
    one: the last line)."""
    rec = {
        "mode": mode,
        "model_file": str(a.model),
        "data": str(a.data),
        "images": images,
        "epochs": a.epochs,
        "steps": steps,
        "seed": a.seed,
        **extra,
        "wall_s": time.perf_counter() - t0,
    }
    write_run(out, model, rec)
    print(json.dumps({k: v for k, v in rec.items() if k != "criterion"}))
    if "verdict_line" in rec:
        print(rec["verdict_line"])
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    model, data, out = _open(a, masks=True, needs="train")
    t0 = time.perf_counter()
    inputs = {"image": nhwc(data.images), "mask": nhwc(data.masks)}
    times, step_s = _epochs(model, "train", inputs, a.epochs, a.seed, out, a.log_every)
    return _finish(
        a,
        model,
        out,
        "device_train",
        len(data),
        len(times),
        t0,
        train_step_s=step_s,
        **projection(model, step_s, None, None),
    )


def guard_config(a: argparse.Namespace) -> FinetuneConfig:
    """The safety net's settings from --check-every, --check-images and --prior-share ('auto':
    the sidecar's train_mask_share, which export_tflite.py copies from the source run); read
    before anything is written."""
    side = Path(f"{a.model}.json")

    def recorded() -> Any:
        try:
            return json.loads(side.read_text()).get("train_mask_share")
        except (OSError, ValueError, AttributeError) as e:
            raise DeviceError(f"{side}: not a readable export sidecar ({e})") from e

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr)

    try:
        prior = resolve_prior_share(a.prior_share, recorded, str(side), warn)
    except ConfigError as e:
        raise DeviceError(str(e)) from e
    fc = FinetuneConfig(
        check_every=a.check_every, check_images=a.check_images, prior_share=prior or 0.0
    )
    try:
        fc.validate()
    except ConfigError as e:
        raise DeviceError(str(e)) from e
    return fc


def _sample_moments(model: TFLiteModel, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sample` over images (N, S, S, 1), N a multiple of the batch -> mean, std (N, S, S)."""
    rs = [
        model.run("sample", image=images[i : i + model.batch])
        for i in range(0, len(images), model.batch)
    ]
    return (
        np.concatenate([r["mean"][..., 0] for r in rs]),
        np.concatenate([r["std"][..., 0] for r in rs]),
    )


def cmd_finetune(a: argparse.Namespace) -> int:
    fc = guard_config(a)
    model, data, out = _open(a, masks=False, needs="finetune")  # masks are never read
    t0 = time.perf_counter()
    images = nhwc(data.images)
    targets, weights, sample_times, means, stds = [], [], [], [], []
    for idx in tqdm(model.batches(len(data), None), desc="device targets", disable=None):
        ts = time.perf_counter()
        r = model.run("sample", image=images[idx])
        sample_times.append(time.perf_counter() - ts)
        targets.append((r["mean"] > 0.5).astype(np.float32))
        weights.append(np.clip(1.0 - 2.0 * r["std"], 0.0, 1.0).astype(np.float32))
        means.append(r["mean"][..., 0])
        stds.append(r["std"][..., 0])
    used = np.concatenate(model.batches(len(data), None))
    inputs = {
        "image": images[used],
        "target": np.concatenate(targets),
        "weight": np.concatenate(weights),
    }
    uncertainty_before = float(np.mean(1.0 - inputs["weight"]) / 2)
    # the safety net, from `sample` alone: whole batches of the first check_images images; the
    # source's check reuses the targets' samples of them
    n_check = max(model.batch, fc.check_images // model.batch * model.batch)
    n_check = min(n_check, len(used))
    source_weights = model.get_weights()
    source_check = moment_check(np.concatenate(means)[:n_check], np.concatenate(stds)[:n_check])
    checks: list[dict[str, Any]] = []

    def check_at(epoch: int) -> dict[str, float] | None:
        if fc.check_every <= 0 or (epoch % fc.check_every and epoch != a.epochs):
            return None
        (out / "snapshots").mkdir(exist_ok=True)
        write_weights(out / "snapshots" / f"epoch{epoch:04d}.npz", model.get_weights())
        c = moment_check(*_sample_moments(model, images[:n_check]))
        checks.append({"epoch": epoch, **c})
        return {f"check_{k}": v for k, v in c.items()}

    times, step_s = _epochs(
        model, "finetune", inputs, a.epochs, a.seed, out, a.log_every, on_epoch_end=check_at
    )
    net: dict[str, Any] = {}
    if fc.check_every > 0:
        decision = choose(checks, source_check, fc)
        kept = (
            source_weights
            if decision["epoch"] is None
            else read_weights(out / "snapshots" / f"epoch{decision['epoch']:04d}.npz")
        )
        model.set_weights(kept, "the safety net's choice")
        net = {
            "verdict": decision["verdict"],
            "selected_epoch": decision["epoch"],
            "criterion": decision["criterion"],
            "verdict_line": verdict_line(decision),
        }
    sample_s = float(np.median(sample_times))
    return _finish(
        a,
        model,
        out,
        "device_finetune",
        len(used),
        len(times),
        t0,
        sample_s=sample_s,
        finetune_step_s=step_s,
        mean_std_before=uncertainty_before,
        **projection(model, None, step_s, sample_s),
        **net,
    )


def cmd_predict(a: argparse.Namespace) -> int:
    model, data, out = _open(a, masks=False, needs="sample", marker="predict.json")
    images = nhwc(data.images)
    n = len(data)
    pad = (-n) % model.batch  # fill the last batch with copies; their outputs are dropped
    padded = np.concatenate([images, images[:pad]]) if pad else images
    times = []
    for start in tqdm(range(0, len(padded), model.batch), desc="device predict", disable=None):
        t0 = time.perf_counter()
        r = model.run("sample", image=padded[start : start + model.batch])
        times.append(time.perf_counter() - t0)
        for j in range(model.batch):
            i = start + j
            if i >= n:
                break
            _png(out / "pred" / f"{data.names[i]}.png", (r["mean"][j, ..., 0] > 0.5) * 255)
            _png(out / "std" / f"{data.names[i]}.png", np.clip(r["std"][j, ..., 0] * 510, 0, 255))
    record = {"images": n, "sample_s": float(np.median(times)), "out": str(out)}
    atomic_write_text(out / "predict.json", json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, arr.astype(np.uint8))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("train", "supervised training from images/ + masks/"),
        ("finetune", "VWSL fine-tuning from images/ (masks never read)"),
        ("predict", "10-sample predictions: pred/ masks and std/ maps as PNG"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--model", required=True, help=".tflite file from export_tflite.py")
        s.add_argument("--data", required=True, help="folder with images/ (and masks/)")
        s.add_argument("--split", help="text file of case names to use (default: all)")
        s.add_argument("--out", required=True)
        s.add_argument("--weights", help="weights .npz to load first (set_weights)")
        s.add_argument(
            "--threads", type=int, help="LiteRT CPU threads (default: the runtime's choice)"
        )
        if name != "predict":
            s.add_argument("--epochs", type=int, default=1)
            s.add_argument("--seed", type=int, default=0, help="shuffling seed")
            s.add_argument("--log-every", type=int, default=10, help="print every K steps")
        if name == "finetune":
            s.add_argument(
                "--check-every",
                type=int,
                default=FinetuneConfig.check_every,
                help="epochs between label-free checks, and one after the last epoch (0 = no "
                "checks, no rollback; default %(default)s, as finetune.py)",
            )
            s.add_argument(
                "--check-images",
                type=int,
                default=FinetuneConfig.check_images,
                help="the first N images are checked (whole batches; default %(default)s)",
            )
            s.add_argument(
                "--prior-share",
                help="anatomical prior: 'auto' (the sidecar's train_mask_share), a number or "
                "'none' (default: "
                + ("'auto', or none with a warning)" if PRIOR_BY_DEFAULT else "none)"),
            )
    a = p.parse_args(argv)
    if getattr(a, "epochs", 1) < 1:
        p.error("--epochs must be >= 1")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    return {"train": cmd_train, "finetune": cmd_finetune, "predict": cmd_predict}[a.command](a)


def cli() -> None:
    run_cli(main)


if __name__ == "__main__":
    cli()
