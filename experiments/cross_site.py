"""The paper's cross-site experiment on our two sites (Table 1) and the gamma ablation (Table 2).

Train Med-NCA on each site (50 labelled images, checkpoint picked on the site's own validation
images), test on 50 held-out images of each site; for each off-site pair fine-tune with VWSL on
UNLABELLED images of the target site (disjoint from its test images) and test again. Every unit
(train / fine-tune / evaluate) writes its own result and is skipped when present, so the command
can be re-run to resume. Target-site labels are used only to score the final tables.
The figures show real X-rays, whose terms forbid copying them into the repository: they are
written under the work folder (runs/, not committed), never under results/.

Usage:
    python experiments/cross_site.py --protocol configs/cross_site_cpu.json [--work runs/cross_site]
        [--data ../shared/data/cxr] [--splits results/splits] [--results results]
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common import (
    FINETUNE_SPLIT,
    SITES,
    build,
    finetune_from_dict,
    head,
    load_json_protocol,
    load_site,
    sum_unit_times,
    unit,
    use_compile_cache,
    write_figure,
)
from nca_jax import checkpoint as ckpt
from nca_jax.config import FinetuneConfig, RunConfig, atomic_write_text, config_from_dict
from nca_jax.data import Dataset
from nca_jax.errors import ConfigError
from nca_jax.evaluate import evaluate
from nca_jax.finetuning import finetune
from nca_jax.training import train_and_evaluate

PAPER_VWSL_GAIN = "+0.7 to +2.8 Dice points"


@dataclasses.dataclass(frozen=True)
class CrossSiteProtocol:
    """A cross-site protocol (configs/cross_site_*.json); keys starting with "_" are comments."""

    train_config: RunConfig  # the run config every site's model trains with (model / train)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)  # VWSL base
    eval_samples: int = 10  # predictions per test image for every reported Dice
    n_finetune: int = 50  # unlabelled target images fine-tuned on
    seeds: tuple[int, ...] = (0,)  # training / fine-tuning seeds (--seeds overrides)
    results_name: str = "cross_site"  # results/RESULTS_NAME.json, .md
    runs_prefix: str = "xsite"  # committed runs: results/runs/RUNS_PREFIX-*-seed0
    uncertainty_images: int = 8  # quality score on the first N target test images (0: none)
    uncertainty_samples: int = 10  # predictions per image for the quality score
    gamma_source: str = "shenzhen"  # the site whose first seed runs Table 2's gamma sweep
    gammas: tuple[float, ...] = ()  # Table 2's gammas (with finetune.gamma)
    refresh: tuple[int, ...] = ()  # Table 3: VWSL targets recomputed every k epochs

    @classmethod
    def load(cls, path: str | Path) -> CrossSiteProtocol:
        where = str(path)
        proto = build(
            cls,
            load_json_protocol(path),
            where,
            parsers={
                "train_config": lambda d, w: config_from_dict(d, where=w),
                "finetune": finetune_from_dict,
            },
        )
        if proto.gamma_source not in SITES:
            raise ConfigError(f"{where}: gamma_source must be one of {SITES}")
        return proto


def fine_tuner(
    data: str | Path,
    splits: str | Path,
    run: Path,
    ft: Path,
    tgt: str,
    fbase: FinetuneConfig,
    size: int,
    n_ft: int,
    **fields: Any,
) -> Any:
    """The unit that fine-tunes the trained run `run` with VWSL on the first n_ft unlabelled
    images of tgt's fine-tuning split into `ft` (fbase with `fields` replaced)."""

    def do_ft() -> dict[str, Any]:
        c, prm = ckpt.load_run(run)
        fc = dataclasses.replace(fbase, source_run=str(run), **fields)
        imgs = load_site(data, splits, tgt, FINETUNE_SPLIT[tgt], size, masks=False, limit=n_ft)
        resume = (ft / "checkpoints").exists()
        return finetune(
            c, prm, imgs, ft, fc, resume=resume, progress=False, uncertainty_after=False
        )

    return do_ft


def refresh_markdown(
    rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]], gamma: float
) -> str:
    """Table 3: VWSL with targets computed once against targets recomputed every k epochs
    (mean ± std over seeds of the per-seed test Dice; only seeds that have both)."""
    if not ref_rows:
        return ""
    lines = [
        "\n\nTable 3 (VWSL targets computed once vs recomputed every k epochs; gamma "
        f"{gamma:g}; mean ± std over seeds, per-seed means in brackets)\n",
        "| trained on | tested on | targets | Dice | seeds |",
        "|---|---|---|---|---|",
    ]
    for src in SITES:
        tgt = next(s for s in SITES if s != src)
        for k in sorted({r["refresh_every"] for r in ref_rows}):
            got = {
                r["seed"]: r["dice_mean"]
                for r in ref_rows
                if (r["train_site"], r["refresh_every"]) == (src, k)
            }
            once = {
                r["seed"]: r["dice_mean"]
                for r in rows
                if (r["train_site"], r["method"], r["gamma"]) == (src, "vwsl", gamma)
                and r["seed"] in got
            }
            for label, d in (("once", once), (f"every {k} epochs", got)):
                if d:
                    v = [d[s] for s in sorted(d)]
                    each = ", ".join(f"{x:.3f}" for x in v)
                    lines.append(
                        f"| {src} | {tgt} | {label} | {np.mean(v):.3f} ± {np.std(v):.3f} "
                        f"({each}) | {len(v)} |"
                    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", required=True)
    p.add_argument("--work", default="runs/cross_site")
    p.add_argument("--data", default="../shared/data/cxr")
    p.add_argument("--splits", default="results/splits")
    p.add_argument("--results", default="results")
    p.add_argument("--seeds", type=int, nargs="+", help="override the protocol's seeds")
    p.add_argument("--no-sweep", action="store_true", help="skip Table 2's gamma sweep")
    p.add_argument(
        "--compile-cache",
        help="JAX persistent compilation cache (default: WORK/.jax_cache; 'none' turns it off)",
    )
    a = p.parse_args(argv)
    try:
        proto = CrossSiteProtocol.load(a.protocol)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_compile_cache(a.compile_cache, Path(a.work))
    cfg, fbase = proto.train_config, proto.finetune
    size, work, res_dir = cfg.train.image_size, Path(a.work), Path(a.results)
    samples, n_ft = proto.eval_samples, proto.n_finetune
    if a.seeds is not None:  # the tables then name the seeds that ran
        proto = dataclasses.replace(proto, seeds=tuple(a.seeds))
    seeds = proto.seeds
    rname, prefix = proto.results_name, proto.runs_prefix
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def load(site: str, split: str) -> Dataset:
        return load_site(a.data, a.splits, site, split, size)

    test = {s: load(s, f"{s}_test") for s in SITES}

    def run_eval(run: Path, site: str, n: int | None = None, k: int = samples) -> dict[str, Any]:
        c, prm = ckpt.load_run(run)
        d = test[site] if n is None else head(test[site], n)  # uncertainty: the first n
        s = evaluate(c, prm, d, samples=k, seed=0, chunk=max(1, 10 // k))  # ~10 per call
        s.pop("cases")
        return s

    unc_rows: list[dict[str, Any]] = []
    ref_rows: list[dict[str, Any]] = []
    unc_n, unc_k = proto.uncertainty_images, proto.uncertainty_samples

    def uncertainty(run: Path, name: str, src: str, tgt: str, method: str) -> None:
        """Quality score (spread of unc_k samples) on the first unc_n target test images."""
        u = unit(work / f"unc-{name}.json", lambda: run_eval(run, tgt, unc_n, unc_k))
        unc_rows.append(
            {
                "train_site": src,
                "test_site": tgt,
                "method": method,
                "n": u["n"],
                "samples": u["samples"],
                "quality_mean": u["quality_mean"],
                "quality_std": u["quality_std"],
                "dice_mean": u["dice_mean"],
                "wall_s": u["wall_s"],
            }
        )

    def publish(rows: list[dict[str, Any]]) -> None:
        res_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(res_dir / f"{rname}.json", rows)
        if unc_rows:
            ckpt.write_json(res_dir / f"{rname}_uncertainty.json", unc_rows)
        if ref_rows:
            ckpt.write_json(res_dir / f"{rname}_refresh.json", ref_rows)
        tables = tables_markdown(rows, fbase.gamma, proto, time.perf_counter() - t_all, unc_rows)
        tables += refresh_markdown(rows, ref_rows, fbase.gamma)
        atomic_write_text(res_dir / f"{rname}.md", tables + unit_times(work, fbase.gamma))

    for seed in seeds:
        for src in SITES:
            run = work / f"train-{src}-s{seed}"

            def do_train(src: str = src, seed: int = seed, run: Path = run) -> dict[str, Any]:
                c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
                resume = (run / "checkpoints").exists()
                return train_and_evaluate(
                    c,
                    load(src, f"{src}_train"),
                    run,
                    resume=resume,
                    progress=False,
                    val=load(src, f"{src}_val"),
                )

            unit(work / f"train-{src}-s{seed}.json", do_train)
            for tgt in SITES:
                ev = unit(
                    work / f"eval-{src}-s{seed}-on-{tgt}.json",
                    lambda run=run, tgt=tgt: run_eval(run, tgt),
                )
                rows.append(_row(src, tgt, "med-nca", None, seed, ev))
            tgt = next(s for s in SITES if s != src)
            if seed == seeds[0] and unc_n > 0:
                uncertainty(run, f"{src}-s{seed}-on-{tgt}", src, tgt, "med-nca")
            gammas = [fbase.gamma]
            if not a.no_sweep and seed == seeds[0] and src == proto.gamma_source:
                gammas = sorted(set(gammas) | set(proto.gammas))
            for g in gammas:
                ft = work / f"vwsl-{src}-to-{tgt}-s{seed}-g{g:g}"
                do_ft = fine_tuner(
                    a.data, a.splits, run, ft, tgt, fbase, size, n_ft, gamma=g, seed=seed
                )
                unit(work / f"vwsl-{src}-to-{tgt}-s{seed}-g{g:g}.json", do_ft)
                ev = unit(
                    work / f"eval-vwsl-{src}-to-{tgt}-s{seed}-g{g:g}.json",
                    lambda ft=ft, tgt=tgt: run_eval(ft, tgt),
                )
                rows.append(_row(src, tgt, "vwsl", g, seed, ev))
                if seed == seeds[0] and g == fbase.gamma and unc_n > 0:
                    uncertainty(ft, f"vwsl-{src}-to-{tgt}-s{seed}-g{g:g}", src, tgt, "vwsl")
            for k in proto.refresh:  # targets recomputed every k epochs vs once
                name = f"vwsl-{src}-to-{tgt}-s{seed}-g{fbase.gamma:g}-r{k}"
                do_ft = fine_tuner(
                    a.data,
                    a.splits,
                    run,
                    work / name,
                    tgt,
                    fbase,
                    size,
                    n_ft,
                    seed=seed,
                    refresh_every=k,
                )
                unit(work / f"{name}.json", do_ft)
                ev = unit(work / f"eval-{name}.json", lambda n=name, t=tgt: run_eval(work / n, t))
                ref_rows.append(
                    {**_row(src, tgt, "vwsl", fbase.gamma, seed, ev), "refresh_every": k}
                )
            publish(rows)  # partial tables after every unit group, so a cut run still reports
    publish(rows)
    for seed in seeds[:1]:
        for src in SITES:
            dst = res_dir / "runs" / f"{prefix}-{src}-seed{seed}"
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("config.json", "weights.npz", "run.json"):
                shutil.copy(work / f"train-{src}-s{seed}" / f, dst / f)
            tgt = next(s for s in SITES if s != src)
            ft = work / f"vwsl-{src}-to-{tgt}-s{seed}-g{fbase.gamma:g}"
            dst = res_dir / "runs" / f"{prefix}-vwsl-{src}-to-{tgt}-seed{seed}"
            dst.mkdir(parents=True, exist_ok=True)
            for f in ("config.json", "weights.npz", "run.json", "metrics.jsonl"):
                if (ft / f).exists():  # no PNGs: std maps show the patients' anatomy
                    shutil.copy(ft / f, dst / f)
    g0 = fbase.gamma
    for src in SITES:
        tgt = next(s for s in SITES if s != src)
        if (work / "figures" / f"cross_site_{src}_to_{tgt}.png").exists():
            continue  # a resumed run does not redraw (40 predictions of 10 samples)
        write_figure(
            work / f"train-{src}-s{seeds[0]}",
            work / f"vwsl-{src}-to-{tgt}-s{seeds[0]}-g{g0:g}",
            test[tgt],
            work / "figures" / f"cross_site_{src}_to_{tgt}.png",  # real X-rays: never results/
        )
    print((res_dir / f"{rname}.md").read_text())
    return 0


def unit_times(work: Path, gamma: float) -> str:
    """Unit wall times per seed: Table 1 units, the gamma sweep's extra units, and the
    uncertainty units."""

    def group_of(name: str) -> str | None:
        m = re.search(r"-s(\d+)(?:-|\.json)", name)
        if m is None:
            return None
        g = re.search(r"-g([^-]+)\.json$", name)
        part = "uncertainty" if name.startswith("unc-") else "Table 1"
        if g is not None and float(g.group(1)) != gamma:
            part = "gamma sweep"
        if re.search(r"-r\d+\.json$", name):
            part = "target refresh"
        return f"seed {m.group(1)}, {part}"

    return sum_unit_times(work, group_of, "2 cores; other jobs shared the cores for some units")


def _row(
    src: str, tgt: str, method: str, gamma: float | None, seed: int, ev: dict[str, Any]
) -> dict[str, Any]:
    return {
        "train_site": src,
        "test_site": tgt,
        "method": method,
        "gamma": gamma,
        "seed": seed,
        "dice_mean": ev["dice_mean"],
        "dice_std": ev["dice_std"],
        "soft_dice_mean": ev["soft_dice_mean"],
        "hd95_mean": ev["hd95_mean"],
        "quality_mean": ev["quality_mean"],
        "n": ev["n"],
        "eval_wall_s": ev["wall_s"],
    }


def tables_markdown(
    rows: list[dict[str, Any]],
    gamma: float,
    proto: CrossSiteProtocol,
    wall: float,
    unc_rows: list[dict[str, Any]] | None = None,
) -> str:
    def cell(src: str, tgt: str, method: str, g: float | None, seed: int | None = None) -> str:
        sel = [
            r
            for r in rows
            if (r["train_site"], r["test_site"], r["method"]) == (src, tgt, method)
            and (g is None or r["gamma"] == g)
            and (seed is None or r["seed"] == seed)
        ]
        if not sel:
            return "-"
        if len(sel) == 1:  # one seed: the spread shown is over the test images
            r = sel[0]
            return (
                f"{r['dice_mean']:.3f} ± {r['dice_std']:.3f} "
                f"(images; 1 seed; HD95 {r['hd95_mean']:.1f})"
            )
        d = [r["dice_mean"] for r in sel]
        each = ", ".join(f"{x:.3f}" for x in d)
        return f"{np.mean(d):.3f} ± {np.std(d):.3f} (n_seeds={len(d)}: {each})"

    lines = ["| trained on | model | " + " | ".join(SITES) + " |", "|---|---|---|---|"]
    for src in SITES:
        lines.append(
            f"| {src} | Med-NCA | "
            + " | ".join(cell(src, t, "med-nca", None) for t in SITES)
            + " |"
        )
        lines.append(
            f"| {src} | + VWSL (gamma {gamma:g}) | "
            + " | ".join("-" if t == src else cell(src, t, "vwsl", gamma) for t in SITES)
            + " |"
        )
    src = proto.gamma_source
    tgt = next(s for s in SITES if s != src)
    s0 = rows[0]["seed"] if rows else None  # the sweep runs for the first seed only
    gl = [
        "| gamma | Dice on " + tgt + " |",
        "|---|---|",
        f"| no fine-tuning | {cell(src, tgt, 'med-nca', None, s0)} |",
    ]
    for g in sorted({r["gamma"] for r in rows if r["method"] == "vwsl"}):
        gl.append(f"| {g:g} | {cell(src, tgt, 'vwsl', g, s0)} |")
    ul = [
        "| trained on | tested on | model | quality (mean ± std) | Dice |",
        "|---|---|---|---|---|",
    ]
    for u in unc_rows or []:
        ul.append(
            f"| {u['train_site']} | {u['test_site']} | {u['method']} | "
            f"{u['quality_mean']:.4f} ± {u['quality_std']:.4f} | {u['dice_mean']:.3f} |"
        )
    unc_text = (
        f"\n\nUncertainty (first {proto.uncertainty_images} test images of the target "
        f"site, {proto.uncertainty_samples} samples each; quality score, lower = surer)"
        "\n\n" + "\n".join(ul)
        if unc_rows
        else ""
    )
    return (
        "Table 1 (Dice of the thresholded mean of the samples; mean ± std over seeds of the "
        "per-seed mean over test images)\n\n"
        + "\n".join(lines)
        + f"\n\nTable 2 (trained on {src}, seed {proto.seeds[0]})\n\n"
        + "\n".join(gl)
        + unc_text
        + f"\n\nwall time of the last invocation (units found done are skipped): {wall:.0f} s; "
        f"paper: VWSL gains {PAPER_VWSL_GAIN} across sites\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
