"""Errors that the CLI turns into one clear line and an exit code."""

from __future__ import annotations


class VmqError(Exception):
    """A user-facing failure: bad input, missing file, wrong architecture.

    The CLI prints ``error: <message>`` on stderr and exits with ``exit_code``.
    """

    exit_code = 1


class UsageError(VmqError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2
