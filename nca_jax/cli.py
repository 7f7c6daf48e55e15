"""Shared command-line plumbing: one-line errors with exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from nca_jax.checkpoint import RunError
from nca_jax.config import ConfigError
from nca_jax.data import DataError

EXPECTED_ERRORS = (ConfigError, DataError, RunError)


def run_cli(main: Callable[[], int | None], extra: tuple[type[BaseException], ...] = ()) -> None:
    """Runs main(); a bad-input error becomes one line on stderr and exit code 2."""
    try:
        code = main()
    except EXPECTED_ERRORS + extra as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
