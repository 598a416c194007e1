"""The `deepseek` command. Each subcommand lives in its own module exposing `add_parser(subparsers)`, which
registers the parser and sets `func`; this file only lists them.

    deepseek --help ; deepseek <command> --help ; python -m deepseek.cli <command> ...

Building the parser imports no torch or transformers (so `--help` answers at once): a command imports what it
needs inside its run function.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = [  # each module's add_parser(subparsers) registers its subcommand(s)
    "deepseek.cli.generate",
    "deepseek.cli.train",
    "deepseek.cli.eval",
    "deepseek.cli.tokenizer",
    "deepseek.cli.serve",  # serve, keys, usage
    "deepseek.cli.recipe",
    "deepseek.cli.chat",
    "deepseek.cli.routing",
    "deepseek.cli.passkey",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek", description="DeepSeek-R1: train, evaluate, chat, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every flag with a default says it in --help: " (default: X)" where its help does not already."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)
        elif (action.option_strings and action.help and action.default not in (None, False, [], "", argparse.SUPPRESS)
              and "default" not in action.help):  # fmt: skip
            action.help += " (default: %(default)s)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"deepseek {args.command}: error: {exc}", file=sys.stderr)
        return 2
