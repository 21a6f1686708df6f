"""Error hierarchy and exit codes.

Every error the user can cause is an :class:`MmprepError`: the CLI prints its message (which names the file,
line or value) and its hint on one or two lines of stderr and exits with :attr:`MmprepError.exit_code`.
Tracebacks appear only when ``MMPREP_DEBUG=1``.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ConfigError",
    "InputError",
    "MissingDependencyError",
    "MmprepError",
    "RunFailed",
    "UsageError",
    "where",
]

EXIT_OK = 0
EXIT_FAILED = 1  # findings (with --fail-on) or a failed run
EXIT_USAGE = 2  # bad flags, bad config, unreadable or malformed input files
EXIT_INTERRUPTED = 130


def where(path: object, line: int | None = None) -> str:
    """Format a location as ``path:line`` (or just ``path``)."""
    return f"{path}:{line}" if line is not None else str(path)


class MmprepError(Exception):
    """A known error: one clear line for the user, an optional hint, and an exit code."""

    exit_code: int = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(MmprepError):
    """Bad flags or flag combinations."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A bad ``--config`` file or an invalid configuration value."""


class InputError(UsageError):
    """An input file that is missing, unreadable or malformed as a whole (not a single bad row)."""


class MissingDependencyError(UsageError):
    """An optional dependency is not installed; the hint says how to install it."""

    def __init__(self, package: str, extra: str, *, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed",
            hint=f"install it with: pip install 'mmprep[{extra}]'",
        )
        self.package = package


class RunFailed(MmprepError):
    """The run itself failed (too many rejects, a worker died, output could not be written)."""

    exit_code = EXIT_FAILED
