"""Fixtures of the serving tests (plain helpers: serve_support.py)."""

from __future__ import annotations

import pytest
from serve_support import Postgres, postgres_bin


@pytest.fixture(scope="module")
def pg_url():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed: run scripts/ci_services.sh")
    with Postgres() as pg:
        yield pg.url
