"""Checks of command-line values shared by several subcommands (not a subcommand itself).

Run before any work, so that a mistake costs one line and no half-written output.
"""
from __future__ import annotations

from pathlib import Path

from megatron_upcycle.errors import UserError


def check_output_dir(path: str, flag: str, must_not_exist: bool = False) -> Path:
    """``path`` as a Path if it can become an output directory; else a UserError naming it."""
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{flag} {out} is an existing file, not a directory; choose another {flag}")
        if must_not_exist:
            raise UserError(f"{flag} {out} already exists; choose a new output directory")
        return out
    for parent in out.parents:  # the nearest existing folder above it must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {out}: {parent} is a file, not a directory; choose another {flag}")
            break
    return out


def check_at_least(flag: str, value: int | float | None, minimum: int | float) -> None:
    """A UserError when a numeric option is below its minimum (argparse checks only the type)."""
    if value is not None and not value >= minimum:  # written so that nan fails too
        raise UserError(f"{flag} must be >= {minimum:g}, got {value}")
