"""No orphan writers: a command started with --parent-pid stops when its parent dies, and killing
Snakemake itself stops the cache-teacher job it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def test_command_exits_when_its_parent_dies(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    code = (
        "import logging, time; logging.basicConfig(); "
        "from pipeline.lifeline import watch_parent; "
        f"watch_parent({parent.pid}, interval=0.2); "
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "time.sleep(120)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not psutil.Process(child.pid).children():
            time.sleep(0.1)
        grandchildren = psutil.Process(child.pid).children(recursive=True)
        assert grandchildren
        parent.kill()
        parent.wait()
        assert child.wait(timeout=15) == 3
        assert "parent process" in child.stderr.read()
        assert not _wait_gone(grandchildren, 10), "the command's own children outlived it"
    finally:
        _kill_all([psutil.Process(child.pid)] if child.poll() is None else [])
        parent.kill()


def test_killing_snakemake_stops_the_cache_teacher_job(tmp_path):
    """Issue 11 item 10: SIGKILL snakemake while `cache_teacher` runs; its `cache-teacher` child
    (and the dask workers) must stop within seconds instead of writing on as an orphan."""
    main = tmp_path / "main.yaml"
    main.write_text(
        yaml.safe_dump(
            {
                "_base_": str(ROOT / "configs/reg_sam/regnet_distill.yaml"),
                "data": {
                    "root": str(tmp_path / "data"),
                    "synthetic": {"num_train": 600, "num_val": 2, "image_size": [64, 64]},
                },
                "cache": {"root": str(tmp_path / "cache"), "pca_samples": 4, "n_workers": 1},
                "teacher_adapt": {"enabled": False},
            }
        )
    )
    spec = tmp_path / "ablation.yaml"
    spec.write_text(yaml.safe_dump({"base": str(main)}))
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "cache_teacher",
        "--cores",
        "2",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(ROOT / "configs/workflow.yaml"),
        "--config",
        f"main={main}",
        f"ablation={spec}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the jobs import this checkout's pipeline
    smk = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "cache").glob("*/manifest.json")):
            assert smk.poll() is None, "snakemake ended before the cache was started"
            time.sleep(0.2)
        assert list((tmp_path / "cache").glob("*/manifest.json")), "the cache job never started"
        workers = psutil.Process(smk.pid).children(recursive=True)
        jobs = [p for p in workers if "cache-teacher" in " ".join(p.cmdline())]
        assert jobs, [p.cmdline() for p in workers]
        smk.send_signal(signal.SIGKILL)
        smk.wait()
        alive = _wait_gone(workers, 20)
        assert not alive, f"orphans still running: {[p.cmdline()[:4] for p in alive]}"
        assert not (next((tmp_path / "cache").glob("*")) / "COMPLETE.json").exists()
    finally:
        _kill_all(workers)
        if smk.poll() is None:
            smk.kill()
