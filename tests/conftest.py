"""Fixtures shared by the test suite (tests/ mirrors the deepseek package; helpers.py holds plain helpers)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds sync cost (and spins badly on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
