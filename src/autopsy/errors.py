"""The errors autopsy raises. Every failure a user can cause is an :class:`AutopsyError`.

The CLI turns each into one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

__all__ = [
    "AutopsyError",
    "first_line",
    "FrameError",
    "InputError",
    "MissingDependencyError",
    "RegistrationError",
    "UnreadableError",
    "UsageError",
]


class AutopsyError(Exception):
    """Base class: a failure with a one-line message meant for a person."""

    exit_code = 2


class UsageError(AutopsyError):
    """The command line or the call was wrong (unknown signature, bad option value)."""


class InputError(AutopsyError):
    """The input path does not exist or holds nothing autopsy can read."""


class UnreadableError(AutopsyError):
    """A file exists but cannot be read at all (not even partially salvaged)."""


class MissingDependencyError(AutopsyError):
    """An optional dependency is needed for this input or command."""


class FrameError(AutopsyError):
    """A frame handed to autopsy does not have the canonical shape."""


class RegistrationError(AutopsyError, TypeError):
    """A detector or importer was declared wrong (a duplicate name, a parameter without a default, an unknown
    metric in ``requires``): raised when it is registered, at import time, never later."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when it has none), for a one-line error."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
