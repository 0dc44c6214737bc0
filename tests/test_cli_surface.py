"""The command-line surface is small and deliberate: adding or renaming a command fails here."""
import argparse

from megatron_upcycle.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_top_level_commands():
    assert sorted(_subcommands(build_parser())) == [
        "advise", "bench-inference", "convert", "data", "eval", "export-hf", "fit", "inspect", "model", "selftest",
        "sweep", "verify"]


def test_nested_actions():
    commands = _subcommands(build_parser())
    assert sorted(_subcommands(commands["sweep"])) == ["collect", "plan", "report", "run", "status"]
    assert sorted(_subcommands(commands["model"])) == ["info", "list"]
    assert sorted(_subcommands(commands["data"])) == ["info", "prepare"]
