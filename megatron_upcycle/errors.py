"""User-facing errors.

A ``UserError`` is a mistake the user can fix (bad config, missing file, K > E).
Every entry point prints its message on one line and exits with code 2; it never
shows a traceback for one. The exit codes and the one mapping from errors to them
are in ``megatron_upcycle.exit_codes``.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


class ConfigError(UserError):
    """A configuration value or key is invalid."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, or not what the command expects."""
