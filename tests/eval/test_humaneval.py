"""HumanEval through the guarded runner: canonical solutions pass, every broken kind fails, and an infinite
loop, a sleep, a memory bomb, a huge file, an early exit and a network call are stopped and reported."""

from __future__ import annotations

import json

import pytest

from deepseek.cli import main
from deepseek.eval.humaneval import (
    BROKEN_KINDS,
    broken_completion,
    extract_code,
    load_problems,
    oracle,
    program,
)
from deepseek.eval.sandbox import Limits, network_namespace, run_program

FAST = Limits(timeout=3, cpu_seconds=2, memory_bytes=512 << 20)


def test_the_package_ships_164_problems():
    problems = load_problems()
    assert len(problems) == 164
    assert [p["task_id"] for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(ValueError, match=r"n must be in \[1, 164\], got 165"):
        load_problems(165)


def test_canonical_solutions_pass_on_a_subset():
    r = oracle("canonical", n=24, limits=FAST)
    assert (r["n"], r["solved"], r["pass@1"]) == (24, 24, 1.0)
    assert r["statuses"] == {"passed": 24}


def test_the_broken_set_scores_zero():
    r = oracle("broken", n=36, limits=FAST)  # every broken kind 6 times
    assert (r["solved"], r["pass@1"]) == (0, 0.0)
    # the exits are caught as such, never read as a pass
    kinds = [broken_completion(p, i)[0] for i, p in enumerate(load_problems(36))]
    exits = [pp["status"] for pp, kind in zip(r["per_problem"], kinds) if kind in ("sys.exit(0)", "os._exit(0)")]
    assert exits == ["exited early"] * 12
    assert set(kinds) == set(BROKEN_KINDS)


def test_infinite_loop_and_sleep_are_stopped():
    spin = run_program("while True:\n    pass\n", FAST)
    assert (spin.passed, spin.status) == (False, "timed out") and spin.seconds < 5
    sleep = run_program("import time\ntime.sleep(60)\n", FAST)
    assert (sleep.passed, sleep.status, sleep.detail) == (False, "timed out", "killed after 3 s wall clock")
    assert sleep.seconds < 5


def test_memory_bomb_is_stopped():
    one = run_program("x = bytearray(8 << 30)\n", FAST)
    assert (one.passed, one.status, one.detail) == (False, "memory", "MemoryError")
    growing = run_program("a = []\nwhile True:\n    a.append([0] * 10**6)\n", FAST)
    assert (growing.passed, growing.status) == (False, "memory")


def test_files_exits_and_network_are_guarded():
    big = run_program("open('big', 'wb').write(b'x' * (64 << 20))\n", FAST)
    assert big.status == "failed" and "File too large" in big.detail
    for exit_code in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
        assert run_program(exit_code, FAST).status == "exited early", exit_code
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", FAST)
    assert net.status == "failed" and "network access is disabled" in net.detail
    if network_namespace():  # the raw C socket module too: nothing to reach in an empty namespace
        raw = run_program("import _socket\n_socket.socket().connect(('1.1.1.1', 53))\n", FAST)
        assert raw.status == "failed" and "unreachable" in raw.detail
    ok = run_program("print('hello')\nassert sum(range(10)) == 45\n", FAST)
    assert (ok.passed, ok.status) == (True, "passed")


def test_code_is_extracted_from_a_chat_answer():
    p = load_problems(1)[0]
    whole = f"<think>\nplan\n</think>\n\n```python\n{p['prompt']}{p['canonical_solution']}```"
    assert run_program(program(p, extract_code(p, whole)), FAST).passed
    body = "<think>\nplan\n</think>\n\n" + p["canonical_solution"]
    assert run_program(program(p, extract_code(p, body)), FAST).passed
    assert extract_code(p, "<think>\nnever closed") == ""
    assert run_program(program(p, "42"), FAST).status == "failed"  # a syntax error is a failure


def test_cli_oracle_and_bad_input(capsys):
    assert main(["eval", "--task", "humaneval", "--oracle", "broken", "--n", "6", "--timeout", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["oracle"], line["n"], line["solved"], line["pass@1"]) == ("broken", 6, 0, 0.0)
    with pytest.raises(SystemExit):
        main(["eval", "--task", "humaneval", "--oracle", "nonsense"])
    assert main(["eval", "--task", "addition", "--oracle"]) == 2
    assert "use it with --task humaneval alone" in capsys.readouterr().err
