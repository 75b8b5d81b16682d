"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input, usage or environment: one line, exit code 2, no traceback (unless --debug)."""

    exit_code = 2


class LockedError(UserError):
    """Another live process holds the output's lock."""


def first_line(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` of an exception, for one-line errors (empty messages included)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines and lines[0] else type(e).__name__
