"""The ``upcycle`` command.

Each subcommand is one module in this package exposing ``add_parser(subparsers)``
and ``run(args) -> int``. Modules import torch/Megatron inside ``run`` so that
``upcycle --help`` and the analysis commands stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys

from megatron_upcycle import __version__
from megatron_upcycle.exit_codes import run_entry

# argparse takes a value only if it looks like a negative number ('-5', '-.5');
# '-1e9' it reads as an unknown option and answers "expected one argument" with
# a usage block. Accepting exponent notation lets such a value reach the
# command's own range check ("--n1 must be > 0, got -1e9"). No option of this
# CLI is spelled like a number, so nothing is shadowed.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER  # sub-parsers are made of this class too


# Module names under megatron_upcycle.cli, in --help order.
SUBCOMMAND_MODULES = [
    "model",
    "data",
    "convert",
    "verify",
    "inspect",
    "export_hf",
    "bench_inference",
    "eval",
    "sweep",
    "fit",
    "selftest",
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="upcycle",
        description="Sparse-upcycling research on Megatron-Core. Units: D in tokens, N in parameters.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-upcycle {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"megatron_upcycle.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"megatron_upcycle.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(subparsers)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse's own message and exit 2
    # One mapping for every subcommand: UserError -> one line, exit 2; Ctrl-C -> 130;
    # anything else -> one line naming the log file that holds the traceback, exit 1.
    return run_entry("upcycle", lambda: args.run(args))


def console_main() -> None:
    sys.exit(main())
