"""Learning-rate schedules: linear warm-up followed by poly or cosine decay."""

from __future__ import annotations

import math
from typing import Literal

import torch


def lr_factor(
    it: int,
    max_iters: int,
    warmup_iters: int,
    kind: Literal["poly", "cosine"],
    power: float = 0.9,
    warmup_start: float = 0.001,
) -> float:
    """Multiplier of the base learning rate at iteration ``it`` (0-based).

    Warm-up ramps linearly from ``warmup_start`` to 1 over ``warmup_iters``; afterwards the decay
    runs over the remaining iterations, reaching 0 at ``max_iters``.
    """
    if warmup_iters > 0 and it < warmup_iters:
        alpha = it / warmup_iters
        return warmup_start * (1 - alpha) + alpha
    span = max(1, max_iters - warmup_iters)
    progress = min(1.0, (it - warmup_iters) / span)
    if kind == "poly":
        return (1.0 - progress) ** power
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"training.lr_schedule must be 'poly' or 'cosine', got {kind!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    max_iters: int,
    warmup_iters: int,
    kind: Literal["poly", "cosine"],
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, max_iters, warmup_iters, kind, power)
    )
