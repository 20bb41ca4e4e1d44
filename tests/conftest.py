"""Shared test settings."""

import os
from pathlib import Path

import pytest
import torch

from pipeline.data.synthetic import generate_synthetic_coco_panoptic

MAX_AUTO_WORKERS = 8  # each worker may hold a vit_b teacher and its activations (a few GB)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, reduced by a cgroup v2 CPU quota
    (``/sys/fs/cgroup/cpu.max``, e.g. a container given 2 CPUs on a 64-core host)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus or 1, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus or 1)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per usable CPU (at most :data:`MAX_AUTO_WORKERS`), instead of
    xdist's count of physical cores on the whole host; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still
    decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return min(usable_cpus(), MAX_AUTO_WORKERS)


# Under pytest-xdist (the README's test command runs one worker per CPU, a file per worker), a
# worker's module fixtures share the cores with the other workers: give each its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, usable_cpus() // _WORKERS))


@pytest.fixture(scope="session", autouse=True)
def _own_cache_home(tmp_path_factory):
    """Keep what the code under test caches in ``$XDG_CACHE_HOME`` (the timm model names of
    :func:`pipeline.config.is_timm_model`) out of the user's home; subprocesses inherit it."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


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
