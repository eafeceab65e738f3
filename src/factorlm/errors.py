"""User-facing errors: every mistake a user can make maps to one of these.

The CLI turns any ``FactorlmError`` into one line on stderr and exit status 2, so the message must
be a complete sentence that names the offending thing (the file, the initializer, the key).
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "DataError",
    "FactorlmError",
    "ModelLoadError",
    "PlanError",
]


class FactorlmError(Exception):
    """Base class of every error caused by user input rather than by a bug."""


class ModelLoadError(FactorlmError):
    """The model file or folder is missing, malformed, truncated or unsafe to load."""


class ConfigError(FactorlmError):
    """A command-line option, YAML key or value is invalid."""


class PlanError(FactorlmError):
    """A compression plan does not fit the model it is applied to."""


class DataError(FactorlmError):
    """Calibration or evaluation data is missing, empty or lacks a required column."""


class BackendUnavailableError(FactorlmError):
    """An optional backend (TensorRT, a GPU provider) is not installed."""
