"""Time to quality: validation Dice on Shenzhen against training time, per training variant.

Each variant of the protocol (the paper's settings, then options that keep the model the same:
batch size, warm-up + cosine learning rate, a curriculum of fewer NCA steps early) trains on the
50 Shenzhen training images and is validated on the 50 Shenzhen validation images every few
epochs, until it reaches the protocol's stop Dice or its epoch cap. The curve is kept in optimizer
steps, so a run on any device also gives the time on this CPU: steps x the CPU seconds per step
of its batch size and NCA step count, measured by bench.py (`--cpu-bench`, one JSON per step
count). Train times count training only; the wall time adds the validation passes (about 40 s per
pass of 50 images on 2 cores).

Usage:
    python experiments/time_to_dice.py --protocol configs/time_to_dice.json
        [--variants NAME ...] [--work runs/time_to_dice] [--deadline-min M]
    python experiments/time_to_dice.py --protocol ... --publish-only
        --cpu-bench results/bench/cpu-2core-after.json results/bench/cpu-2core-steps25.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.common import (
    Variant,
    load_commented,
    use_compile_cache,
    variant_config,
    variants_parser,
)
from nca_jax import checkpoint as ckpt
from nca_jax.config import RunConfig, atomic_write_text
from nca_jax.data import load_split
from nca_jax.errors import ConfigError
from nca_jax.render import save_figure
from nca_jax.training import train_and_evaluate


@dataclasses.dataclass(frozen=True)
class TimeToDiceProtocol:
    """A time-to-Dice protocol (configs/time_to_dice.json); keys starting with "_" are comments,
    and `_comment` is written under the table."""

    variants: dict[str, Variant]  # name -> variant, run in this order
    stop_at: float | None = None  # stop a variant once its validation Dice reaches this
    targets: tuple[float, ...] = (0.85, 0.9)  # the table's "first val Dice >= t" columns
    comment: str = ""  # the protocol's `_comment` (a key `comment` is refused)

    @classmethod
    def load(cls, path: str | Path) -> TimeToDiceProtocol:
        return load_commented(cls, path, {"variants": variants_parser(str(path), "variants")})


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


StepKey = tuple[int, int, bool]  # (batch, NCA steps per level, level 1's loss on)


def cpu_step_table(paths: list[str]) -> dict[StepKey, float]:
    """(batch, NCA steps per level, level-1 loss on) -> CPU seconds per training step, from
    bench.py JSONs (`--level1-loss W` times the step with level 1's loss; older JSONs without
    the field timed it without)."""
    table: dict[StepKey, float] = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        deep = float(d.get("level1_loss_weight", 0.0)) > 0
        for b, r in d["per_batch"].items():
            table[(int(b), int(d["steps"]), deep)] = float(r["train_step_s"])
    return table


def bench_cpus(paths: list[str]) -> list[str]:
    """The CPU models the bench JSONs name (machine.cpu_model, since session 24; '' before)."""
    names = {json.loads(Path(p).read_text()).get("machine", {}).get("cpu_model", "") for p in paths}
    return sorted(n or "a CPU the JSON does not name" for n in names)


def curve(cfg: RunConfig, rows: list[dict[str, Any]], cpu: dict[StepKey, float]):
    """Per validated epoch: step, val Dice, measured train seconds (cumulative, this device), the
    measured wall seconds with the validation passes, and the projected CPU train seconds (None
    where the bench lacks the batch / step count)."""
    tc, out = cfg.train, []
    t_dev = t_cpu = t_eval = 0.0
    missing = False
    prev_step = 0
    for r in rows:
        steps_here = r["step"] - prev_step
        prev_step = r["step"]
        nca = tc.curriculum_steps if r["epoch"] < tc.curriculum_epochs else cfg.model.steps
        per = cpu.get((tc.batch_size, nca, tc.level1_loss_weight > 0))
        missing |= per is None
        t_dev += r["epoch_s"]
        t_eval += r.get("eval_s", 0.0)
        t_cpu += 0.0 if per is None else steps_here * per
        if "val_dice" in r:
            out.append(
                {
                    "epoch": r["epoch"],
                    "step": r["step"],
                    "val_dice": r["val_dice"],
                    "train_s": t_dev,
                    "wall_s": t_dev + t_eval,
                    "cpu_train_s": None if missing else t_cpu,
                }
            )
    return out


def first_reach(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((p for p in points if p["val_dice"] >= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", required=True)
    p.add_argument("--variants", nargs="+", help="run only these (default: all, in order)")
    p.add_argument("--work", default="runs/time_to_dice")
    p.add_argument("--data", default="../shared/data/cxr")
    p.add_argument("--splits", default="results/splits")
    p.add_argument("--results", default="results")
    p.add_argument("--cpu-bench", nargs="*", default=[], help="bench.py JSONs of this CPU")
    p.add_argument("--deadline-min", type=float, help="start no variant after this many minutes")
    p.add_argument("--publish-only", action="store_true", help="tables from finished runs only")
    p.add_argument("--compile-cache", help="as in cross_site.py ('none' turns it off)")
    a = p.parse_args(argv)
    try:
        proto = TimeToDiceProtocol.load(a.protocol)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work, t0 = Path(a.work), time.perf_counter()
    names = a.variants or list(proto.variants)
    unknown = set(names) - set(proto.variants)
    if unknown:
        raise SystemExit(f"{a.protocol}: no variant(s) {sorted(unknown)}")
    cfgs = {n: variant_config(proto.variants[n], f"{a.protocol} [{n}]") for n in names}
    if not a.publish_only:
        use_compile_cache(a.compile_cache, work)
        site = Path(a.data) / "shenzhen"
        size = next(iter(cfgs.values())).train.image_size
        train = load_split(site, Path(a.splits) / "shenzhen_train.txt", size=size)
        val = load_split(site, Path(a.splits) / "shenzhen_val.txt", size=size)
        for n in names:
            if a.deadline_min is not None and time.perf_counter() - t0 > 60 * a.deadline_min:
                print(f"deadline: {n} not started", flush=True)
                continue
            run = work / n
            if (run / "run.json").exists():  # finished, or stopped at the stop Dice
                continue
            print(f"variant {n}", flush=True)
            summary = train_and_evaluate(
                cfgs[n],
                train,
                run,
                val=val,
                resume=(run / "config.json").exists(),
                progress=False,
                stop_at_val_dice=proto.stop_at,
            )
            ckpt.write_json(run / "run.json", summary)
    publish(a, proto, names, cfgs, work)
    return 0


def publish(
    a: argparse.Namespace,
    proto: TimeToDiceProtocol,
    names: list[str],
    cfgs: dict[str, RunConfig],
    work: Path,
) -> None:
    cpu = cpu_step_table(a.cpu_bench)
    targets = proto.targets
    rows = []
    for n in names:
        points = curve(cfgs[n], read_metrics(work / n), cpu)
        if not points:
            continue
        tc = cfgs[n].train
        row = {
            "variant": n,
            "about": proto.variants[n].about,
            "batch_size": tc.batch_size,
            "lr": tc.lr,
            "schedule": tc.schedule,
            "warmup_steps": tc.warmup_steps,
            "decay_steps": tc.decay_steps,
            "curriculum": [tc.curriculum_epochs, tc.curriculum_steps],
            "level1_loss_weight": tc.level1_loss_weight,
            "seed": tc.seed,
            "best_val_dice": max(q["val_dice"] for q in points),
            "steps_run": points[-1]["step"],
            "curve": points,
        }
        for t in targets:
            hit = first_reach(points, t)
            row[f"reach_{t:g}"] = hit
        rows.append(row)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(res / "time_to_dice.json", rows)
    atomic_write_text(
        res / "time_to_dice.md", markdown(rows, targets, proto, bench_cpus(a.cpu_bench))
    )
    if rows:
        figure(rows, res / "figures" / "time_to_dice.png", targets)
    print((res / "time_to_dice.md").read_text())


def _fmt_reach(hit: dict[str, Any] | None) -> str:
    if hit is None:
        return "not reached"
    cpu = "" if hit["cpu_train_s"] is None else f"{hit['cpu_train_s'] / 60:.0f} min CPU, "
    return (
        f"{cpu}step {hit['step']} ({hit['train_s'] / 60:.1f} min measured, "
        f"{hit['wall_s'] / 60:.1f} with validation)"
    )


def markdown(
    rows: list[dict[str, Any]],
    targets: Sequence[float],
    proto: TimeToDiceProtocol,
    cpus: Sequence[str] = (),
) -> str:
    head = " | ".join(f"first val Dice >= {t:g}" for t in targets)
    lines = [
        "Time to validation Dice on Shenzhen (50 training, 50 validation images): the projected "
        "training time on the benchmarked CPU where bench JSONs were given, the measured training "
        "time on the device that ran it, and the measured wall time with the validation passes",
        "",
        *([f"Projected for: {', '.join(cpus)} (the bench JSONs' CPU).", ""] if cpus else []),
        f"| variant | batch | lr schedule | best val Dice (steps run) | {head} |",
        "|---|---|---|---|" + "---|" * len(targets),
    ]
    for r in rows:
        sched = f"{r['lr']:g} {r['schedule']}"
        if r["warmup_steps"]:
            sched += f", warm-up {r['warmup_steps']}"
        if r["decay_steps"]:
            sched += f", decay over {r['decay_steps']}"
        if r["curriculum"][0]:
            sched += f"; {r['curriculum'][1]} NCA steps for {r['curriculum'][0]} epochs"
        if r.get("level1_loss_weight"):
            sched += f"; level 1's loss x {r['level1_loss_weight']:g}"
        reach = " | ".join(_fmt_reach(r[f"reach_{t:g}"]) for t in targets)
        lines.append(
            f"| {r['variant']} | {r['batch_size']} | {sched} | {r['best_val_dice']:.3f} "
            f"({r['steps_run']}) | {reach} |"
        )
    lines += ["", proto.comment, ""]
    return "\n".join(lines)


def figure(rows: list[dict[str, Any]], png: Path, targets: Sequence[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    cpu = all(q["cpu_train_s"] is not None for r in rows for q in r["curve"])
    key = "cpu_train_s" if cpu else "train_s"
    for r in rows:
        xs = [q[key] / 60 for q in r["curve"]]
        ax.plot(xs, [q["val_dice"] for q in r["curve"]], label=r["variant"])
    for t in targets:
        ax.axhline(t, color="grey", lw=0.6, ls="--")
    ax.set_xlabel(
        "training time on this CPU (min, 2 cores; projected from steps)"
        if cpu
        else "training time on the device that ran it (min, measured)"
    )
    ax.set_ylabel("validation Dice (Shenzhen, 50 images)")
    ax.set_ylim(0.3, 0.95)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
