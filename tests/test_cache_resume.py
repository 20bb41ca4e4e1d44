"""Crash safety of stage one: SIGKILL a cache build mid-run, rerun it, and get the store an
uninterrupted run writes, bit for bit (int8 storage, one skipped image)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.fingerprint import cache_dir
from pipeline.cache.runner import build_cache
from pipeline.cache.store import STATUS_DONE, STATUS_TODO, CacheStore
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from tests.cache_helpers import store_contents

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base.yaml"
N = 10
NO_SEGMENTS = 2


def overrides(data_root, cache_root):
    return [
        f"data.root={data_root}",
        f"cache.root={cache_root}",
        f"data.synthetic.num_train={N}",
        "data.synthetic.num_val=1",
        "data.synthetic.image_size=[96, 128]",
        "cache.dtype=int8",
    ]


def wait_for_group_exit(pgid, timeout=10.0):
    """True once no process of the group is left (dask's nanny/worker included)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    paths = generate_synthetic_coco_panoptic(
        root / "data", num_train=N, num_val=1, image_size=(96, 128), progress=False
    )
    _, json_path, png_dir = paths["train"]
    from PIL import Image

    doc = json.loads(json_path.read_text())
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(
        png_dir / doc["annotations"][NO_SEGMENTS]["file_name"]
    )
    return root


def test_sigkill_then_rerun_equals_an_uninterrupted_run(split, tmp_path):
    clean_cfg = load_config(BASE, overrides(split / "data", split / "clean"))
    clean = build_cache(clean_cfg, n_workers=1, progress=False)

    args = overrides(split / "data", tmp_path / "killed")
    cfg = load_config(BASE, args)
    path = cache_dir(cfg, "train")
    script = tmp_path / "run_cache.py"
    script.write_text(
        textwrap.dedent(f"""
        from pipeline.cache.runner import build_cache
        from pipeline.config import load_config
        if __name__ == "__main__":
            build_cache(load_config({str(BASE)!r}, {args!r}), n_workers=1, progress=False)
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        done = 0
        while done < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the build did not finish 3 images in time"
            if (path / "manifest.json").is_file():
                try:
                    done = int((CacheStore.open(path).status() == STATUS_DONE).sum())
                except Exception:  # the group is still being created
                    done = 0
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: client, scheduler, nanny, worker
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert wait_for_group_exit(proc.pid), "dask processes survived the kill"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()

    assert not (path / "COMPLETE.json").exists()
    status = CacheStore.open(path).status()
    todo = int((status == STATUS_TODO).sum())
    assert 3 <= int((status == STATUS_DONE).sum()) and todo > 0, status  # killed mid-run

    resumed = build_cache(cfg, n_workers=1, progress=False)
    assert resumed == path and resumed.name == clean.name
    summary = json.loads((path / "COMPLETE.json").read_text())
    assert summary["images_this_run"] == todo  # done images were not recomputed
    assert summary["skip_reasons"] == {"no_segments": 1}
    a, b = store_contents(clean), store_contents(path)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.endswith("/scale") for k in a)  # int8 storage was exercised
    assert not list(path.rglob("*.partial"))
