"""Help a new user can read: every flag of every `deepseek` command is described, and a flag with a default
says what it is; eval lists its task names."""

from __future__ import annotations

import argparse

from deepseek.cli import build_parser


def _commands(parser, prefix="deepseek"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def test_every_flag_is_described_with_its_default():
    missing, no_default = [], []
    for name, parser in _commands(build_parser()):
        for a in parser._actions:
            if isinstance(a, argparse._HelpAction | argparse._SubParsersAction):
                continue
            flag = f"{name} {'/'.join(a.option_strings) or a.dest}"
            if not a.help:
                missing.append(flag)
            elif a.option_strings and a.default not in (None, False, [], "", argparse.SUPPRESS) \
                    and "default" not in a.help:  # fmt: skip
                no_default.append(f"{flag} (default {a.default!r})")
    assert missing == [], "flags without help"
    assert no_default == [], "defaults not shown"


def test_eval_help_lists_the_tasks_and_the_task_limit(capsys):
    import pytest

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("addition", "multiplication", "countdown", "sorting", "passkey", "gsm_symbolic_heldout", "humaneval"):
        assert name in text
    assert "default: from the task" in text
