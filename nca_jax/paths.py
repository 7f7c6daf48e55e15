"""Output paths checked before any work starts, so that a command never harms a user's files.

Rules for every entry point's --out: it may not equal, contain or sit inside one of the
command's inputs; its nearest existing ancestor must be a writable folder; a folder that
already exists is only written into (or replaced) when this project made it, which the
caller recognises by a marker file (config.json for a run, summary.json for an evaluation);
a file output needs a writable folder and must not be a folder itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from nca_jax.checkpoint import RunError


def _overlap(out: Path, inputs: Iterable[str | os.PathLike | None]) -> str | None:
    o = out.resolve()
    for i in inputs:
        if i is None:
            continue
        p = Path(i).resolve()
        if o == p:
            return f"is the input {i}"
        if p in o.parents:
            return f"lies inside the input {i}"
        if o in p.parents:
            return f"contains the input {i}"
    return None


def _writable_ancestor(out: Path) -> None:
    a = out.resolve().parent
    while not a.exists():
        a = a.parent
    if not a.is_dir():
        raise RunError(f"{out}: cannot be created ({a} is a file, not a folder)")
    if not os.access(a, os.W_OK | os.X_OK):
        raise RunError(f"{out}: cannot be created ({a} is not writable)")


def check_output_folder(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    *,
    marker: str | None = None,
    what: str = "output folder",
) -> Path:
    """Checks --out for a folder output (see module doc); returns it as a Path.

    An existing non-empty folder passes only when it holds `marker` (made by this project);
    the caller then decides whether to resume, refuse or replace it."""
    out = Path(out)
    why = _overlap(out, inputs)
    if why:
        raise RunError(f"{out}: the {what} {why}; choose another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: is a file, not a folder")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise RunError(f"{out}: is not writable")
        if any(out.iterdir()) and (marker is None or not (out / marker).is_file()):
            raise RunError(
                f"{out}: exists and holds files this project did not write "
                f"(no {marker or 'marker'}); choose an empty or new folder"
            )
    else:
        _writable_ancestor(out)
    return out


def check_output_file(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Checks --out for a file output: not an input, not a folder, in a writable folder that
    exists (nothing is created)."""
    out = Path(out)
    why = _overlap(out, inputs)
    if why:
        raise RunError(f"{out}: the output file {why}; choose another --out")
    if out.is_dir():
        raise RunError(f"{out}: is a folder; --out names the file to write")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise RunError(f"{out}: its folder {out.parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"{out}: its folder {out.parent} is not writable")
    return out
