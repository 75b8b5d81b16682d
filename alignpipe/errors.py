"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input, usage or environment: one line, exit code 2, no traceback (unless --debug)."""

    exit_code = 2


class LockedError(UserError):
    """Another live process holds the output's lock."""
