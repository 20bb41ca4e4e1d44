"""Shared test settings."""

import os
from pathlib import Path

import pytest
import torch

from pipeline.data.synthetic import generate_synthetic_coco_panoptic

# Under pytest-xdist (the README's test command runs one worker per core, a file per worker), a
# worker's module fixtures share the cores with the other workers: give each its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors run fastest, and most repeatably, on one intra-op thread (2-core CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A tiny synthetic split (4 train, 2 val, 64x64) shared by the small training tests; a test
    module may define its own ``data_root`` instead."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco_panoptic(
        root, num_train=4, num_val=2, image_size=(64, 64), seed=3, progress=False
    )
    return root
