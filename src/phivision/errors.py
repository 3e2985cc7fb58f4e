"""The one user-facing error type: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations


class PhivisionError(Exception):
    """A mistake in the user's input (file, row, field, flag) that deserves a one-line message, not a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors span several; a PhivisionError is one), or its
    type's name when it has no message."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
