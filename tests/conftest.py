"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors run fastest, and most repeatably, on one intra-op thread (2-core CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
