"""The one command-line convention of every entry point (train, finetune, evaluate, export,
demo, bench, capture, phantoms, device_train):

- ``main(argv: list[str] | None) -> int`` parses its arguments, does the work and returns the
  exit code; bad input raises an :class:`~nca_jax.errors.NcaError` (never prints it itself);
- ``cli()`` runs ``main`` through :func:`run_cli`: such an error becomes one line on stderr
  (``error: ...``) and exit code 2, Ctrl-C exit code 130;
- the top-level scripts (``train.py``, ...) and ``python -m nca_jax.X`` call ``cli()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from nca_jax.errors import ConfigError, DataError, NcaError, RunError

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (NcaError, ConfigError, DataError, RunError)


def call_main(
    main: Callable[[list[str] | None], int | None],
    argv: list[str] | None = None,
    extra: tuple[type[BaseException], ...] = (),
) -> int:
    """main(argv) under the convention, returning the exit code instead of exiting (for tests
    and for calling one command from another)."""
    try:
        return main(argv) or 0
    except EXPECTED_ERRORS + extra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run_cli(main: Callable[[], int | None], extra: tuple[type[BaseException], ...] = ()) -> None:
    """Runs main() and exits: a bad-input error becomes one line on stderr and exit code 2."""
    sys.exit(call_main(lambda _argv: main(), None, extra))
