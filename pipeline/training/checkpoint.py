"""Atomic checkpoints with everything needed for an exact resume."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Load a training checkpoint written by :func:`save_atomic` (pickled RNG states included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc


class StudentFileError(RuntimeError):
    """A model file cannot be used as a student; the message names the file and what to pass."""


def _numpy_array_globals() -> list[Any]:
    """What a pickled numpy array needs (the RNG state of a training checkpoint holds one)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_student_weights(path: Path) -> dict[str, Any]:
    """Load an exported student (``final.pth``) or a training checkpoint (``last.pth``).

    Read with ``torch.load(weights_only=True)``: tensors, plain containers and (for the RNG
    state of a training checkpoint) numpy arrays only; nothing else is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise StudentFileError(f"cannot read model file {path}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}; pass a run's "
                               "final.pth (or its checkpoints/last.pth)") from exc
