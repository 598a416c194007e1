"""benchmarks/privacy.py's held-out records are disjoint from its training data by construction: no held-out
account appears anywhere in the training rows (canaries and membership-inference members included), and no
held-out prompt or record text is a training one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench():
    spec = importlib.util.spec_from_file_location("bench_privacy", ROOT / "benchmarks" / "privacy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def accounts(rows) -> set[str]:
    return {a for r in rows for a in re.findall(r"\d{5}", r["prompt"])}


def test_heldout_accounts_never_in_training():
    b = bench()
    train, test, canaries, members = b.build_data(8000, 500)
    assert len(train) == 8000 + sum(b.CANARY_REPEATS) and len(test) == 500
    test_accts = accounts(test)
    assert len(test_accts) == 500, "every held-out record has its own account"
    assert all(b.held_out_account(int(a)) for a in test_accts)
    assert not test_accts & accounts(train), "a held-out account is in the training rows"
    assert not test_accts & accounts([c for _, c in canaries]) and not test_accts & accounts(members)
    record = lambda r: r["prompt"].split(".")[0]  # noqa: E731  (the record without its question)
    assert not {record(r) for r in test} & {record(r) for r in train}
    assert sorted(b.CANARY_REPEATS) == [sum(r == c for r in train) for _, c in canaries]
    assert b.build_data(8000, 500) == (train, test, canaries, members), "deterministic"
