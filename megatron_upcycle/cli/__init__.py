"""The ``upcycle`` command.

Each subcommand is one module in this package exposing ``add_parser(subparsers)``
and ``run(args) -> int``. Modules import torch/Megatron inside ``run`` so that
``upcycle --help`` and the analysis commands stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megatron_upcycle import __version__
from megatron_upcycle.errors import UserError
from megatron_upcycle.exit_codes import EXIT_USER_ERROR, RequeueRequested, report

# Module names under megatron_upcycle.cli, in --help order.
SUBCOMMAND_MODULES = [
    "model",
    "data",
    "convert",
    "verify",
    "inspect",
    "export_hf",
    "sweep",
    "fit",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"upcycle: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RequeueRequested as exc:  # `upcycle convert` stopped by a signal, partial output removed
        return report("upcycle", exc)
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())
