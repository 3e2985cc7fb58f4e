"""The one user-facing error type: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations


class PhivisionError(Exception):
    """A mistake in the user's input (file, row, field, flag) that deserves a one-line message, not a traceback."""
