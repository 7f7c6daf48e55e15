"""Table 1 of the paper on this project's data: Med-NCA beside the paper's UNet and a UNet of
Med-NCA's size, each trained on one site with the same budget and tested on both sites, with
the phone column measured (LiteRT file size and seconds per infer / train call, and per infer
call of the inference-only file a phone predicts with).

Budget: every model trains on the same training images of its site for the same training time
on this CPU. The time is turned into epochs once, by timing each model's training step in one
process (`--calibrate`, whose JSON is committed): epochs = floor(budget / (seconds per step x
steps per epoch)). The runs are then deterministic and resumable, and a busy machine cannot
shorten one model's training against another's. Validation passes (the weights kept are those
of the best validation Dice) are not counted. `train_minutes` is the budget the run used in the
calibration's CPU minutes (steps x calibrated seconds per step), whatever ran it and whatever
else shared the machine; `measured_train_minutes` is the sum of its own epoch times.

Usage:
    python experiments/table1.py --protocol configs/table1_cpu.json --calibrate OUT.json
    python experiments/table1.py --protocol configs/table1_cpu.json
        [--models NAME ...] [--sites SITE ...] [--seeds S ...] [--work results/table1_units]
    python experiments/table1.py --protocol configs/table1_cpu.json --phone   (nothing else running)
    python experiments/table1.py --protocol configs/table1_cpu.json --publish-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common import (
    SITES,
    Variant,
    device_kind,
    load_commented,
    load_site,
    score_fields,
    unit,
    use_compile_cache,
    variant_config,
    variants_parser,
)
from nca_jax import checkpoint as ckpt
from nca_jax.cli import run_cli
from nca_jax.config import RunConfig, atomic_write_text, with_overrides
from nca_jax.errors import ConfigError

# the rows that come from the VWSL study (results/vwsl.json), not from this script's runs
VWSL_MODEL = "med-nca+vwsl"


@dataclasses.dataclass(frozen=True)
class Table1Protocol:
    """configs/table1_cpu.json. models: name -> run config (a Variant: config file + sections
    laid over it; the epochs come from the budget). calibration: the `--calibrate` JSON."""

    models: dict[str, Variant]
    calibration: str
    budget_minutes: float = 60.0
    sites: tuple[str, ...] = SITES
    seeds: tuple[int, ...] = (0, 1)
    n_train: int = 50  # the first n of SITE_train
    validations: int = 25  # validation passes per run (and as many checkpoints)
    eval_samples: int = 10  # predictions per test image (a UNet's one is deterministic)
    phone_size: int = 256  # the phone column: batch 1 at this size
    phone_reps: int = 3
    # LiteRT threads for the trainable files (null: LiteRT's default, which the first phone
    # units used; a phone app sets its own)
    phone_threads: int | None = None
    # LiteRT threads for the inference-only (frozen) files: this CPU's 2 cores (LiteRT's
    # default thread count predicted 1.6x slower here, results/README.md session 9)
    phone_frozen_threads: int = 2
    vwsl: str = "results/vwsl.json"  # the med-nca+vwsl rows (vwsl-default, label-free)
    comment: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Table1Protocol:
        where = str(path)
        p = load_commented(cls, path, {"models": variants_parser(where, "models", False)})
        bad = set(p.sites) - set(SITES)
        if bad:
            raise ConfigError(f"{where}: unknown site(s) {sorted(bad)} (known: {list(SITES)})")
        if p.budget_minutes <= 0 or p.n_train < 1 or p.validations < 1:
            raise ConfigError(f"{where}: budget_minutes, n_train and validations must be > 0")
        for name in ("phone_threads", "phone_frozen_threads"):  # types: checked on load
            v = getattr(p, name)
            if v is not None and v < 1:
                raise ConfigError(f"{where}: {name} must be a whole number >= 1, got {v!r}")
        for n, v in p.models.items():
            variant_config(v, f"{where} [models.{n}]")  # every model's config is valid
        return p


def base_config(p: Table1Protocol, name: str) -> RunConfig:
    return variant_config(p.models[name], f"models.{name}")


def budget_epochs(step_s: float, per_epoch: int, minutes: float) -> int:
    """Whole epochs of per_epoch steps of step_s seconds that fit in `minutes` (at least 1)."""
    return max(1, math.floor(60.0 * minutes / (step_s * per_epoch)))


def run_config(p: Table1Protocol, name: str, seed: int, calib: dict[str, Any]) -> RunConfig:
    """The model's config for one run: its budget in epochs, the seed, `validations` passes
    (each with a checkpoint)."""
    cfg = base_config(p, name)
    if name not in calib["models"]:
        raise ConfigError(f"{p.calibration}: no step time for model {name!r} (run --calibrate)")
    batch = min(cfg.train.batch_size, p.n_train)
    epochs = budget_epochs(calib["models"][name]["step_s"], p.n_train // batch, p.budget_minutes)
    every = max(1, epochs // p.validations)
    cfg = with_overrides(cfg, epochs=epochs, batch_size=batch, seed=seed)
    train = dataclasses.replace(cfg.train, eval_every=every, checkpoint_every=every)
    return dataclasses.replace(cfg, train=train).validate()


def calibrate(p: Table1Protocol, out: Path, reps: int = 3) -> dict[str, Any]:
    """Seconds per training step of every model at its batch and the protocol's image size, all
    in this process (only ratios within one process count on a shared machine)."""
    import jax
    import jax.numpy as jnp

    from nca_jax.bench import matmul_gflops
    from nca_jax.model import count_params
    from nca_jax.training import init_state, make_train_step

    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "jax": jax.__version__,
        "matmul_gflops": matmul_gflops(),
        "models": {},
    }
    for name in p.models:
        cfg = base_config(p, name)
        b, s = min(cfg.train.batch_size, p.n_train), cfg.train.image_size
        cfg = with_overrides(cfg, batch_size=b)
        state, step = init_state(cfg), make_train_step(cfg)
        rng = np.random.default_rng(0)
        batch = {
            "images": jnp.asarray(rng.uniform(size=(b, s, s)).astype(np.float32)),
            "masks": jnp.asarray((rng.uniform(size=(b, s, s)) > 0.5).astype(np.float32)),
        }
        key = jax.random.key(0)
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            state, info = step(state, batch, key)
            jax.block_until_ready(info["loss"])
            times.append(time.perf_counter() - t)
        res["models"][name] = {
            "batch": b,
            "image_size": s,
            "params": count_params(state.params),
            "compile_s": times[0],
            "step_s": statistics.median(times[1:]),
        }
        print(f"{name}: {res['models'][name]}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out, res)
    return res


class Table:
    """The runs, evaluations and phone timings of one protocol, each a resumable unit in work/."""

    def __init__(self, a: argparse.Namespace, p: Table1Protocol, calib: dict[str, Any]):
        self.a, self.p, self.calib = a, p, calib
        self.work = Path(a.work)
        self.compute = not a.publish_only
        self._data: dict[tuple[str, str], Any] = {}

    def data(self, site: str, part: str):
        if (site, part) not in self._data:
            limit = self.p.n_train if part == "train" else None
            size = base_config(self.p, next(iter(self.p.models))).train.image_size
            self._data[(site, part)] = load_site(
                self.a.data, self.a.splits, site, f"{site}_{part}", size, limit=limit
            )
        return self._data[(site, part)]

    def train(self, name: str, site: str, seed: int) -> dict[str, Any] | None:
        from nca_jax.training import train_and_evaluate

        tag = f"{site}-s{seed}-{name}"
        run = self.work / tag
        cfg = run_config(self.p, name, seed, self.calib)

        def do() -> dict[str, Any]:
            res = train_and_evaluate(
                cfg,
                self.data(site, "train"),
                run,
                val=self.data(site, "val"),
                resume=(run / "checkpoints").exists(),
                progress=False,
            )
            res["step_s_calibrated"] = self.calib["models"][name]["step_s"]
            res["device"] = device_kind()
            return res

        return unit(self.work / f"{tag}.json", do, self.compute)

    def evaluate(self, name: str, site: str, seed: int, test: str) -> dict[str, Any] | None:
        from nca_jax.evaluate import evaluate

        tag = f"{site}-s{seed}-{name}"

        def do() -> dict[str, Any]:
            cfg, params = ckpt.load_run(self.work / tag)
            k = self.p.eval_samples
            s = evaluate(
                cfg, params, self.data(test, "test"), samples=k, seed=0, chunk=max(1, 10 // k)
            )
            s.pop("cases")
            return s

        return unit(self.work / "evals" / f"{tag}-on-{test}.json", do, self.compute)

    def _phone_file(
        self, name: str, file: str, spec_kw: dict[str, Any], threads: int | None
    ) -> dict[str, Any]:
        """Exports model `name` (untrained weights: the timings do not depend on their values)
        at batch 1 and phone_size to phone/FILE, and times it with bench_tflite (LiteRT at
        `threads`, None: its default) beside JAX in the same process."""
        import jax

        from nca_jax.bench import bench_tflite, cpu_model
        from nca_jax.export import ExportSpec, export
        from nca_jax.model import init_params

        cfg = base_config(self.p, name)
        spec = ExportSpec(batch=1, size=self.p.phone_size, **spec_kw)
        path = self.work / "phone" / file
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        params = init_params(cfg.model, key=jax.random.key(0))
        info = export(cfg, params, spec, path, source=f"untrained {name}")
        res: dict[str, Any] = {"export_s": time.perf_counter() - t, "ops": info["ops"]}
        res.update(bench_tflite(str(path), self.p.phone_reps, threads))
        res["cpu_model"] = cpu_model()
        return res

    def phone(self, name: str) -> dict[str, Any] | None:
        """LiteRT on this CPU, batch 1 at phone_size: file size and seconds per infer / train
        (and finetune, for Med-NCA) call, beside JAX doing the same work in the same process."""

        def do() -> dict[str, Any]:
            spec_kw = {
                "train_lr": base_config(self.p, name).train.lr,
                "signatures": ("infer", "train", "finetune"),
            }
            res = self._phone_file(name, f"{name}.tflite", spec_kw, self.p.phone_threads)
            res["threads"] = self.p.phone_threads
            return res

        return unit(self.work / f"phone-{name}.json", do, self.compute)

    def phone_frozen(self, name: str) -> dict[str, Any] | None:
        """The file a phone predicts with: `export_tflite.py --frozen` (weights as constants,
        which LiteRT's XNNPACK delegate takes, `infer` only), batch 1 at phone_size; its size
        and seconds per infer call at phone_frozen_threads, beside JAX in the same process."""

        def do() -> dict[str, Any]:
            threads = self.p.phone_frozen_threads
            spec_kw = {"signatures": ("infer",), "frozen": True}
            res = self._phone_file(name, f"{name}-frozen.tflite", spec_kw, threads)
            res["threads"] = threads
            return res

        return unit(self.work / f"phone-frozen-{name}.json", do, self.compute)


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def collect(t: Table) -> list[dict[str, Any]]:
    """The table1.json rows: one per (model, train site, seed, test site) with all its units."""
    p, rows = t.p, []
    for name in p.models:
        ph = t.phone(name)  # read only: collect runs with compute off
        for site in p.sites:
            for seed in p.seeds:
                tr = t.train(name, site, seed)
                if tr is None:
                    continue
                measured = _train_minutes(t.work / f"{site}-s{seed}-{name}")
                cpu_min = tr["steps"] * t.calib["models"][name]["step_s"] / 60.0
                for test in p.sites:
                    ev = t.evaluate(name, site, seed, test)
                    if ev is None:
                        continue
                    rows.append(
                        {
                            "train_site": site,
                            "test_site": test,
                            "model": name,
                            "params": t.calib["models"][name]["params"],
                            "seed": seed,
                            **score_fields(ev),
                            "train_minutes": cpu_min,
                            "measured_train_minutes": measured,
                            "epochs": tr["epochs_done"],
                            "steps": tr["steps"],
                            "best_val_dice": tr["best_val_dice"],
                            "best_epoch": tr["best_epoch"],  # counted from 0, as the run's
                            "wall_s": tr["wall_s"],
                            "device": tr.get("device", "cpu"),
                            **_phone_fields(ph, "train"),
                        }
                    )
    rows += vwsl_rows(t, rows)
    return rows


def _phone_fields(ph: dict[str, Any] | None, train_call: str) -> dict[str, Any]:
    if ph is None:
        return {"tflite_mb": None, "tflite_infer_s": None, "tflite_train_s": None}
    return {
        "tflite_mb": ph["tflite_bytes"] / 1e6,
        "tflite_infer_s": ph["tflite_infer_s"],
        "tflite_train_s": ph[f"tflite_{train_call}_s"],
    }


def _train_minutes(run: Path) -> float:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(r["epoch_s"] for r in rows) / 60.0


def vwsl_rows(t: Table, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """med-nca+vwsl: the VWSL study's vwsl-default with label-free selection, cross-site only
    (its source models are the study's, not this table's runs); the phone train column is the
    on-device VWSL call (`finetune`)."""
    path = Path(t.p.vwsl)
    if not path.exists():
        return []
    ph = unit(t.work / "phone-med-nca.json", dict, compute=False)
    params = _paper_nca_params()
    out = []
    for r in json.loads(path.read_text()):
        if (r["method"], r["selection"]) != ("vwsl-default", "label-free"):
            continue
        if r["train_site"] not in t.p.sites or r["test_site"] not in t.p.sites:
            continue
        out.append(
            {
                "train_site": r["train_site"],
                "test_site": r["test_site"],
                "model": VWSL_MODEL,
                "params": params,
                "seed": r["seed"],
                "dice_mean": r["dice_mean"],
                "dice_std": r["dice_std"],
                "hd95_mean": r.get("hd95_mean"),
                "n": r["n"],
                "samples": r.get("samples"),
                "train_minutes": None,
                "source": f"{path} (vwsl-default, label-free; the study's source models)",
                **_phone_fields(ph, "finetune"),
            }
        )
    return out


def _paper_nca_params() -> int:
    """Parameters of the paper's Med-NCA (the VWSL study's model)."""
    import jax

    from nca_jax.config import ModelConfig
    from nca_jax.model import count_params, init_params

    return count_params(init_params(ModelConfig(), key=jax.random.key(0)))


REFERENCE_MODEL = "med-nca"


def versus(rows: list[dict[str, Any]], ref: str = REFERENCE_MODEL) -> list[dict[str, Any]]:
    """Med-NCA against each other model of this table's own runs, per (train site, test site):
    the Dice difference (ref minus other) on each seed number that both trained, with twice its
    standard error (sqrt(std_a^2 / n_a + std_b^2 / n_b) from the per-image spreads: unpaired,
    so cautious, as both scored the same images), its mean, the mean HD95 difference
    (negative = ref's boundary is closer), and a reading: 'ahead on every seed' (every
    difference above twice its error), 'behind on every seed', 'within noise' (none outside)
    or 'mixed'. Rows from the VWSL study are left out (their source models are not this
    table's)."""
    own = [r for r in rows if r["model"] != VWSL_MODEL]
    by = {(r["model"], r["train_site"], r["test_site"], r["seed"]): r for r in own}
    pairs = sorted({(r["train_site"], r["test_site"]) for r in own}, key=_site_order)
    others = list(dict.fromkeys(r["model"] for r in own if r["model"] != ref))
    out = []
    for train, test in pairs:
        for other in others:
            seeds = sorted(
                s
                for (m, tr, te, s) in by
                if (m, tr, te) == (ref, train, test) and (other, train, test, s) in by
            )
            if not seeds:
                continue
            mine = [by[(ref, train, test, s)] for s in seeds]
            theirs = [by[(other, train, test, s)] for s in seeds]
            deltas = [a["dice_mean"] - b["dice_mean"] for a, b in zip(mine, theirs, strict=True)]
            hd = [
                a["hd95_mean"] - b["hd95_mean"]
                for a, b in zip(mine, theirs, strict=True)
                if a.get("hd95_mean") is not None and b.get("hd95_mean") is not None
            ]
            err = [
                2.0 * math.sqrt(a["dice_std"] ** 2 / a["n"] + b["dice_std"] ** 2 / b["n"])
                for a, b in zip(mine, theirs, strict=True)
            ]
            signs = {(d > e) - (d < -e) for d, e in zip(deltas, err, strict=True)}
            reading = {
                frozenset({1}): "ahead on every seed",
                frozenset({-1}): "behind on every seed",
                frozenset({0}): "within noise",
            }.get(frozenset(signs), "mixed")
            out.append(
                {
                    "train_site": train,
                    "test_site": test,
                    "model": ref,
                    "against": other,
                    "seeds": seeds,
                    "dice_delta": deltas,
                    "dice_delta_2se": err,
                    "dice_delta_mean": _mean(deltas),
                    "hd95_delta_mean": _mean(hd),
                    "reading": reading,
                }
            )
    return out


def _site_order(pair: tuple[str, str]) -> tuple[int, int, str, str]:
    order = {s: i for i, s in enumerate(SITES)}
    return (order.get(pair[0], len(order)), order.get(pair[1], len(order)), *pair)


def versus_markdown(
    rows: list[dict[str, Any]],
    params: dict[str, int],
    phones: dict[str, dict[str, Any]],
    ref: str = REFERENCE_MODEL,
    frozen: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """The `versus` rows as markdown, then each model's parameters (`params`: model -> count)
    and phone file size and seconds (`phones`: model -> its phone JSON; `frozen`: model -> its
    inference-only file's JSON) as multiples of ref's."""
    vs = versus(rows, ref)
    if not vs:
        return []
    lines = [
        "",
        f"## {ref} against each UNet",
        "",
        f"Dice difference = {ref} minus the other model, on each seed number both trained (the "
        "seeds pair runs by number only), ± twice its standard error from the per-image "
        "spreads (unpaired, so cautious: both scored the same images); a seed counts as ahead "
        "or behind only outside that margin. HD95 difference in pixels likewise (negative: "
        f"{ref}'s boundary is closer).",
        "",
        "| train on | test on | against | seeds | Δ Dice per seed | mean Δ Dice | mean Δ HD95 "
        "| reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in vs:
        hd = "-" if v["hd95_delta_mean"] is None else f"{v['hd95_delta_mean']:+.1f}"
        per = zip(v["dice_delta"], v["dice_delta_2se"], strict=True)
        per_seed = ", ".join(f"{d:+.3f} ± {e:.3f}" for d, e in per)
        lines.append(
            f"| {v['train_site']} | {v['test_site']} | {v['against']} | "
            f"{','.join(map(str, v['seeds']))} | {per_seed} | "
            f"{v['dice_delta_mean']:+.3f} | {hd} | {v['reading']} |"
        )
    if ref in phones:
        lines += [
            "",
            f"Size and phone seconds as multiples of {ref}'s (above 1: {ref} is smaller or "
            "faster):",
            "",
            "| model | params (x) | .tflite MB (x) | infer s (x) | train s (x) "
            "| frozen file MB (x) | frozen infer s (x) |",
            "|---|---|---|---|---|---|---|",
        ]
        fz = frozen or {}

        def fields(m: str, ph: dict[str, Any]) -> dict[str, Any]:
            out = {"params": params[m], **ph}
            if m in fz:
                out["frozen_bytes"] = fz[m]["tflite_bytes"]
                out["frozen_infer_s"] = fz[m]["tflite_infer_s"]
            return out

        mine = fields(ref, phones[ref])
        for m, ph in phones.items():
            if m == ref:
                continue
            theirs = fields(m, ph)
            keys = (
                "params",
                "tflite_bytes",
                "tflite_infer_s",
                "tflite_train_s",
                "frozen_bytes",
                "frozen_infer_s",
            )
            cells = [
                f"{theirs[k] / mine[k]:.2f}" if mine.get(k) and k in theirs else "-" for k in keys
            ]
            lines.append(f"| {m} | {' | '.join(cells)} |")
    return lines


def markdown(
    rows: list[dict[str, Any]],
    p: Table1Protocol,
    calib: dict[str, Any],
    phones: dict[str, dict[str, Any]] | None = None,
    frozen: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The paper's Table 1 layout: per training site, one line per model with the Dice on each
    test site (mean over seeds of the per-seed mean, +- the mean per-image std; the per-seed
    means in brackets), parameters and the phone column (`phones`: model -> its trainable
    file's JSON; `frozen`: model -> its inference-only file's JSON)."""
    sites = list(p.sites)
    lines = [
        "# Table 1 on this project's data",
        "",
        f"Every model trained on the first {p.n_train} training images of its site for "
        f"{p.budget_minutes:g} minutes of training on this CPU (converted to epochs by one "
        f"calibration run, `{p.calibration}`; 'CPU min' = steps x calibrated seconds per "
        "step, whatever ran the steps), weights of the best validation Dice (per seed, with "
        "its epoch: one at the last epoch means the model was still improving when the "
        "budget ran out); tested on "
        f"each site's test images (`n` in table1.json; {p.eval_samples} predictions per image "
        "for Med-NCA, one "
        "for the deterministic UNets). Phone column: LiteRT on this CPU, batch 1, "
        f"{p.phone_size} px (`train` = one optimizer step; for med-nca+vwsl the on-device VWSL "
        "step).",
        "",
        "| train on | model | "
        + " | ".join(f"Dice on {s}" for s in sites)
        + " | params | seeds | trained (CPU min, epochs) | best val Dice (epoch) | .tflite MB "
        "| infer s | train s |",
        "|---|---|" + "---|" * len(sites) + "---|---|---|---|---|---|---|",
    ]
    models = list(p.models) + [VWSL_MODEL]
    for site in sites:
        for m in models:
            mine = [r for r in rows if r["train_site"] == site and r["model"] == m]
            if not mine:
                continue
            cells = []
            for test in sites:
                rs = sorted((r for r in mine if r["test_site"] == test), key=lambda r: r["seed"])
                if not rs:
                    cells.append("-")
                    continue
                per = ", ".join(f"{r['dice_mean']:.3f}" for r in rs)
                cells.append(
                    f"{_mean([r['dice_mean'] for r in rs]):.3f} ± "
                    f"{_mean([r['dice_std'] for r in rs]):.3f} ({per})"
                )
            seeds = sorted({r["seed"] for r in mine})
            mins = [r["train_minutes"] for r in mine if r["train_minutes"] is not None]
            trained = "-"
            if mins:
                eps = sorted({r["epochs"] for r in mine})
                devs = sorted({r["device"] for r in mine})
                on = "" if devs == ["cpu"] else f" (ran on {'/'.join(devs)})"
                trained = f"{_mean(mins):.1f}{on}, {'/'.join(map(str, eps))}"
            per_seed = {r["seed"]: r for r in mine if r.get("best_val_dice") is not None}
            best = ", ".join(
                f"{r['best_val_dice']:.3f} ({r['best_epoch'] + 1} of {r['epochs']})"
                for _, r in sorted(per_seed.items())
            )
            r0 = mine[0]
            fmts = (("tflite_mb", ".1f"), ("tflite_infer_s", ".2f"), ("tflite_train_s", ".2f"))
            phone = ["-" if r0[k] is None else f"{r0[k]:{f}}" for k, f in fmts]
            lines.append(
                f"| {site} | {m} | {' | '.join(cells)} | {r0['params']:,} | "
                f"{','.join(map(str, seeds))} | {trained} | {best or '-'} | {' | '.join(phone)} |"
            )
    if phones:
        lines += [
            "",
            f"The phone column alone (LiteRT on this CPU, batch 1, {p.phone_size} px, "
            + (
                "its default thread count"
                if p.phone_threads is None
                else f"{p.phone_threads} LiteRT threads"
            )
            + "; JAX doing the same work in the same process). The last two columns are "
            "the inference-only file a phone predicts with (`export_tflite.py --frozen`: weights "
            "as constants, which LiteRT's XNNPACK delegate takes; LiteRT threads as given):",
            "",
            "| model | params | .tflite MB | infer s (JAX) | train s (JAX) | VWSL step s (JAX) "
            "| frozen file MB | frozen infer s (JAX) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        fz = frozen or {}
        for name, ph in phones.items():

            def both(sig: str, ph: dict[str, Any] = ph) -> str:
                if f"tflite_{sig}_s" not in ph:
                    return "-"
                return f"{ph[f'tflite_{sig}_s']:.2f} ({ph[f'jax_{sig}_s']:.2f})"

            frozen_cells = "- | -"
            if name in fz:
                f = fz[name]
                frozen_cells = (
                    f"{f['tflite_bytes'] / 1e6:.2f} | {f['tflite_infer_s']:.2f} "
                    f"({f['jax_infer_s']:.2f}), {f['threads']} threads"
                )
            lines.append(
                f"| {name} | {calib['models'][name]['params']:,} | "
                f"{ph['tflite_bytes'] / 1e6:.2f} | {both('infer')} | {both('train')} | "
                f"{both('finetune')} | {frozen_cells} |"
            )
    lines += versus_markdown(
        rows, {n: c["params"] for n, c in calib["models"].items()}, phones or {}, frozen=frozen
    )
    lines += [
        "",
        "Calibration (seconds per training step, same process): "
        + ", ".join(
            f"{n} {c['step_s']:.2f} s at batch {c['batch']}" for n, c in calib["models"].items()
        )
        + f"; float32 matmul {calib['matmul_gflops']:.0f} GFLOP/s.",
        "",
        p.comment,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--calibrate", help="time every model's training step, write this JSON, stop")
    ap.add_argument("--models", nargs="+", help="train / evaluate only these")
    ap.add_argument("--sites", nargs="+", help="train only on these sites")
    ap.add_argument("--seeds", nargs="+", type=int, help="only these seeds")
    ap.add_argument(
        "--phone", action="store_true", help="only export and time the phone files (no training)"
    )
    ap.add_argument("--work", default="results/table1_units")
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--splits", default="results/splits")
    ap.add_argument("--results", default="results")
    ap.add_argument("--publish-only", action="store_true", help="tables from finished units only")
    ap.add_argument("--compile-cache", help="JAX compile cache folder ('none' turns it off)")
    a = ap.parse_args(argv)
    p = Table1Protocol.load(a.protocol)
    if a.calibrate:
        calibrate(p, Path(a.calibrate))
        return 0
    if not Path(p.calibration).is_file():
        raise ConfigError(f"{a.protocol}: calibration {p.calibration} is missing (--calibrate)")
    calib = json.loads(Path(p.calibration).read_text())
    unknown = set(a.models or []) - set(p.models)
    if unknown:
        raise ConfigError(f"{a.protocol}: no model(s) {sorted(unknown)}")
    unknown = set(a.sites or []) - set(p.sites)
    if unknown:
        raise ConfigError(
            f"{a.protocol}: no site(s) {sorted(unknown)}; its sites are {list(p.sites)}"
        )
    if not a.publish_only:
        use_compile_cache(a.compile_cache, Path(a.work))
    full = Table(a, p, calib)
    if not a.publish_only:  # the selected units, in order: train, then test on every site
        sub = dataclasses.replace(
            p,
            models={n: v for n, v in p.models.items() if not a.models or n in a.models},
            sites=tuple(a.sites or p.sites),
            seeds=tuple(a.seeds if a.seeds is not None else p.seeds),
        )
        t = Table(a, sub, calib)
        for name in sub.models:
            if a.phone:  # a separate step: time the phone files on a quiet machine
                t.phone(name)
                t.phone_frozen(name)
                continue
            for site in sub.sites:
                for seed in sub.seeds:
                    if t.train(name, site, seed) is not None:
                        for test in p.sites:
                            t.evaluate(name, site, seed, test)
    full.compute = False
    rows = collect(full)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(res / "table1.json", rows)
    ckpt.write_json(res / "table1_versus.json", versus(rows))
    phones = {n: ph for n in p.models if (ph := full.phone(n)) is not None}
    frozen = {n: ph for n in p.models if (ph := full.phone_frozen(n)) is not None}
    atomic_write_text(res / "table1.md", markdown(rows, p, calib, phones, frozen))
    print((res / "table1.md").read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
