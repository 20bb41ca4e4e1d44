"""Stop a long command when the process that started it dies, so no orphan keeps writing.

Snakemake runs each rule as ``bash -c '<command>'``; killing Snakemake itself (SIGKILL, a lost
login, a cluster job's controller) leaves that shell and its command running. A cache build or a
training run left behind keeps writing into the store or run folder while a rerun starts a second
writer. The workflow's rules therefore pass ``--parent-pid $PPID`` (their Snakemake process):
:func:`watch_parent` checks once a second that this process still exists (same pid *and* start
time, so a recycled pid does not count) and otherwise kills this process's descendants (dask
workers, DataLoader workers) and exits with status 3. Every write of the cache and of checkpoints
is atomic, so this stop is as safe as a SIGKILL, and a rerun resumes.
"""

from __future__ import annotations

import logging
import os
import threading

import psutil

__all__ = ["PARENT_GONE_EXIT_CODE", "watch_parent"]

log = logging.getLogger(__name__)

PARENT_GONE_EXIT_CODE = 3


def _alive(proc: psutil.Process, started: float) -> bool:
    try:
        return (
            proc.is_running()
            and proc.create_time() == started
            and proc.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False


def _stop(pid: int) -> None:
    log.error(
        "parent process %d is gone: stopping this command and its workers so that no "
        "orphan keeps writing (finished work is kept; rerun to resume)",
        pid,
    )
    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(PARENT_GONE_EXIT_CODE)


def watch_parent(pid: int, interval: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process when process ``pid`` ends.

    Arguments:
      pid: the process to outlive no longer (e.g. Snakemake's, passed by the rule as ``$PPID``).
      interval: seconds between checks.

    Returns:
      the watching thread. If ``pid`` does not exist any more, the process stops at once.
    """
    try:
        proc = psutil.Process(pid)
        started = proc.create_time()
    except psutil.Error:
        _stop(pid)
        raise AssertionError("unreachable") from None  # pragma: no cover
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval):
            if not _alive(proc, started):
                _stop(pid)

    thread = threading.Thread(target=watch, name=f"watch-parent-{pid}", daemon=True)
    thread.start()
    return thread
