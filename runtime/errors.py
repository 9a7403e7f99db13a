"""Error hierarchy shared by every stage.

Messages say what failed, what was received, what was expected, and what to do (a ``hint``). The CLI prints
``str(err)`` as one line and exits 2 for ``UsageError``-like faults (bad input) and 1 for failed checks.
"""

from __future__ import annotations


class UnirefError(Exception):
    """Base class: a user-facing fault with an actionable one-line message."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = " ".join(message.splitlines())  # one line, even when it quotes a multi-line repr
        hint = " ".join(hint.splitlines()) if hint else hint
        self.message = message
        self.hint = hint
        super().__init__(f"{message} Hint: {hint}" if hint else message)


class InputError(UnirefError):
    """Bad request input: an unreadable image, a prompt too long, an unknown option value."""


class ConfigError(InputError, ValueError):
    """A model configuration this build cannot run (e.g. a scheduler option that is not ported)."""


class PackingError(InputError):
    """A reference set that cannot be packed into the requested budget."""


class ManifestError(UnirefError):
    """A missing, damaged or mismatched artifact directory."""


class ExportError(UnirefError):
    """Exporting a graph to ONNX failed or its validation did not pass."""

    exit_code = 1


class CalibrationError(UnirefError):
    """FP8 calibration failed or missed its accuracy target."""

    exit_code = 1


class EngineBuildError(UnirefError):
    """TensorRT engine build failed."""

    exit_code = 1


class BackendError(UnirefError):
    """A backend could not load or run a graph."""


class MissingDependencyError(UnirefError):
    """An optional dependency needed for the requested feature is not installed."""


class CheckFailed(UnirefError):
    """A validation or comparison did not meet its tolerance (exit code 1)."""

    exit_code = 1
