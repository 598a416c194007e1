"""The `deepseek` command. Each subcommand lives in its own module exposing `add_parser(subparsers)`,
which registers the parser and sets `func`; this file only lists them."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = [
    # (module, one-line help) -- module.add_parser(subparsers) registers the subcommand(s)
    "deepseek.cli_generate",
    "deepseek.cli_train",
    "deepseek.cli_eval",
    "deepseek.cli_tokenizer",
    "deepseek.cli_serve",
    "deepseek.cli_recipe",
    "deepseek.cli_chat",
    "deepseek.cli_routing",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseek", description="DeepSeek-R1: train, evaluate, chat, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"deepseek {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
