"""Issue 14: an anatomical prior for the safety net, stated before its held-out cases are in.

The default safety net (nca_jax/guard.py) keeps the predicted lung share on the unlabelled
target images within x0.8-x1.25 of the SOURCE MODEL's share on them. That band has no
direction: session 12 found that the lung share moves the same way under every key set, but
whether up or down is right depends on whether the source over- or under-segments the new
site. The source site's own training masks say which way without a target label: adult lungs
fill about the same share of a frontal chest X-ray at both sites (manifests: 0.254 and 0.257).

Candidate rule ("prior"): a check is acceptable only if its predicted lung share is no farther
from P, the mean lung share of the source site's training masks, than the source model's share
was: |area_e - P| <= |area_source - P|. Combined with the default net ("default+prior"): the
latest check acceptable under both, else roll back.

This script applies both to the checks the runs already recorded (no new prediction):
  - every finished run of the VWSL study (results/vwsl_units/checks-default-*.json), judged by
    the 1-prediction test Dice of each snapshot (results/vwsl_curves.json: labels, for judging
    only);
  - every finished unit of the capture experiment (WORK/vwsl-*-n*-s*.json), judged by its
    10-prediction test Dice before and after (WORK/eval-*.json); their snapshots are not
    scored, so a capture run can only be judged when the rule keeps the last epoch or rolls back.

Usage:
    python experiments/prior_share_probe.py [--units results/vwsl_units] \
        [--curves results/vwsl_curves.json] [--captures results/capture_units] \
        [--capture-protocol configs/capture_strong_cpu.json] \
        [--out results/prior_share_probe.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from experiments.common import train_share
from nca_jax import checkpoint as ckpt
from nca_jax.config import atomic_write_text
from nca_jax.guard import prior_ok  # the rule itself: one definition

RUN = re.compile(r"ft-(?P<method>.+)-(?P<src>[a-z]+)-to-(?P<tgt>[a-z]+)-s(?P<seed>\d+)$")
CAPTURE = re.compile(r"vwsl-(?P<preset>[a-z]+)-n(?P<n>\d+)-s(?P<seed>\d+)$")


def decide(checks: list[dict[str, Any]], source_area: float, prior: float) -> dict[str, Any]:
    """checks (the net's recorded checks, each with 'epoch', 'area', 'acceptable') -> the epoch
    each rule keeps (None = rolled back): 'prior' alone and 'default+prior'."""
    ok_prior = [c["epoch"] for c in checks if prior_ok(c["area"], source_area, prior)]
    ok_both = [
        c["epoch"] for c in checks if c["acceptable"] and prior_ok(c["area"], source_area, prior)
    ]
    ok_default = [c["epoch"] for c in checks if c["acceptable"]]
    return {
        k: max(v) if v else None
        for k, v in {"default": ok_default, "prior": ok_prior, "default+prior": ok_both}.items()
    }


def study_rows(units: Path, curves_path: Path, priors: dict[str, float]) -> list[dict]:
    """One row per finished study run with a default-net check file."""
    curves = {c["run"]: c for c in json.loads(curves_path.read_text())}
    rows = []
    for f in sorted(units.glob("checks-default-ft-*.json")):
        name = f.stem[len("checks-default-") :]
        m = RUN.match(name)
        if m is None or name not in curves:
            continue
        crit = json.loads(f.read_text())["criterion"]
        dice = {p["epoch"]: p["dice"] for p in curves[name]["points"]}
        src_area, prior = crit["source"]["area"], priors[m["src"]]
        kept = decide(crit["checks"], src_area, prior)
        rows.append(
            {
                "run": name,
                "method": m["method"],
                "direction": f"{m['src']}->{m['tgt']}",
                "seed": int(m["seed"]),
                "prior": prior,
                "source_area": src_area,
                "areas": {c["epoch"]: c["area"] for c in crit["checks"]},
                "kept": kept,
                "judge": "test Dice, 1 prediction per image, points against the source",
                "gain": {k: 100 * (dice[e or 0] - dice[0]) for k, e in kept.items()},
                "gain_last": 100 * (dice[max(dice)] - dice[0]),
            }
        )
    return rows


def capture_rows(
    work: Path, prior: float, sites: tuple[str, str] = ("shenzhen", "montgomery")
) -> list[dict]:
    """One row per finished capture unit with its before/after evaluations; `sites` = the
    capture protocol's (train_site, test_site), `prior` = the train site's share."""
    rows = []
    for f in sorted(work.glob("vwsl-*-n*-s*.json")):
        m = CAPTURE.match(f.stem)
        after = work / f"eval-{m['preset']}-vwsl-n{m['n']}-s{m['seed']}.json" if m else None
        befores = sorted(work.glob(f"eval-{m['preset']}-before-s*.json")) if m else []
        if m is None or after is None or not after.exists() or not befores:
            continue
        res = json.loads(f.read_text())
        crit = res["criterion"]
        last = max(c["epoch"] for c in crit["checks"])
        kept = decide(crit["checks"], crit["source"]["area"], prior)
        before = json.loads(befores[0].read_text())["dice_mean"]
        after_d = json.loads(after.read_text())["dice_mean"]
        # the after-evaluation scored the net's choice: judged only where a rule keeps that
        # epoch or rolls back (0 points by construction)
        net_epoch = res.get("selected_epoch", last if res["verdict"] == "adapted" else None)

        def gain(e, net_epoch=net_epoch, before=before, after_d=after_d):
            if e is None:
                return 0.0
            return 100 * (after_d - before) if e == net_epoch else None

        rows.append(
            {
                "run": f.stem,
                "method": "vwsl-default",
                "direction": f"{sites[0]}->{sites[1]}-{m['preset']}",
                "n_images": int(m["n"]),
                "seed": int(m["seed"]),
                "prior": prior,
                "source_area": crit["source"]["area"],
                "areas": {c["epoch"]: c["area"] for c in crit["checks"]},
                "kept": kept,
                "judge": "test Dice, 10 predictions per image, points against the source",
                "gain": {k: gain(e) for k, e in kept.items()},
                "gain_last": 100 * (after_d - before) if net_epoch == last else None,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    def g(x):
        return "n/a" if x is None else f"{x:+.2f}"

    def e(x):
        return "rolled back" if x is None else f"e{x}"

    out = [
        "# An anatomical prior for the safety net (issue 14, session 14)",
        "",
        "`experiments/prior_share_probe.py`. P = mean lung share of the source site's training "
        "masks; a check passes the prior rule when its predicted lung share is no farther from "
        "P than the source model's. Gains in Dice points against the source (labels used only "
        "to judge; n/a = that snapshot was not scored).",
        "",
        "| run | P | source share | shares at the checks | default net | prior | "
        "default+prior | last epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shares = ", ".join(
            f"{a:.3f}" for _, a in sorted(r["areas"].items(), key=lambda x: int(x[0]))
        )
        cells = [
            f"{e(r['kept'][k])} ({g(r['gain'][k])})" for k in ("default", "prior", "default+prior")
        ]
        out.append(
            f"| {r['run']} | {r['prior']:.3f} | {r['source_area']:.3f} | {shares} | "
            + " | ".join(cells)
            + f" | {g(r['gain_last'])} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", default="results/vwsl_units")
    ap.add_argument("--curves", default="results/vwsl_curves.json")
    ap.add_argument("--captures", default="results/capture_units")
    ap.add_argument(
        "--capture-protocol",
        default="configs/capture_strong_cpu.json",
        help="names the capture units' source and target sites",
    )
    ap.add_argument("--data", default="../shared/data/cxr")
    ap.add_argument("--splits", default="results/splits")
    ap.add_argument("--out", default="results/prior_share_probe.json")
    a = ap.parse_args(argv)
    try:
        proto = json.loads(Path(a.capture_protocol).read_text())
        sites = (proto["train_site"], proto["test_site"])
        priors = {s: train_share(a.data, a.splits, s) for s in ("shenzhen", "montgomery")}
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = study_rows(Path(a.units), Path(a.curves), priors)
    rows += capture_rows(Path(a.captures), priors[sites[0]], sites)
    out = Path(a.out)
    ckpt.write_json(out, rows)
    atomic_write_text(out.with_suffix(".md"), markdown(rows))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
