"""Watching a run: TensorBoard scalars and panels beside ``metrics.jsonl`` (rank 0 only).

Tags (open with ``tensorboard --logdir runs``):

============================  ==============================================================
``train/<term>``              every loss term by its design name (``train/loss_cls``,
                              ``train/loss_sr``, ``train/loss_sam_distill``, ...) and the total
                              ``train/loss``
``train/lr``                  learning rate of the head/neck group
``train/grad_norm``           total L2 norm of the gradients before clipping
``fusion/stride<s>``          learned FPN fusion weight of the level at stride ``s``
``time/iteration``            seconds per iteration (data included), ``time/data``: data wait
``val/{PQ,SQ,RQ}[_things|_stuff]``  evaluation during training (``training.eval_interval``)
``val/{AP,AP50,AP75}``        instance AP of the thing classes, ``val/mIoU``: semantic mIoU
``val/panel/<image id>``      image | ground truth | prediction at each evaluation
============================  ==============================================================

A resumed run purges the events past its checkpoint (``SummaryWriter(purge_step=...)``), so the
curves show each iteration once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["RunMonitor", "eval_summary"]

FUSION_STRIDES = (4, 8, 16, 32)


def eval_summary(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of :func:`~pipeline.evaluation.evaluate.evaluate_model` metrics,
    flat: ``PQ, SQ, RQ``, ``PQ_things`` ..., ``PQ_stuff`` ..., ``AP, AP50, AP75``, ``mIoU``."""
    out: dict[str, float | None] = {}
    for group, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for key in ("pq", "sq", "rq"):
            out[f"{key.upper()}{suffix}"] = metrics[group][key]
    instance = metrics.get("instance") or {}
    for key in ("AP", "AP50", "AP75"):
        out[key] = instance.get(key)
    out["mIoU"] = (metrics.get("semantic") or {}).get("mIoU")
    return out


class RunMonitor:
    """TensorBoard writer of one run; every method is a no-op when ``log_dir`` is None.

    Arguments:
        log_dir: the event-file directory (``<run>/tensorboard``), or None (off / not rank 0).
        start_iter: the iteration the run (re)starts from; later events of an earlier process
            are purged.
    """

    def __init__(self, log_dir: Path | None = None, start_iter: int = 0) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=start_iter or None)

    def log_train(self, record: dict[str, Any], it: int) -> None:
        """One iteration's record of ``metrics.jsonl``."""
        if self.writer is None:
            return
        add = self.writer.add_scalar
        for key, value in record.items():
            if key.startswith("loss") or key in ("lr", "grad_norm", "distill_scale"):
                add(f"train/{key}", value, it)
        for stride, weight in zip(FUSION_STRIDES, record.get("fusion_weights") or ()):
            add(f"fusion/stride{stride}", weight, it)
        if "time" in record:
            add("time/iteration", record["time"], it)
        if "data_time" in record:
            add("time/data", record["data_time"], it)

    def log_eval(
        self, metrics: dict[str, Any], it: int, panels: Sequence[tuple[str, np.ndarray]] = ()
    ) -> None:
        """An evaluation's headline numbers and its image | GT | prediction panels."""
        if self.writer is None:
            return
        for key, value in eval_summary(metrics).items():
            if value is not None:
                self.writer.add_scalar(f"val/{key}", value, it)
        for image_id, panel in panels:
            self.writer.add_image(f"val/panel/{image_id}", panel, it, dataformats="HWC")
        self.writer.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
