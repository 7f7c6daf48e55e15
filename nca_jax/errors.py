"""The project's error types, in one module that imports nothing of the package.

Every module raises these and the command lines turn them into one line on stderr with exit
code 2 (:mod:`nca_jax.cli`); keeping them here breaks import circles (data <-> chexmask / dicom)
and lets any module catch any of them. ``str(e)`` is always one line naming the file or field.
"""

from __future__ import annotations


class NcaError(Exception):
    """Base of every error the project raises on purpose (bad input, impossible request)."""


class ConfigError(NcaError, ValueError):
    """A configuration file or value that cannot be used."""


class DataError(NcaError, ValueError):
    """Bad input data; str(e) is one line naming the file and the problem."""


class RunError(NcaError, ValueError):
    """A run folder or weights file that cannot be used; str(e) names the path."""


class TrainingError(NcaError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); str(e) says where and what was kept."""


class ExportError(NcaError, ValueError):
    """An export that cannot be made; str(e) says why."""


class DeviceError(NcaError, ValueError):
    """A model file, weights file or option the on-device stand-in cannot use."""
