"""The one place where a device setting (``"auto"``, ``"cpu"``, ``"cuda:1"``, ...) becomes a device."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(spec: str | torch.device = "auto", index: int | None = None) -> torch.device:
    """``"auto"`` -> CUDA when available (``cuda:index`` if ``index`` is given), else CPU;
    anything else -> ``torch.device(spec)``.

    Arguments:
        spec: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ... or a ``torch.device``.
        index: the CUDA device ``"auto"`` picks (e.g. the DDP local rank); None = the current one.

    Raises:
        ValueError: a CUDA device is asked for but CUDA is not available, or ``spec`` is not a
            device string.
    """
    if isinstance(spec, str) and spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if index is None else f"cuda:{index}")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {spec!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N' ({exc})"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(spec)!r} requested but CUDA is not available (use 'auto' or 'cpu')"
        )
    return device
