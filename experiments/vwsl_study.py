"""Issue 14: does fine-tuning on an unlabelled new site help, and does the safety net know?

For each direction (source site -> target site) and each method (the authors' VWSL, VWSL as
finetune.py does it by default, pseudo-labels, TENT-style entropy), fine-tune the source model
on the target site's unlabelled images (disjoint from its 50 test images), then score on the
target's test images with three ways of choosing the weights:
  last        the weights after the last epoch,
  label-free  the safety net's choice (nca_jax/guard.py; for a run made without in-run checks,
              the same checks are computed afterwards on its snapshots), or the source weights
              when it rolls back,
  oracle      the snapshot with the best target test Dice (uses target labels: reference only).
Target labels are read only to score. Every unit (source training, fine-tuning, each
evaluation, each set of checks) writes its own JSON under --work and is skipped when present, so
the command resumes after a stop; a fine-tuning cut mid-way resumes from its checkpoint.

Usage:
    python experiments/vwsl_study.py --protocol configs/vwsl_cpu.json [--work results/vwsl_units]
        [--directions shenzhen:montgomery] [--methods vwsl-authors] [--seeds 0]
        [--publish-only]
Results: results/vwsl.json (rows, see issue 14's contract) and results/vwsl.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from experiments.common import (
    FINETUNE_SPLIT,
    device_kind,
    fields_of,
    head,
    rechoose,
    score_fields,
    train_share,
    unit,
)
from nca_jax import checkpoint as ckpt
from nca_jax.config import (
    ConfigError,
    FinetuneConfig,
    RunConfig,
    atomic_write_text,
    config_from_dict,
    load_config,
)
from nca_jax.data import Dataset, load_split
from nca_jax.evaluate import evaluate
from nca_jax.finetuning import finetune, make_checker
from nca_jax.guard import PRIOR_BY_DEFAULT, choose
from nca_jax.model import Params
from nca_jax.training import train_and_evaluate

PAPER_GAIN = "+0.7 to +2.8 Dice points across sites (paper, Table 1)"


@dataclasses.dataclass(frozen=True)
class Source:
    """A source model: an existing run (`run`, optional `weights` file in it), or trained here
    from `config` (a run config JSON) with `train` overrides, on SITE_train, checkpoint chosen
    on SITE_val."""

    run: str = ""
    weights: str = ""
    config: str = ""
    model: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Method:
    """A fine-tuning method: FinetuneConfig fields (`config`: a JSON with a finetune section,
    then `finetune` overrides) and the seeds to run."""

    name: str
    config: str = ""
    finetune: dict = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    # the runs of this method ARE those of another one (same training fields and seed: the
    # same trajectory); only the choice of weights (its safety-net fields) is this method's own
    reuse: str = ""
    # the safety net's anatomical prior: prior_share = the mean lung share of the source site's
    # training masks; None = as finetune.py does when not told (nca_jax.guard.PRIOR_BY_DEFAULT)
    prior: bool | None = None

    def uses_prior(self) -> bool:
        return PRIOR_BY_DEFAULT if self.prior is None else self.prior


# what a label-free check predicts and measures (they name the post-hoc checks: check_tag)
CHECK_FIELDS = ("check_images", "check_samples")
# the safety net's settings: they choose weights, and never change a trajectory
NET_FIELDS = (
    "check_images",
    "check_samples",
    "area_min_ratio",
    "area_max_ratio",
    "min_quality_gain",
    "rollback",
    "keep",
    "prior_share",
)
# fields that choose or keep weights but do not change a fine-tuning trajectory
SELECTION_FIELDS = (
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "eval_samples",
    "check_every",
    *NET_FIELDS,
    "snapshot_every",
    "source_run",
)


def training_fields(fc: FinetuneConfig) -> dict[str, Any]:
    d = dataclasses.asdict(fc)
    return {k: v for k, v in d.items() if k not in SELECTION_FIELDS}


@dataclasses.dataclass(frozen=True)
class Protocol:
    sources: dict[str, Source]
    methods: tuple[Method, ...]
    directions: tuple[tuple[str, str], ...]
    eval_samples: int = 10  # predictions per test image for every reported Dice
    oracle_samples: int = 2  # predictions per test image when the oracle ranks snapshots
    n_target_images: int = 50  # unlabelled target images
    snapshot_every: int = 10  # epochs between kept weights (oracle and post-hoc checks)
    label_free_every: int = 20  # post-hoc checks: every K epochs (the in-run default)
    uncertainty_after: bool = False  # std maps after fine-tuning (10 predictions per image)
    image_size: int = 256
    # rows of experiments/capture_experiment.py (results/NAME.json of a capture protocol) added
    # to vwsl.json: the phone-capture targets (test_site SITE-PRESET); absent files are skipped
    captures: tuple[str, ...] = ()

    @staticmethod
    def load(path: str | Path) -> Protocol:
        where = str(path)
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{where}: not a readable protocol ({e})") from e
        top = fields_of(Protocol, raw, where)
        sources = {
            s: Source(**fields_of(Source, v, f"{where} [sources.{s}]"))
            for s, v in top.pop("sources").items()
        }
        methods = []
        for m in top.pop("methods"):
            f = fields_of(Method, m, f"{where} [methods]")
            f["seeds"] = tuple(f.get("seeds", (0,)))
            methods.append(Method(**f))
        names = {m.name: m for m in methods}
        for m in methods:
            if m.reuse and (m.reuse not in names or names[m.reuse].reuse):
                raise ConfigError(f"{where}: method {m.name} reuses unknown {m.reuse!r}")
        top["captures"] = tuple(top.get("captures", ()))
        dirs = tuple(tuple(d) for d in top.pop("directions"))
        for d in dirs:
            if len(d) != 2 or any(s not in sources for s in d):
                raise ConfigError(f"{where}: direction {list(d)} names an unknown source")
        return Protocol(sources, tuple(methods), dirs, **top)


def finetune_config(
    m: Method, seed: int, proto: Protocol, source_run: str, prior_share: float = 0.0
) -> FinetuneConfig:
    """The method's FinetuneConfig for one seed; prior_share is the source site's training-mask
    share, used when the method applies the prior."""
    base: dict[str, Any] = {}
    if m.config:
        raw = json.loads(Path(m.config).read_text())
        base = fields_of(FinetuneConfig, raw.get("finetune", raw), m.config)
    fields = {**base, **fields_of(FinetuneConfig, m.finetune, f"method {m.name}")}
    fields.setdefault("snapshot_every", proto.snapshot_every)
    if m.uses_prior():
        fields["prior_share"] = prior_share
    fc = FinetuneConfig(**{**fields, "seed": seed, "source_run": source_run})
    fc.validate()
    return fc


def check_tag(fc: FinetuneConfig) -> str:
    """'default' for the default checks, else 'net' + a hash of what they measure (a net that
    differs only in its rule re-decides from the same checks: experiments.common.rechoose)."""
    d = {k: getattr(fc, k) for k in CHECK_FIELDS}
    if d == {k: getattr(FinetuneConfig(), k) for k in CHECK_FIELDS}:
        return "default"
    return "net" + hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two weights .npz files hold the same arrays (names, shapes and values)."""
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        return sorted(x.files) == sorted(y.files) and all(
            np.array_equal(x[n], y[n]) for n in x.files
        )


class Study:
    """Runs and collects the units of one protocol."""

    def __init__(self, a: argparse.Namespace, proto: Protocol) -> None:
        self.a, self.p = a, proto
        self.work = Path(a.work)
        self.compute = not a.publish_only
        self._data: dict[tuple[str, str, bool], Dataset] = {}
        self.partial: dict[str, Path] = {}  # unfinished fine-tuning runs seen by finetune()
        self._prior: dict[str, float] = {}

    def data(self, site: str, split: str, masks: bool = True) -> Dataset:
        k = (site, split, masks)
        if k not in self._data:
            self._data[k] = load_split(
                Path(self.a.data) / site,
                Path(self.a.splits) / f"{split}.txt",
                size=self.p.image_size,
                require_masks=masks,
            )
        return self._data[k]

    # -- sources
    def source(self, site: str) -> tuple[Path, Path | None] | None:
        """(run folder, weights file or None for the run's weights.npz)."""
        s = self.p.sources[site]
        if s.run:
            return Path(s.run), (Path(s.run) / s.weights if s.weights else None)
        run = self.work / f"source-{site}"

        def train() -> dict[str, Any]:
            cfg = load_config(s.config) if s.config else RunConfig()
            cfg = config_from_dict(
                {
                    "model": {**dataclasses.asdict(cfg.model), **s.model},
                    "train": {**dataclasses.asdict(cfg.train), **s.train},
                },
                where=f"source {site}",
            )
            return train_and_evaluate(
                cfg,
                self.data(site, f"{site}_train"),
                run,
                val=self.data(site, f"{site}_val"),
                resume=(run / "checkpoints").exists(),
                progress=False,
            )

        res = unit(self.work / f"source-{site}.json", train, self.compute)
        return None if res is None else (run, None)

    # -- evaluation
    def evaluate(
        self, tag: str, run: Path, weights: Path | Params | None, site: str, k: int
    ) -> dict[str, Any] | None:
        def do() -> dict[str, Any]:
            if isinstance(weights, dict):
                cfg, prm = ckpt.load_run(run)[0], weights
            else:
                cfg, prm = ckpt.load_run(run, weights)
            s = evaluate(
                cfg, prm, self.data(site, f"{site}_test"), samples=k, seed=0, chunk=max(1, 10 // k)
            )
            s.pop("cases")
            return s

        return unit(self.work / "evals" / f"{tag}-on-{site}-k{k}.json", do, self.compute)

    # -- fine-tuning
    def finetune(self, m: Method, src: str, tgt: str, seed: int) -> tuple[Path, dict] | None:
        if m.reuse:
            other = next(x for x in self.p.methods if x.name == m.reuse)
            a = finetune_config(m, seed, self.p, "")
            b = finetune_config(other, seed, self.p, "")
            if training_fields(a) != training_fields(b):
                raise ConfigError(
                    f"method {m.name} cannot reuse {other.name}: it trains differently"
                )
            m = other
        name = f"ft-{m.name}-{src}-to-{tgt}-s{seed}"
        ft = self.work / name
        got = self.source(src)
        if got is None:
            return None
        run, weights = got

        def do() -> dict[str, Any]:
            cfg, prm = ckpt.load_run(run, weights)
            fc = finetune_config(m, seed, self.p, str(weights or run), self.prior(m, src))
            imgs = head(self.data(tgt, FINETUNE_SPLIT[tgt], masks=False), self.p.n_target_images)
            res = finetune(
                cfg,
                prm,
                imgs,
                ft,
                fc,
                resume=(ft / "checkpoints").exists(),
                progress=False,
                uncertainty_after=self.p.uncertainty_after,
            )
            return {**res, "device": device_kind()}

        res = unit(self.work / f"{name}.json", do, self.compute and not self.a.no_finetune)
        if res is None and ft.exists():  # running or cut: rank its snapshots so far
            self.evaluate(f"source-{src}", run, weights, tgt, self.p.oracle_samples)
            for e, f in self.snapshots(ft).items():
                self.evaluate(f"{name}-e{e:04d}", ft, f, tgt, self.p.oracle_samples)
            self.partial[name] = ft
        return None if res is None or not res.get("finished") else (ft, res)

    def epoch_eval(
        self, ft: Path, res: dict, e: int, tgt: str, last_ev: dict | None
    ) -> dict[str, Any] | None:
        """The eval_samples evaluation of the snapshot of epoch e; the run's last epoch IS
        weights_last.npz (checked array by array), whose evaluation is reused, not repeated."""
        snap = self.snapshots(ft)[e]
        if e == res["epochs_done"] and last_ev is not None:
            if same_weights(snap, ft / "weights_last.npz"):
                return last_ev
        return self.evaluate(f"{ft.name}-e{e:04d}", ft, snap, tgt, self.p.eval_samples)

    def snapshots(self, ft: Path) -> dict[int, Path]:
        return {int(f.stem[5:]): f for f in sorted((ft / "snapshots").glob("epoch*.npz"))}

    def prior(self, m: Method, site: str) -> float:
        """The prior_share of method m for a source trained on `site`: that site's training
        masks' lung share when m applies the prior, else 0 (no prior)."""
        if not m.uses_prior():
            return 0.0
        if site not in self._prior:
            self._prior[site] = train_share(self.a.data, self.a.splits, site, self.p.image_size)
        return self._prior[site]

    def label_free(
        self, m: Method, ft: Path, res: dict, src_params: Params, src: str, tgt: str
    ) -> dict | None:
        """The run's own verdict, or this method's safety net on its snapshots' checks (the
        default net for a method whose runs had no checks), with the prior when it uses it."""
        run_cfg = load_config(ft / "config.json")
        seed = run_cfg.finetune.seed
        fc = finetune_config(m, seed, self.p, "", self.prior(m, src))
        if fc.check_every == 0:  # a method without checks: the default safety net
            fc = dataclasses.replace(FinetuneConfig(), seed=seed, prior_share=self.prior(m, src))
        if "verdict" in res and not m.reuse:
            own = {"verdict": res["verdict"], "epoch": res["selected_epoch"]}
            d = rechoose({**own, "criterion": res["criterion"]}, fc)
            # the run chose its weights.npz itself: a different net must say which weights
            return {**d, "post_hoc": (d["epoch"], d["verdict"]) != (own["epoch"], own["verdict"])}

        def do() -> dict[str, Any]:
            cfg = dataclasses.replace(run_cfg, finetune=fc)
            imgs = head(self.data(tgt, FINETUNE_SPLIT[tgt], masks=False), self.p.n_target_images)
            check = make_checker(cfg, imgs.images)
            every, last = self.p.label_free_every, cfg.finetune.epochs
            checks = []
            for e, f in self.snapshots(ft).items():
                if e % every == 0 or e == last:
                    checks.append({"epoch": e, **check(ckpt.load_weights(f, cfg))})
            d = choose(checks, check(src_params), fc)
            return {**d, "post_hoc": True}

        # named by what the checks measure, not the method: methods sharing a run share them,
        # and each applies its own rule to them
        got = unit(self.work / f"checks-{check_tag(fc)}-{ft.name}.json", do, self.compute)
        return None if got is None else {**rechoose(got, fc), "post_hoc": True}


def row(src: str, tgt: str, method: str, selection: str, seed: int, ev: dict, **kw) -> dict:
    return {
        "train_site": src,
        "test_site": tgt,
        "method": method,
        "selection": selection,
        "seed": seed,
        **score_fields(ev),
        **kw,
    }


def collect(st: Study, a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    p, k = st.p, st.p.eval_samples
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    directions = [d for d in p.directions if not a.directions or ":".join(d) in a.directions]
    for src, tgt in directions:
        got = st.source(src)
        if got is None:
            continue
        run, weights = got
        src_cfg, src_params = ckpt.load_run(run, weights)
        base = {}
        for site in (src, tgt):
            ev = st.evaluate(f"source-{src}", run, weights, site, k)
            if ev is not None:
                rows.append(
                    row(
                        src,
                        site,
                        "med-nca",
                        "last",
                        0,
                        ev,
                        n_target_images=0,
                        steps=0,
                        wall_s=ev["wall_s"],
                    )
                )
                base[site] = ev
        for m in p.methods:
            if a.methods and m.name not in a.methods:
                continue
            for seed in m.seeds:
                if a.seeds is not None and seed not in a.seeds:
                    continue
                got_ft = st.finetune(m, src, tgt, seed)
                if got_ft is None:
                    cut = partial_curve(st, m, src, tgt, seed, run, weights)
                    if cut is not None:
                        curves.append(cut)
                    continue
                ft, res = got_ft
                per_epoch, tag = res["steps_per_epoch"], ft.name
                common = {
                    "n_target_images": res["n_train"],
                    "wall_s": res.get("wall_s"),
                    "device": res.get("device", "cpu"),  # what ran the fine-tuning
                }
                ev = last_ev = st.evaluate(tag + "-last", ft, ft / "weights_last.npz", tgt, k)
                if ev is not None:
                    rows.append(
                        row(
                            src,
                            tgt,
                            m.name,
                            "last",
                            seed,
                            ev,
                            steps=res["steps"],
                            selected_epoch=res["epochs_done"],
                            **common,
                        )
                    )
                lf = st.label_free(m, ft, res, src_params, src, tgt)
                if lf is not None:
                    e = lf["epoch"]
                    ev = base.get(tgt) if e is None else st.epoch_eval(ft, res, e, tgt, last_ev)
                    if ev is not None:
                        rows.append(
                            row(
                                src,
                                tgt,
                                m.name,
                                "label-free",
                                seed,
                                ev,
                                steps=0 if e is None else e * per_epoch,
                                selected_epoch=e,
                                verdict=lf["verdict"],
                                post_hoc=lf["post_hoc"],
                                **common,
                            )
                        )
                # oracle: rank the source and every snapshot by target test Dice (labels!)
                ranked = {0: st.evaluate(f"source-{src}", run, weights, tgt, p.oracle_samples)}
                for e, f in st.snapshots(ft).items():
                    ranked[e] = st.evaluate(f"{tag}-e{e:04d}", ft, f, tgt, p.oracle_samples)
                complete = all(v is not None for v in ranked.values())
                ranked = {e: v for e, v in ranked.items() if v is not None}
                best = max(ranked, key=lambda e: ranked[e]["dice_mean"]) if complete else None
                ev = (
                    None
                    if best is None
                    else base.get(tgt)
                    if best == 0
                    else st.epoch_eval(ft, res, best, tgt, last_ev)
                )
                if ev is not None:
                    rows.append(
                        row(
                            src,
                            tgt,
                            m.name,
                            "oracle",
                            seed,
                            ev,
                            steps=best * per_epoch,
                            selected_epoch=best,
                            **common,
                        )
                    )
                checks = {} if lf is None else {c["epoch"]: c for c in lf["criterion"]["checks"]}
                metrics = [
                    json.loads(ln) for ln in (ft / "metrics.jsonl").read_text().splitlines() if ln
                ]
                curves.append(
                    {
                        "run": tag,
                        "train_site": src,
                        "test_site": tgt,
                        "method": m.name,
                        "seed": seed,
                        "oracle_samples": p.oracle_samples,
                        "source_check": None if lf is None else lf["criterion"]["source"],
                        "points": [
                            {
                                "epoch": e,
                                "dice": ranked[e]["dice_mean"],
                                **{
                                    f"check_{x}": checks[e][x]
                                    for x in ("area", "quality", "agreement", "stray", "acceptable")
                                    if e in checks and x in checks[e]  # stray: session 12 on
                                },
                            }
                            for e in sorted(ranked)
                        ],
                        "terms_first_epoch": {
                            x: v for x, v in metrics[0].items() if x.startswith("term_")
                        },
                        "terms_last_epoch": {
                            x: v for x, v in metrics[-1].items() if x.startswith("term_")
                        },
                        "gamma": json.loads((ft / "config.json").read_text())["finetune"]["gamma"],
                    }
                )
    return rows, curves


def partial_curve(
    st: Study, m: Method, src: str, tgt: str, seed: int, run: Path, weights: Path | None
) -> dict[str, Any] | None:
    """The trajectory so far of an unfinished (running or cut) run: oracle-sample Dice of the
    source and of every snapshot evaluated so far, and the loss terms; no selection."""
    name = f"ft-{m.reuse or m.name}-{src}-to-{tgt}-s{seed}"
    ft = st.partial.get(name)
    if ft is None or m.reuse or not (ft / "metrics.jsonl").exists():
        return None
    k = st.p.oracle_samples
    pts = {0: st.evaluate(f"source-{src}", run, weights, tgt, k)}
    for e, f in st.snapshots(ft).items():
        pts[e] = st.evaluate(f"{name}-e{e:04d}", ft, f, tgt, k)
    metrics = [json.loads(ln) for ln in (ft / "metrics.jsonl").read_text().splitlines() if ln]
    terms = [
        {x: v for x, v in r.items() if x.startswith("term_")} for r in (metrics[0], metrics[-1])
    ]
    return {
        "run": f"{name} (unfinished: {len(metrics)} of "
        f"{load_config(ft / 'config.json').finetune.epochs} epochs)",
        "train_site": src,
        "test_site": tgt,
        "method": m.name,
        "seed": seed,
        "oracle_samples": k,
        "source_check": None,
        "points": [
            {"epoch": e, "dice": v["dice_mean"]} for e, v in sorted(pts.items()) if v is not None
        ],
        "terms_first_epoch": terms[0],
        "terms_last_epoch": terms[1],
        "gamma": load_config(ft / "config.json").finetune.gamma,
        "unfinished": True,
    }


# issue 14's bar: vwsl-default with label-free selection, mean over 3 seeds per direction
ACCEPT_GAIN, ACCEPT_WORST, ACCEPT_SEEDS = 1.5, -0.5, 3
ACCEPT_CAPTURE_GAIN = 5.0  # on moderate phone captures (mean over the capture seeds run)


def acceptance(rows: list[dict], p: Protocol) -> list[str]:
    """The acceptance check of issue 14 from the rows, per cross-site direction: the mean gain
    of vwsl-default (label-free) over med-nca in Dice points over its seeds (>= +1.5 with 3
    seeds) and its worst run (>= -0.5); and how many seeds of the authors' protocol exist."""
    base = {
        (r["train_site"], r["test_site"]): r["dice_mean"] for r in rows if r["method"] == "med-nca"
    }
    out = [
        "## Acceptance (issue 14)",
        "",
        f"vwsl-default, label-free selection: mean gain over med-nca >= +{ACCEPT_GAIN} points "
        f"over {ACCEPT_SEEDS} seeds in each direction, no run below {ACCEPT_WORST}; the "
        f"authors' protocol reported with {ACCEPT_SEEDS} seeds in both directions; on moderate "
        f"phone captures a mean gain >= +{ACCEPT_CAPTURE_GAIN:g} points.",
        "",
        "| direction | vwsl-default seeds | mean gain | worst run | bar met | vwsl-authors seeds |",
        "|---|---|---|---|---|---|",
    ]
    for src, tgt in p.directions:
        b = base.get((src, tgt))

        def pick(method: str, src: str = src, tgt: str = tgt) -> list[dict]:
            return [
                r
                for r in rows
                if (r["train_site"], r["test_site"], r["method"]) == (src, tgt, method)
                and r["selection"] == ("label-free" if method == "vwsl-default" else "last")
            ]

        default, authors = pick("vwsl-default"), pick("vwsl-authors")
        if b is None or not default:
            out.append(f"| {src} -> {tgt} | 0 | | | not yet | {len(authors)} |")
            continue
        gains = [100 * (r["dice_mean"] - b) for r in default]
        met = (
            len(gains) >= ACCEPT_SEEDS
            and np.mean(gains) >= ACCEPT_GAIN
            and min(gains) >= ACCEPT_WORST
        )
        verdict = ("yes" if met else "no") if len(gains) >= ACCEPT_SEEDS else "not yet"
        if verdict == "not yet" and min(gains) < ACCEPT_WORST:
            verdict = "no (a run lost more than 0.5)"
        out.append(
            f"| {src} -> {tgt} | {len(gains)} | {np.mean(gains):+.2f} | {min(gains):+.2f} | "
            f"{verdict} | {len(authors)} |"
        )
    captured = sorted(
        {
            (r["train_site"], r["test_site"], r["n_target_images"])
            for r in rows
            if r["test_site"].endswith("-moderate") and r["method"] == "vwsl-default"
        }
    )
    for src, tgt, n_img in captured:
        b = base.get((src, tgt))
        gains = [
            100 * (r["dice_mean"] - b)
            for r in rows
            if (r["train_site"], r["test_site"], r["method"], r["selection"])
            == (src, tgt, "vwsl-default", "label-free")
            and r["n_target_images"] == n_img
        ]
        if b is None or not gains:
            continue
        ok = "yes" if np.mean(gains) >= ACCEPT_CAPTURE_GAIN else "no"
        out.append(
            f"| {src} -> {tgt} ({n_img} images; bar +{ACCEPT_CAPTURE_GAIN:g}) | {len(gains)} | "
            f"{np.mean(gains):+.2f} | {min(gains):+.2f} | {ok} | |"
        )
    return out + [""]


def capture_rows(p: Protocol) -> list[dict]:
    """The rows of the protocol's capture result files that follow the results contract, on
    captured images only (their uncaptured rows repeat what the study scores itself)."""
    out = []
    for f in p.captures:
        if Path(f).exists():
            rows = json.loads(Path(f).read_text())
            out += [r for r in rows if "selection" in r and r.get("preset", "none") != "none"]
    return out


def spread_lines(curves: list[dict]) -> list[str]:
    """What the sample spread (the variance maps' mean, 'quality') did in each run that has
    label-free checks: source -> last check, beside the target test Dice of the same epochs,
    and the correlation of spread and Dice over the checked epochs (labels: reference only)."""
    out, seen = [], set()
    for c in curves:
        sc, pts = c.get("source_check"), c["points"]
        checked = [pt for pt in pts if "check_quality" in pt]
        if not sc or not checked or c["run"] in seen:
            continue
        seen.add(c["run"])
        d0 = next((pt["dice"] for pt in pts if pt["epoch"] == 0), None)
        last = checked[-1]
        q = [sc["quality"]] + [pt["check_quality"] for pt in checked]
        d = [d0] + [pt["dice"] for pt in checked]
        line = (
            f"- {c['run']}: spread {sc['quality']:.4f} (source) -> {last['check_quality']:.4f} "
            f"(epoch {last['epoch']}, {last['check_quality'] / sc['quality'] - 1:+.0%})"
        )
        if "stray" in sc and "check_stray" in last:
            line += f"; stray {sc['stray']:.2%} -> {last['check_stray']:.2%}"
        if d0 is not None:
            line += f"; Dice {d0:.3f} -> {last['dice']:.3f}"
            if len(q) >= 3 and np.std(q) > 0 and np.std(d) > 0:
                r = np.corrcoef(q, d)[0, 1]
                line += f"; correlation of spread and Dice over the checks {r:+.2f}"
        out.append(line)
    if not out:
        return []
    return [
        "What the variance maps show (their mean over the checked target images, 'quality'; "
        "VWSL's consistency term lowers it by construction, so a lower spread alone does not "
        "show that adaptation helped; nor does the stray share, results/README.md, "
        "session 12):",
        "",
        *out,
        "",
    ]


def accelerator_lines(rows: list[dict]) -> list[str]:
    """A blank line and one sentence naming every run fine-tuned off this CPU (direction and
    seed: the other seeds of a method may have run here), or nothing when all ran here."""
    elsewhere = sorted(
        {
            (r["device"], r["method"], r["train_site"], r["test_site"], r["seed"])
            for r in rows
            if r.get("device", "cpu") not in ("cpu", None)
        }
    )
    if not elsewhere:
        return []
    runs = ", ".join(f"{m} {s} -> {t} seed {sd} on {d}" for d, m, s, t, sd in elsewhere)
    return ["", f"Fine-tuned on an accelerator (same protocol; wall times are its own): {runs}."]


def markdown(rows: list[dict], curves: list[dict], p: Protocol) -> str:
    out = ["# Fine-tuning on an unlabelled new site (issue 14)", ""]
    out.append(
        f"Dice of the mean of {p.eval_samples} stochastic predictions, 50 target test "
        f"images; mean ± std over seeds (per-seed values in brackets). Paper: "
        f"{PAPER_GAIN}. Selection `label-free` is the safety net as finetune.py runs it with "
        "no options (nca_jax/guard.py): the lung-share band and the quality score"
        + (
            ", and the anatomical prior (the lung share may only move towards the source "
            "site's training-mask share)"
            if PRIOR_BY_DEFAULT
            else " (no anatomical prior)"
        )
        + "; `oracle` picks the epoch by target labels, for reference only."
    )
    out += [
        "",
        "| train | test | method | images | selection | Dice | Δ vs med-nca (points) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {
        (r["train_site"], r["test_site"]): r["dice_mean"] for r in rows if r["method"] == "med-nca"
    }
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["train_site"], r["test_site"], r["method"], r["n_target_images"], r["selection"])
        groups.setdefault(key, []).append(r)
    for (s, t, m, n_img, sel), rs in groups.items():
        v = [r["dice_mean"] for r in sorted(rs, key=lambda r: r["seed"])]
        b = base.get((s, t))
        delta = "" if b is None or m == "med-nca" else f"{100 * (np.mean(v) - b):+.1f}"
        extra = ""
        if sel == "label-free":
            extra = " " + ", ".join(
                f"{r['verdict']}" + (f" e{r['selected_epoch']}" if r["selected_epoch"] else "")
                for r in rs
            )
        if sel == "oracle":
            extra = " epochs " + ", ".join(str(r["selected_epoch"]) for r in rs)
        each = ", ".join(f"{x:.3f}" for x in v)
        out.append(
            f"| {s} | {t} | {m} | {n_img or ''} | {sel}{extra} | {np.mean(v):.3f} ± "
            f"{np.std(v):.3f} ({each}) | {delta} | {len(v)} |"
        )
    out += accelerator_lines(rows)
    out += [""] + acceptance(rows, p)
    if curves:
        out += [
            f"Per run: target test Dice ({curves[0]['oracle_samples']} samples, labels "
            "used for reference only) and the label-free checks at each kept epoch "
            "(area = predicted lung share, quality = sample spread, lower is surer; stray = "
            "share of the mask outside its two largest parts).",
            "",
        ]
        shown: dict[str, list] = {}
        for c in curves:
            if shown.get(c["run"]) == c["points"]:  # a reused run with the same checks
                out += [f"**{c['run']}** ({c['method']}): the same run and checks as above.", ""]
                continue
            shown[c["run"]] = c["points"]
            sc = c["source_check"]
            head_ = f"**{c['run']}** ({c['method']})"
            if sc:
                head_ += (
                    f" (source: area {sc['area']:.1%}, quality {sc['quality']:.4f}, "
                    f"agreement {sc['agreement']:.3f}"
                    + (f", stray {sc['stray']:.2%})" if "stray" in sc else ")")
                )
            t0, t1 = c["terms_first_epoch"], c["terms_last_epoch"]
            if "term_seg" in t0 and "term_cons1" in t0:
                g = c["gamma"]
                head_ += (
                    f"; loss terms first -> last epoch: seg {t0['term_seg']:.3f} -> "
                    f"{t1['term_seg']:.3f}, gamma x cons1 {g * t0['term_cons1']:.3f} -> "
                    f"{g * t1['term_cons1']:.3f}, gamma x cons2 {g * t0['term_cons2']:.3f}"
                    f" -> {g * t1['term_cons2']:.3f}"
                )
            out += [
                head_,
                "",
                "| epoch | Dice | area | quality | agreement | stray | acceptable |",
                "|---|---|---|---|---|---|---|",
            ]
            for pt in c["points"]:

                def f(x: str, fmt: str, pt=pt) -> str:
                    return format(pt[x], fmt) if x in pt else ""

                out.append(
                    f"| {pt['epoch']} | {pt['dice']:.3f} | {f('check_area', '.1%')} | "
                    f"{f('check_quality', '.4f')} | {f('check_agreement', '.3f')} | "
                    f"{f('check_stray', '.2%')} | {pt.get('check_acceptable', '')} |"
                )
            out.append("")
    out += spread_lines(curves)
    out.append(
        "Earlier compressed-protocol results (10-15 source epochs, 60x the authors' lr, "
        "8 target images) stay in results/cross_site*.md and results/capture.md, "
        "labelled compressed."
    )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", required=True)
    ap.add_argument("--work", default="results/vwsl_units")
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--splits", default="results/splits")
    ap.add_argument("--results", default="results")
    ap.add_argument("--directions", nargs="+", help="e.g. shenzhen:montgomery")
    ap.add_argument("--methods", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--publish-only", action="store_true", help="tables from finished units")
    ap.add_argument(
        "--no-finetune",
        action="store_true",
        help="start no fine-tuning; evaluate sources and the snapshots of existing runs",
    )
    ap.add_argument("--compile-cache", help="JAX compilation cache (default WORK/.jax_cache)")
    a = ap.parse_args(argv)
    try:
        proto = Protocol.load(a.protocol)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.compile_cache != "none":
        import jax

        jax.config.update("jax_compilation_cache_dir", a.compile_cache or f"{a.work}/.jax_cache")
    st = Study(a, proto)
    try:
        rows, curves = collect(st, a)
    except (ConfigError, ckpt.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows += capture_rows(proto)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(res / "vwsl.json", rows)
    ckpt.write_json(res / "vwsl_curves.json", curves)
    atomic_write_text(res / "vwsl.md", markdown(rows, curves, proto))
    print((res / "vwsl.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
