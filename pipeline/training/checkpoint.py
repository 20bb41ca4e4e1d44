"""Atomic checkpoints with everything needed for an exact resume.

Every checkpoint RegSAM reads is loaded with ``torch.load(weights_only=True)``: a file can hold
tensors, numbers, strings and containers of them, never code (a crafted pickle raises
:class:`UntrustedCheckpointError` before anything in it runs). The RNG states are stored in that
vocabulary (numpy's Mersenne-Twister key as a list of ints).

The trainer keeps the newest ``training.keep_checkpoints`` checkpoints (``last.pth``, then
``last.1.pth``, ...; :func:`rotate_checkpoints`) and resumes from the newest readable one
(:func:`load_latest_checkpoint`), with a warning when it has to fall back.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.safe_load import CheckpointReadError, UntrustedCheckpointError, safe_torch_load

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointReadError",
    "UntrustedCheckpointError",
    "checkpoint_candidates",
    "load_checkpoint",
    "load_latest_checkpoint",
    "StudentFileError",
    "rotate_checkpoints",
    "rng_state",
    "safe_torch_load",
    "save_atomic",
    "set_rng_state",
]

_ROTATED_NAME = re.compile(r"^last(?:\.(\d+))?\.pth$")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, as tensors and plain lists/tuples only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states of :func:`rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file, fsync it, then rename over ``path``.

    A kill at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint written by :func:`save_atomic` (weights_only)."""
    return safe_torch_load(path, "checkpoint")


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, newest first: ``last.pth``, ``last.1.pth``, ...

    (:func:`rotate_checkpoints` shifts them before each save.)"""
    ckpt_dir = Path(ckpt_dir)
    found = []
    for p in ckpt_dir.glob("last*.pth"):
        m = _ROTATED_NAME.match(p.name)
        if m:
            found.append((int(m.group(1) or 0), p))
    return [p for _, p in sorted(found)]


def rotate_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Make room for a new ``last.pth`` keeping ``keep`` checkpoints in all.

    ``last.{k-1}.pth`` becomes ``last.{k}.pth`` (renames, each atomic), then ``last.1.pth``
    becomes a hard link to (or, where links are unsupported, a copy of) the current
    ``last.pth``, which stays in place until :func:`save_atomic` replaces it: a kill at any
    moment leaves ``last.pth`` readable. Files beyond ``keep`` are deleted.
    """
    ckpt_dir = Path(ckpt_dir)
    for p in checkpoint_candidates(ckpt_dir):
        m = _ROTATED_NAME.match(p.name)
        if m and int(m.group(1) or 0) >= max(keep - 1, 1):
            p.unlink(missing_ok=True)
    for i in range(keep - 1, 1, -1):
        src = ckpt_dir / f"last.{i - 1}.pth"
        if src.is_file():
            os.replace(src, ckpt_dir / f"last.{i}.pth")
    last = ckpt_dir / "last.pth"
    if keep > 1 and last.is_file():
        tmp = ckpt_dir / f".last.1.pth.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copyfile(last, tmp)
        os.replace(tmp, ckpt_dir / "last.1.pth")


def load_latest_checkpoint(ckpt_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of ``ckpt_dir`` and its path; None when there is none.

    An unreadable newer file (truncated, corrupt) is skipped with a warning. A file refused as
    untrusted is never skipped: that is tampering, not a crash.

    Raises:
      UntrustedCheckpointError: a candidate holds code or other non-plain objects.
      CheckpointReadError: checkpoints exist but none is readable (says ``--no-resume``).
    """
    candidates = checkpoint_candidates(ckpt_dir)
    if not candidates:
        return None
    failures = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except UntrustedCheckpointError:
            raise
        except (CheckpointReadError, FileNotFoundError) as exc:
            failures.append(str(exc))
            continue
        if not isinstance(state, dict) or "iteration" not in state:
            failures.append(f"{path}: not a RegSAM training checkpoint (no 'iteration')")
            continue
        for msg in failures:
            log.warning("%s; falling back to the previous checkpoint %s", msg, path)
        return state, path
    raise CheckpointReadError(
        f"no readable checkpoint in {ckpt_dir}:\n  "
        + "\n  ".join(failures)
        + "\nRerun with --no-resume to start this run from scratch (or delete the folder)."
    )


# kept here for callers of the training API; the class lives with the exported-student format
from pipeline.export import StudentFileError  # noqa: E402
