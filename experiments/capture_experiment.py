"""Phone captures: a model trained on one site's clean images, tested on simulated phone photos
of the other site, before and after VWSL on captured UNLABELLED images (disjoint from the test
images), with 16 and with as few as 5 fine-tuning images (the paper used 5 photos).

Units (capture a folder / fine-tune / evaluate) each write a JSON result and are skipped when it
exists, so the command resumes. Captured folders and the figure hold real X-rays, whose terms
forbid copying them into the repository: they stay under the work folder (runs/, not committed).
Target-site labels are used only to score.

Usage:
    python experiments/capture_experiment.py --protocol configs/capture_cpu.json
        [--work runs/capture] [--data ../shared/data/cxr] [--splits results/splits]
        [--results results]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
    rechoose,
    sum_unit_times,
    train_share,
    unit,
    write_figure,
)
from nca_jax import checkpoint as ckpt
from nca_jax.capture import PRESETS, capture_folder
from nca_jax.config import FinetuneConfig, atomic_write_text
from nca_jax.errors import ConfigError
from nca_jax.evaluate import evaluate
from nca_jax.finetuning import finetune
from nca_jax.guard import PRIOR_BY_DEFAULT

PAPER_CAPTURE_GAIN = "+5 to +20 Dice points (5 phone photos)"


@dataclasses.dataclass(frozen=True)
class CaptureProtocol:
    """A phone-capture protocol (configs/capture_*.json); keys starting with "_" are comments."""

    source_run: str  # the run trained on train_site's clean images
    train_site: str
    test_site: str  # its test images are captured, its fine-tuning split too (unlabelled)
    presets: tuple[str, ...]  # capture presets (nca_jax.capture.PRESETS); "none" is added
    n_finetune: tuple[int, ...]  # numbers of captured unlabelled images fine-tuned on
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)  # VWSL base
    eval_samples: int = 1  # predictions per test image for every reported Dice
    uncertainty_images: int = 8  # quality score on the first N captured test images
    uncertainty_samples: int = 10  # predictions per image for the quality score
    capture_seed: int = 0  # seed of the simulated captures
    seeds: tuple[int, ...] = (0,)  # VWSL seeds (--seeds overrides)
    source_weights: str = ""  # a weights file in source_run ("": its weights.npz)
    # the rows' method name; "vwsl-default" requires the finetune section to be finetune.py's
    # defaults (then the runs' weights.npz is the safety net's label-free choice)
    method: str = "vwsl"
    results_name: str = "capture"  # results/NAME.json, NAME_uncertainty.json, NAME.md
    # the safety net's anatomical prior (prior_share = the train site's training-mask share);
    # None = as finetune.py does when not told (nca_jax.guard.PRIOR_BY_DEFAULT). Finished runs
    # are re-decided from their recorded checks, the weights it then chooses scored anew
    prior: bool | None = None

    def uses_prior(self) -> bool:
        return PRIOR_BY_DEFAULT if self.prior is None else self.prior

    @classmethod
    def load(cls, path: str | Path) -> CaptureProtocol:
        where = str(path)
        proto = build(
            cls, load_json_protocol(path), where, parsers={"finetune": finetune_from_dict}
        )
        if proto.train_site not in SITES or proto.test_site not in SITES:
            raise ConfigError(f"{where}: train_site and test_site must be among {SITES}")
        unknown = sorted(set(proto.presets) - set(PRESETS))
        if unknown:
            raise ConfigError(f"{where}: unknown preset(s) {unknown}; one of {sorted(PRESETS)}")
        if not proto.n_finetune or not proto.seeds:
            raise ConfigError(f"{where}: n_finetune and seeds must not be empty")
        if proto.method == "vwsl-default" and proto.finetune != FinetuneConfig():
            raise ConfigError(
                f"{where}: method vwsl-default needs finetune.py's defaults (an empty finetune "
                "section)"
            )
        return proto


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocol", required=True)
    p.add_argument("--work", default="runs/capture")
    p.add_argument("--data", default="../shared/data/cxr")
    p.add_argument("--splits", default="results/splits")
    p.add_argument("--results", default="results")
    p.add_argument("--seeds", type=int, nargs="+", help="override the protocol's VWSL seeds")
    p.add_argument(
        "--only-seeds",
        type=int,
        nargs="+",
        help="run the VWSL units of these seeds only (e.g. in a second process); the tables "
        "it writes then hold only them: re-run without it to write the full tables",
    )
    p.add_argument(
        "--publish-only",
        action="store_true",
        help="run no new VWSL unit: write the tables from the units that have finished",
    )
    p.add_argument(
        "--figures",
        action="store_true",
        help="also draw std maps and overlays before/after VWSL on 4 captured test images per "
        "preset (under the work folder: they show real X-rays)",
    )
    a = p.parse_args(argv)
    try:
        proto = CaptureProtocol.load(a.protocol)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src, tgt = proto.train_site, proto.test_site
    source_run = Path(proto.source_run)
    fbase: FinetuneConfig = proto.finetune
    source_weights = source_run / proto.source_weights if proto.source_weights else None
    cfg, params = ckpt.load_run(source_run, source_weights)
    size = cfg.train.image_size
    if proto.uses_prior():
        fbase = dataclasses.replace(fbase, prior_share=train_share(a.data, a.splits, src, size))
    work, res_dir = Path(a.work), Path(a.results)
    samples = proto.eval_samples
    unc_n, unc_samples = proto.uncertainty_images, proto.uncertainty_samples
    cap_seed = proto.capture_seed
    seeds = list(a.seeds) if a.seeds is not None else list(proto.seeds)
    proto = dataclasses.replace(proto, seeds=tuple(seeds))  # the tables name the seeds run
    t_all = time.perf_counter()
    rows: list[dict[str, Any]] = []
    unc: list[dict[str, Any]] = []

    def scored(run_cfg, prm, data, n_samples) -> dict[str, Any]:
        chunk = max(1, 10 // n_samples)  # ~10 predictions per call: larger ones ran slower
        s = evaluate(run_cfg, prm, data, samples=n_samples, seed=0, chunk=chunk)
        s.pop("cases")
        return s

    def rescored(ft, epoch, preset, n_ft, seed, test, before_ev) -> dict[str, Any] | None:
        """The evaluation of the weights a re-decided run keeps: the source's own when it rolls
        back (the same weights, test images and keys as the source's evaluation), else its
        snapshot of that epoch."""
        if epoch is None:
            return before_ev

        def do() -> dict[str, Any]:
            c2, _ = ckpt.load_run(ft)
            snap = ckpt.load_weights(ft / "snapshots" / f"epoch{epoch:04d}.npz", c2)
            return scored(c2, snap, test(), samples)

        return unit(work / f"eval-{preset}-vwsl-n{n_ft}-s{seed}-e{epoch:04d}.json", do, compute)

    def publish() -> None:
        res_dir.mkdir(parents=True, exist_ok=True)
        name = proto.results_name
        ckpt.write_json(res_dir / f"{name}.json", rows)
        ckpt.write_json(res_dir / f"{name}_uncertainty.json", unc)
        md = tables_markdown(rows, unc, proto, time.perf_counter() - t_all) + unit_times(work)
        atomic_write_text(res_dir / f"{name}.md", md)

    data_root = Path(a.data)
    compute = not a.publish_only  # --publish-only reads finished units and computes nothing
    for preset in ["none", *proto.presets]:
        if preset == "none":
            folder = data_root / tgt
        else:
            folder = work / f"captured-{tgt}-{preset}-s{cap_seed}"

        def ld(
            split: str, masks: bool = True, limit: int | None = None, folder=folder, preset=preset
        ):
            if preset != "none" and not (folder / "capture.json").exists():
                capture_folder(data_root / tgt, folder, preset, cap_seed, overwrite=True)
            return load_site(
                folder.parent, a.splits, folder.name, split, size, masks=masks, limit=limit
            )

        test = functools.cache(lambda ld=ld: ld(f"{tgt}_test"))  # read when a unit needs it
        # the source model does not depend on the VWSL seed: scored once, under the first seed
        ev = unit(
            work / f"eval-{preset}-before-s{seeds[0]}.json",
            lambda test=test: scored(cfg, params, test(), samples),
            compute,
        )
        if ev is None:
            continue  # --publish-only, and the source is not scored on this preset yet
        before_ev = ev
        rows.append(_row(proto, preset, "med-nca", 0, seeds[0], ev, steps=0))
        u = unit(
            work / f"unc-{preset}-before-s{seeds[0]}.json",
            lambda test=test: scored(cfg, params, head(test(), unc_n), unc_samples),
            compute,
        )
        before_unc = u
        if u is not None:
            unc.append(_unc_row(preset, "med-nca", 0, seeds[0], u))
        for seed in seeds:
            if preset == "none" or (a.only_seeds and seed not in a.only_seeds):
                continue
            for n_ft in proto.n_finetune:
                ft = work / f"vwsl-{preset}-n{n_ft}-s{seed}"
                if (
                    a.publish_only
                    and not (work / f"eval-{preset}-vwsl-n{n_ft}-s{seed}.json").exists()
                ):
                    continue  # not finished: left out of the tables

                def do_ft(n_ft=n_ft, ft=ft, seed=seed, ld=ld) -> dict[str, Any]:
                    fc = dataclasses.replace(
                        fbase,
                        seed=seed,
                        source_run=str(source_run),
                        batch_size=min(fbase.batch_size, n_ft),
                    )
                    imgs = ld(FINETUNE_SPLIT[tgt], masks=False, limit=n_ft)
                    resume = (ft / "checkpoints").exists()
                    return finetune(
                        cfg,
                        params,
                        imgs,
                        ft,
                        fc,
                        resume=resume,
                        progress=False,
                        uncertainty_after=False,
                    )

                ft_res = unit(work / f"vwsl-{preset}-n{n_ft}-s{seed}.json", do_ft, compute)

                def after(n_samples: int, data, ft=ft) -> dict[str, Any]:
                    c2, p2 = ckpt.load_run(ft)
                    return scored(c2, p2, data, n_samples)

                ev = unit(
                    work / f"eval-{preset}-vwsl-n{n_ft}-s{seed}.json",
                    lambda test=test, after=after: after(samples, test()),
                    compute,
                )
                if ft_res is None or ev is None:
                    continue
                # a checked run's weights.npz is its last epoch's when its net kept that epoch:
                # then its evaluation is also the `last` row (VWSL without any choice), whatever
                # a re-decision below keeps
                last_ev = (
                    ev
                    if "criterion" in ft_res
                    and ft_res.get("verdict") == "adapted"
                    and ft_res.get("selected_epoch") == ft_res.get("epochs_done")
                    else None
                )
                vwsl_row = functools.partial(
                    _row, proto, preset, proto.method, n_ft, seed, steps=ft_res["steps"]
                )
                redecided = False
                if "criterion" in ft_res:
                    d = rechoose(ft_res, dataclasses.replace(fbase, seed=seed))
                    redecided = (d["epoch"], d["verdict"]) != (
                        ft_res.get("selected_epoch"),
                        ft_res.get("verdict"),
                    )
                    if redecided:  # a net other than the run's (e.g. the prior) chose other weights
                        ft_res = {**ft_res, "verdict": d["verdict"], "selected_epoch": d["epoch"]}
                        ev = rescored(ft, d["epoch"], preset, n_ft, seed, test, before_ev)
                        if ev is None:
                            continue
                rows.append(
                    vwsl_row(
                        ev,
                        verdict=ft_res.get("verdict"),
                        selected_epoch=ft_res.get("selected_epoch"),
                    )
                )
                if last_ev is not None:
                    rows.append(vwsl_row(last_ev, selection="last"))
                unc_path = work / f"unc-{preset}-vwsl-n{n_ft}-s{seed}.json"
                if (
                    n_ft == max(proto.n_finetune)
                    and seed == seeds[0]
                    and not (a.publish_only and not unc_path.exists())
                ):
                    u = unit(
                        unc_path,
                        lambda test=test, after=after: after(unc_samples, head(test(), unc_n)),
                        compute,
                    )
                    run_u = u
                    if redecided:  # it scored the run's own choice: only a rollback is known
                        u = before_unc if d["epoch"] is None else None
                    if u is not None:
                        unc.append(_unc_row(preset, proto.method, n_ft, seed, u))
                    if redecided and run_u is not None and last_ev is not None:
                        last_u = _unc_row(preset, proto.method, n_ft, seed, run_u)
                        unc.append({**last_u, "selection": "last"})
                if seed == seeds[0] and n_ft == max(proto.n_finetune):
                    prefix = "capture" if proto.results_name == "capture" else proto.results_name
                    dst = res_dir / "runs" / f"{prefix}-vwsl-{src}-to-{tgt}-{preset}-n{n_ft}"
                    dst.mkdir(parents=True, exist_ok=True)
                    for f in ("config.json", "weights.npz", "run.json", "metrics.jsonl"):
                        if (ft / f).exists():  # no PNGs: they show the patients' anatomy
                            shutil.copy(ft / f, dst / f)
                    if redecided:  # the weights the row scored, and what chose them
                        e = d["epoch"]
                        if e is None:
                            ckpt.save_weights(params, dst / "weights.npz")
                        else:
                            snap = ft / "snapshots" / f"epoch{e:04d}.npz"
                            ckpt.atomic_copy(snap, dst / "weights.npz")
                        ckpt.write_json(dst / "decision.json", d)
            publish()
    publish()
    if a.figures:
        n_max = max(proto.n_finetune)
        for preset in proto.presets:
            png = work / "figures" / f"capture_{preset}_{src}_to_{tgt}.png"
            if png.exists():
                continue
            folder = work / f"captured-{tgt}-{preset}-s{cap_seed}"
            test = load_site(folder.parent, a.splits, folder.name, f"{tgt}_test", size)
            after_run = work / f"vwsl-{preset}-n{n_max}-s{seeds[0]}"
            write_figure(source_run, after_run, test, png, before_weights=source_weights)
    print((res_dir / f"{proto.results_name}.md").read_text())
    return 0


def unit_times(work: Path) -> str:
    """Unit wall times per VWSL seed: scoring the source model, and the VWSL units."""

    def group_of(name: str) -> str | None:
        m = re.search(r"-s(\d+)\.json$", name)
        if m is None:
            return None
        return f"seed {m.group(1)}, {'VWSL' if 'vwsl' in name else 'source model'}"

    return sum_unit_times(work, group_of, "2 cores; other jobs may have shared them")


def _row(
    proto: CaptureProtocol,
    preset: str,
    method: str,
    n_ft: int,
    seed: int,
    ev: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """One result row, in issue 14's results contract too: test_site names the capture
    (SITE-PRESET), selection says which weights were scored (the safety net's label-free choice
    for a run with checks, else the last epoch's)."""
    checked = method != "med-nca" and proto.finetune.check_every > 0
    return {
        "train_site": proto.train_site,
        "test_site": proto.test_site if preset == "none" else f"{proto.test_site}-{preset}",
        "preset": preset,
        "method": method,
        "selection": "label-free" if checked else "last",
        "n_finetune_images": n_ft,
        "n_target_images": n_ft,
        "seed": seed,
        "capture_seed": proto.capture_seed,
        "dice_mean": ev["dice_mean"],
        "dice_std": ev["dice_std"],
        "hd95_mean": ev["hd95_mean"],
        "n": ev["n"],
        "samples": ev["samples"],
        "wall_s": ev["wall_s"],
        **extra,
    }


def _unc_row(preset: str, method: str, n_ft: int, seed: int, u: dict[str, Any]) -> dict[str, Any]:
    return {
        "preset": preset,
        "method": method,
        "n_finetune_images": n_ft,
        "seed": seed,
        "samples": u["samples"],
        "n": u["n"],
        "quality_mean": u["quality_mean"],
        "quality_std": u["quality_std"],
        "dice_mean": u["dice_mean"],
        "wall_s": u["wall_s"],
    }


def tables_markdown(
    rows: list[dict[str, Any]], unc: list[dict[str, Any]], proto: CaptureProtocol, wall: float
) -> str:
    def cell(preset: str, method: str, n_ft: int, selection: str) -> str:
        d = [
            r
            for r in rows
            if (r["preset"], r["method"], r["n_finetune_images"], r["selection"])
            == (preset, method, n_ft, selection)
        ]
        if not d:
            return "-"
        m = np.mean([r["dice_mean"] for r in d])
        if len(d) == 1:
            return f"{m:.3f} ± {d[0]['dice_std']:.3f} (images)"
        return f"{m:.3f} ± {np.std([r['dice_mean'] for r in d]):.3f} (seeds={len(d)})"

    presets = ["none", *proto.presets]
    # VWSL as kept (the safety net's choice, or the last epoch without checks), then, where the
    # net chose other weights, the last epoch's too: what VWSL itself did
    sel = {r["selection"] for r in rows if r["method"] == proto.method}
    kept = "label-free" if "label-free" in sel else "last"
    cols = [("med-nca", 0, "last", "Med-NCA")] + [
        (proto.method, n, kept, f"+ VWSL ({n} images)") for n in proto.n_finetune
    ]
    if kept == "label-free" and "last" in sel:
        cols += [(proto.method, n, "last", f"VWSL's last epoch ({n})") for n in proto.n_finetune]
    head = "| captured as | " + " | ".join(c[3] for c in cols)
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for preset in presets:
        cells = [
            cell(preset, m, n, s) if preset != "none" or m == "med-nca" else "-"
            for m, n, s, _ in cols
        ]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    ul = ["| captured as | model | quality (mean ± std over images) | Dice |", "|---|---|---|---|"]
    for u in unc:
        label = "Med-NCA" if u["method"] == "med-nca" else f"+ VWSL ({u['n_finetune_images']})"
        if u.get("selection") == "last":
            label = f"VWSL's last epoch ({u['n_finetune_images']})"
        ul.append(
            f"| {u['preset']} | {label} | {u['quality_mean']:.3f} ± {u['quality_std']:.3f} "
            f"| {u['dice_mean']:.3f} |"
        )
    return (
        f"Trained on {proto.train_site} (clean), tested on {proto.test_site} test images "
        f"captured with each preset (capture seed {proto.capture_seed}); Dice: mean "
        "over test images; ± std over test images for one run, over VWSL seeds "
        f"{list(proto.seeds)} otherwise. + VWSL: the weights the safety net kept (the "
        "source's when it rolled back); VWSL's last epoch: the run's final weights, where its "
        "checks kept them before any re-decision (labels used only to score).\n\n"
        + "\n".join(lines)
        + f"\n\nUncertainty on the first {proto.uncertainty_images} test images "
        f"({proto.uncertainty_samples} samples each):\n\n"
        + "\n".join(ul)
        + f"\n\nwall time of this invocation: {wall:.0f} s; paper: VWSL gains "
        f"{PAPER_CAPTURE_GAIN}\n"
    )


if __name__ == "__main__":
    raise SystemExit(main())
