"""One torch thread for these tests: on a shared 2-core machine, 2 OpenMP threads per process are
several times slower than one (they spin against the other processes), and peers run as processes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
