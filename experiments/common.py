"""What the experiment scripts share: typed protocol loading (a protocol is a frozen dataclass;
an unknown key is a ConfigError naming the file and the key, never a silent default), the sites
and their splits, resumable units, and the before/after figure."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nca_jax import checkpoint as ckpt
from nca_jax.config import FinetuneConfig, RunConfig, config_from_dict
from nca_jax.data import Dataset, load_split
from nca_jax.errors import ConfigError
from nca_jax.guard import choose

SITES = ("shenzhen", "montgomery")
# the unlabelled images a site is fine-tuned on (disjoint from its test images)
FINETUNE_SPLIT = {"shenzhen": "shenzhen_finetune", "montgomery": "montgomery_train"}


# ---------------------------------------------------------------- protocols


def load_json_protocol(path: str | Path) -> dict[str, Any]:
    """The JSON object in the protocol file `path`; a one-line ConfigError naming the file when
    it is missing, unreadable or not a JSON object."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such protocol file") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable protocol ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def fields_of(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """data without its comment keys (those starting with "_"), checked to hold only fields of
    the dataclass cls; else a ConfigError naming `where` and the unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    return data


def build(
    cls: type,
    data: dict[str, Any],
    where: str,
    parsers: dict[str, Callable[[Any, str], Any]] | None = None,
) -> Any:
    """An instance of the dataclass cls from the JSON object data: unknown keys (fields_of) and
    missing required ones raise ConfigError naming `where`; `parsers` turn the named keys'
    values into objects (called with the value and "WHERE [KEY]"); JSON lists become tuples
    where the field is a tuple; then every value must match its field's annotation (a bool is
    not a number, an int is a float, floats are finite)."""
    values = fields_of(cls, data, where)
    for name, parse in (parsers or {}).items():
        if name in values:
            values[name] = parse(values[name], f"{where} [{name}]")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    hints = typing.get_type_hints(cls)
    for name, v in values.items():
        t = hints[name]
        if typing.get_origin(t) is tuple and isinstance(v, list):
            values[name] = v = tuple(v)
        if not _matches(v, t):
            raise ConfigError(f"{where}: {name} must be of type {_type_name(t)}, got {v!r}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training variant: the run config file `config` (default: the paper's) with the
    sections `model` / `train` laid over it."""

    about: str = ""  # one line for the table
    config: str = ""  # a run config JSON ("": the defaults, i.e. the paper's)
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_commented(
    cls: type, path: str | Path, parsers: dict[str, Callable[[Any, str], Any]] | None = None
) -> Any:
    """build(cls, ...) from the protocol file `path` for a dataclass with a `comment` field: the
    file's `_comment` becomes it, and a key `comment` is refused (a note is `_comment`)."""
    where = str(path)
    raw = load_json_protocol(path)
    if "comment" in raw:
        raise ConfigError(f"{where}: unknown field(s) ['comment'] (a note is `_comment`)")
    return build(cls, {**raw, "comment": raw.get("_comment", "")}, where, parsers)


def variants_parser(
    where: str, key: str, allow_empty: bool = True
) -> Callable[[Any, str], dict[str, Variant]]:
    """A `build` parser for a protocol's JSON object of named Variants under `key`."""

    def parse(d: Any, w: str) -> dict[str, Variant]:
        if not isinstance(d, dict) or (not d and not allow_empty):
            raise ConfigError(f"{w}: expected a JSON object of {key}")
        return {n: build(Variant, v, f"{where} [{key}.{n}]") for n, v in d.items()}

    return parse


def score_fields(ev: dict[str, Any]) -> dict[str, Any]:
    """The scores a result row takes from an evaluate() summary."""
    return {
        "dice_mean": ev["dice_mean"],
        "dice_std": ev["dice_std"],
        "hd95_mean": ev.get("hd95_mean"),
        "n": ev["n"],
        "samples": ev["samples"],
    }


def variant_config(spec: Variant, where: str) -> RunConfig:
    """The variant's config: the file `spec.config` (default: the paper's) with the
    sections `model` / `train` of the spec laid over it."""
    base: dict[str, Any] = {}
    if spec.config:
        base = json.loads(Path(spec.config).read_text())
    base["model"] = {**base.get("model", {}), **spec.model}
    base["train"] = {**base.get("train", {}), **spec.train}
    return config_from_dict(base, where=where)


def finetune_from_dict(data: Any, where: str) -> FinetuneConfig:
    """A protocol's `finetune` section: FinetuneConfig fields over its defaults, validated."""
    fc = FinetuneConfig(**fields_of(FinetuneConfig, data, where))
    try:
        fc.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    return fc


def _matches(v: Any, t: Any) -> bool:
    """Whether the JSON value v fits the annotation t (the types protocols use)."""
    if t is Any:
        return True
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(v, a) for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if origin is tuple:
        if not isinstance(v, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(x, args[0]) for x in v)
        return len(args) == len(v) and all(_matches(x, a) for x, a in zip(v, args, strict=True))
    if origin is dict:
        return isinstance(v, dict) and all(
            _matches(k, args[0]) and _matches(x, args[1]) for k, x in v.items()
        )
    if isinstance(t, type):
        return isinstance(v, t)
    return True


def _type_name(t: Any) -> str:
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return str(t).replace("typing.", "")


# ---------------------------------------------------------------- data


def head(d: Dataset, n: int) -> Dataset:
    """The first n cases of d (all of them when it has fewer)."""
    if n >= len(d):
        return d
    masks = None if d.masks is None else d.masks[:n]
    return Dataset(d.names[:n], d.images[:n], masks, d.source)


def load_site(
    data: str | Path,
    splits: str | Path,
    site: str,
    split: str,
    size: int,
    masks: bool = True,
    limit: int | None = None,
) -> Dataset:
    """The cases of splits/SPLIT.txt in the site folder data/SITE at size px (the first `limit`
    of them when given); masks=False reads the images only."""
    d = load_split(Path(data) / site, Path(splits) / f"{split}.txt", size=size, require_masks=masks)
    return d if limit is None else head(d, limit)


def train_share(data: str | Path, splits: str | Path, site: str, size: int = 256) -> float:
    """Mean lung share of the site's training masks (SITE_train split at size px): the
    anatomical prior P of a source trained there (what train.py records as train_mask_share)."""
    return float(np.mean(load_site(data, splits, site, f"{site}_train", size).masks > 0.5))


def rechoose(decided: dict[str, Any], fc: FinetuneConfig) -> dict[str, Any]:
    """The safety net's decision under fc from the checks another decision recorded ({'verdict',
    'epoch', 'criterion': {'source', 'checks'}}): the figures are the same, only the rule
    differs (e.g. with the prior), so nothing is predicted again."""
    crit = decided["criterion"]
    drop = ("acceptable", "why_not")
    checks = [{k: v for k, v in c.items() if k not in drop} for c in crit["checks"]]
    return choose(checks, crit["source"], fc)


# ---------------------------------------------------------------- units


def use_compile_cache(arg: str | None, work: Path) -> None:
    """Units compile the same train / fine-tune / predict functions again and again (about 20 s
    each for a training step on 2 cores): JAX's persistent cache compiles each once."""
    if arg != "none":
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(arg or work / ".jax_cache")))


def device_kind() -> str:
    """What runs this process's JAX work: 'cpu' or the accelerator's kind (its minutes are not
    CPU minutes)."""
    import jax

    d = jax.devices()[0]
    return "cpu" if d.platform == "cpu" else str(d.device_kind)


def unit(path: Path, fn: Any, compute: bool = True) -> dict[str, Any] | None:
    """Runs fn() unless path (its JSON result) exists; stores the result with its wall time.
    compute=False only reads: None when the result is absent."""
    if path.exists():
        return json.loads(path.read_text())
    if not compute:
        return None
    t0 = time.perf_counter()
    res = fn()
    res["wall_s"] = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(path, res)
    return res


def sum_unit_times(work: Path, group_of: Any, note: str) -> str:
    """Sums the measured wall times of the unit JSONs in `work` by group_of(file name) (None:
    not counted) -> a markdown list with a total; `note` says how the cores were shared."""
    groups: dict[str, float] = {}
    for f in sorted(work.glob("*.json")):
        key = group_of(f.name)
        if key is not None:
            groups[key] = groups.get(key, 0.0) + json.loads(f.read_text()).get("wall_s", 0.0)
    lines = [f"- {k}: {v / 60:.1f} min" for k, v in sorted(groups.items())]
    return (
        f"\nMeasured unit wall times ({note}):\n\n"
        + "\n".join(lines)
        + f"\n- all units: {sum(groups.values()) / 60:.1f} min\n"
    )


def write_figure(
    before: Path,
    after: Path,
    data: Dataset,
    png: Path,
    n: int = 4,
    before_weights: Path | None = None,
) -> None:
    """Fig. 3/4 of the paper on our data: for n target-site test images, the image, the std map
    of the source-trained model (10 samples; its run's weights.npz or before_weights), and
    overlays before and after VWSL (prediction red, ground truth green)."""
    import jax

    from nca_jax.predict import sample
    from nca_jax.render import overlay_rgb, save_image, std_rgb

    rows = []
    for run, weights in ((before, before_weights), (after, None)):
        c, prm = ckpt.load_run(run, weights)
        probs = sample(prm, c.model, data.images[:n], jax.random.key(0), 10)
        rows.append(probs)
    tiles = []
    for i in range(min(n, len(data))):
        img = (np.stack([data.images[i]] * 3, -1) * 255).astype(np.uint8)
        gt = data.masks[i] > 0.5
        tiles.append(
            np.concatenate(
                [
                    img,
                    std_rgb(rows[0][:, i].std(0)),
                    overlay_rgb(data.images[i], rows[0][:, i].mean(0) > 0.5, gt),
                    overlay_rgb(data.images[i], rows[1][:, i].mean(0) > 0.5, gt),
                ],
                axis=0,
            )
        )
    png.parent.mkdir(parents=True, exist_ok=True)
    save_image(png, np.concatenate(tiles, axis=1))
