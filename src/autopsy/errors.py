"""The errors autopsy raises. Every failure a user can cause is an :class:`AutopsyError`.

The CLI turns each into one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

__all__ = ["AutopsyError", "InputError", "MissingDependencyError", "UnreadableError", "UsageError"]


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
