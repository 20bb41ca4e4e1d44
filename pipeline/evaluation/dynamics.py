"""Training dynamics read from ``metrics.jsonl``: when a loss leaves its starting plateau.

Set-prediction students (Hungarian matching, a "no object" class) spend their first iterations
on a plateau where ``loss_cls`` barely moves; the iteration at which it drops decides how much of
a short schedule is left to learn the classes. On the embedded default's 200-iteration ablations
that exit iteration predicts the things PQ of a run (README, ablation section). The trainer
records it in ``run_info.json`` and warns when it comes late (:func:`late_plateau_exit`); the
ablation report shows it per run next to PQ Th.

Definition (:func:`plateau_exit`): with ``m_k`` the mean of the ``window`` logged values ending at
record ``k``, the exit is the iteration of the first record whose ``m_k`` is below ``frac`` times
``m`` of the first full window. Records are the logged iterations in order (a resumed run's
repeated iterations keep their last record).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["PLATEAU_WINDOW", "late_plateau_exit", "loss_trace", "plateau_exit"]

PLATEAU_WINDOW = 10  # records per moving average


def loss_trace(
    records: Sequence[Mapping[str, Any]], term: str = "loss_cls"
) -> tuple[np.ndarray, np.ndarray]:
    """(iterations int64 ``[N]``, values float64 ``[N]``) of ``term``, sorted by iteration, one
    record per iteration (the last one logged). Records without ``iter`` or a finite ``term``
    are left out."""
    by_iter: dict[int, float] = {}
    for row in records:
        it, value = row.get("iter"), row.get(term)
        if isinstance(it, bool) or not isinstance(it, int):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if np.isfinite(value):
            by_iter[it] = float(value)
    iters = np.array(sorted(by_iter), dtype=np.int64)
    return iters, np.array([by_iter[i] for i in iters.tolist()], dtype=np.float64)


def plateau_exit(
    records: Sequence[Mapping[str, Any]],
    term: str = "loss_cls",
    frac: float = 0.5,
    window: int = PLATEAU_WINDOW,
) -> int | None:
    """Iteration at which the ``window``-record moving average of ``term`` first falls below
    ``frac`` times its first full-window value.

    Arguments:
        records: ``metrics.jsonl`` rows (dicts with ``iter`` and the loss terms).
        term: the logged loss to follow.
        frac: in ``(0, 1)``; 0.5 = the loss has halved.
        window: records per moving average (>= 1).

    Returns:
        the iteration, or None when the loss never gets there or fewer than ``window`` records
        carry ``term``.

    Raises:
        ValueError: ``frac`` outside ``(0, 1)`` or ``window < 1``.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"plateau_exit: frac must be in (0, 1), got {frac}")
    if window < 1:
        raise ValueError(f"plateau_exit: window must be >= 1, got {window}")
    iters, values = loss_trace(records, term)
    if values.size < window:
        return None
    means = np.convolve(values, np.ones(window) / window, mode="valid")
    below = np.nonzero(means < frac * means[0])[0]
    return int(iters[below[0] + window - 1]) if below.size else None


def late_plateau_exit(exit_iter: int | None, iterations: int, late: float = 0.5) -> bool:
    """True when ``loss_cls`` left its plateau after ``late`` of a run's ``iterations`` (or
    never): the classes then had little of the schedule left. On the embedded default's
    200-iteration runs, every run that left after iteration 131 lost whole thing classes."""
    return exit_iter is None or exit_iter > late * iterations
