"""`deepseek train` private flags: bad values are one-line errors before any model is loaded; the flags map to
the SDK's privacy dict."""

from __future__ import annotations

import argparse

import pytest

from deepseek.cli import main
from deepseek.cli.train import add_parser, privacy_from_args


def parse(argv):
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    return p.parse_args(["train", *argv])


def test_flags_map_to_the_privacy_dict():
    assert privacy_from_args(parse([])) is None
    assert privacy_from_args(parse(["--private"])) == {}
    got = privacy_from_args(parse(["--dp-epsilon", "3", "--dp-delta", "1e-6", "--dp-max-grad-norm", "0.5",
                                   "--dp-accountant", "rdp"]))  # fmt: skip
    assert got == {"epsilon": 3.0, "delta": 1e-6, "max_grad_norm": 0.5, "accountant": "rdp"}


@pytest.mark.parametrize("argv, match", [(["--dp-epsilon", "0"], "epsilon must be a number > 0"),
                                         (["--dp-delta", "2"], "delta must be in"),
                                         (["--dp-epsilon", "-1", "--private"], "epsilon must be a number > 0")])  # fmt: skip
def test_bad_values_are_one_line_errors(argv, match, capsys):
    assert main(["train", "--init-from", "nowhere", "--data", "x.jsonl", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_private_needs_a_model_and_data():
    with pytest.raises(SystemExit, match="needs --init-from"):
        main(["train", "--private"])
