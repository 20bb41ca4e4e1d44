"""Reading files that may come from someone else: ``torch.load(weights_only=True)`` only.

One loader for every checkpoint RegSAM reads (training checkpoints, exported students, teacher
weights go through segment-anything's layout checks): a file may hold tensors, numbers, strings
and containers of them, never code. A crafted pickle raises :class:`UntrustedCheckpointError`
before anything in it runs; a truncated or corrupt file raises :class:`CheckpointReadError`;
both name the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointReadError", "UntrustedCheckpointError", "safe_torch_load"]


class CheckpointReadError(RuntimeError):
    """A checkpoint file is missing, truncated or not a torch file; the message names it."""


class UntrustedCheckpointError(CheckpointReadError):
    """A checkpoint holds pickled objects other than tensors and plain data (possibly code)."""


def safe_torch_load(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name ``path``.

    Raises:
      FileNotFoundError: no file at ``path``.
      UntrustedCheckpointError: the pickle asks for a global the safe loader refuses.
      CheckpointReadError: any other failure (truncated, corrupt, not a torch file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()]
        refused = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln), None)
        if refused is None:  # garbage bytes, not a forbidden object
            raise CheckpointReadError(
                f"cannot read {what} {path}: not a torch file or corrupt "
                f"({lines[0][:200] if lines else 'UnpicklingError'})"
            ) from None
        raise UntrustedCheckpointError(
            f"refusing to load {what} {path}: it holds pickled objects other than tensors and "
            f"plain data ({refused[:300]}); RegSAM loads checkpoints with weights_only=True and "
            "never runs code from them. Use a file written by RegSAM or a plain state dict."
        ) from None
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointReadError(
            f"cannot read {what} {path}: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
