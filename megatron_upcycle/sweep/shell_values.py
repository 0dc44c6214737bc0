"""The one place that checks, and the one function that quotes, every value that
reaches a rendered sbatch script (issue #12).

A job script is run by bash on the cluster with the user's rights: a newline in
an experiment name or an output path would end the ``#SBATCH`` or assignment
line it sits in and run the rest as a command. So each kind of value has one
check, applied before anything is rendered or written, and everything but the
intentional shell (``setup`` lines) is rendered through ``quote``:

  names    experiment / run / job / array-group names, the job name prefix:
           only ``[A-Za-z0-9._+=-]`` (they name files, jobs and log files too)
  words    account, partition, qos, constraint, mem: one word without whitespace or
           control characters (a constraint is an expression like ``a100|h100``,
           a partition may be a list ``gpu,gpu-long``)
  paths    run, log and working directories: anything but control characters
  args     command-line arguments: anything but NUL (quoting keeps the rest inert)
  shell    ``setup`` lines: verbatim shell by design, but no NUL
  options  ``extra_sbatch``: ``--name`` or ``--name=value`` with a clean value
"""
from __future__ import annotations

import re
import shlex

from megatron_upcycle.errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9._+=-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_OPTION = re.compile(r"(--?[A-Za-z][A-Za-z0-9-]*)(?:=(.*))?", re.DOTALL)

# sbatch reads its #SBATCH lines with quotes like a shell, and bash reads the rest:
# one quoting function serves both.
quote = shlex.quote


def check_name(value, what: str) -> str:
    text = str(value)
    if not _NAME.fullmatch(text):
        raise ConfigError(f"{what} must be letters, digits and . _ + = - only (got {text!r})")
    return text


def check_word(value, what: str) -> str:
    text = str(value)
    if not text or _CONTROL.search(text) or any(c.isspace() for c in text):
        raise ConfigError(f"{what} must be one word without spaces or control characters (got {text!r})")
    return text


def check_path(value, what: str) -> str:
    text = str(value)
    if not text or _CONTROL.search(text):
        raise ConfigError(f"{what} must be a non-empty path without control characters "
                          f"(newline, carriage return, NUL...); got {text!r}")
    return text


def check_arg(value, what: str) -> str:
    text = str(value)
    if "\x00" in text:
        raise ConfigError(f"{what} contains a NUL character: {text!r}")
    return text


def check_shell_line(value, what: str) -> str:
    # Setup lines are shell on purpose; like arguments, only a NUL is refused.
    return check_arg(value, what)


def check_sbatch_option(value, what: str) -> str:
    """``--exclusive`` or ``--mail-type=FAIL``, with any "#SBATCH " prefix stripped."""
    text = str(value).strip().removeprefix("#SBATCH").strip()
    if not _SBATCH_OPTION.fullmatch(text) or _CONTROL.search(text):
        raise ConfigError(f"{what}: {text!r} is not an sbatch option like '--exclusive' or '--mail-type=FAIL'")
    return text


def sbatch_option(name: str, value=None) -> str:
    """``--name=value`` for an #SBATCH line, the value quoted."""
    return name if value is None else f"{name}={quote(str(value))}"


def quote_sbatch_option(text: str) -> str:
    """A checked extra_sbatch option with its value quoted."""
    name, _, value = text.partition("=")
    return sbatch_option(name, value if "=" in text else None)
