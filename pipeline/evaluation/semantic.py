"""Semantic mIoU of a merged panoptic prediction against the panoptic ground truth.

Both sides become semantic maps of train ids: a GT pixel takes its segment's class (crowd
segments included, as the COCO semantic annotations derived from panoptic ones do), void
(id 0) is ignored; a predicted pixel takes its segment's class, and a pixel no segment covers is
"no class", which counts as a miss of the GT class there. ``IoU_c = TP / (TP + FP + FN)``
over non-ignored pixels, and mIoU averages the classes that occur in the ground truth (as
detectron2's ``SemSegEvaluator``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["IGNORE", "semantic_map", "confusion_matrix", "summarize_miou"]

IGNORE = -1  # semantic label of void pixels (GT) and of uncovered pixels (prediction)


def semantic_map(
    ids: np.ndarray, segments: Sequence[Mapping[str, Any]], key: str = "train_id"
) -> np.ndarray:
    """int64 ``[H, W]`` class map from a panoptic id map and its segments.

    Arguments:
        ids: integer ``[H, W]`` segment ids (0 = void / unassigned).
        segments: dicts with ``id`` and the class under ``key`` (``train_id`` for the dataset's
            GT segments, ``category_id`` for :func:`~pipeline.evaluation.inference.panoptic_merge`
            output, whose ``category_id`` is a train id).

    Returns:
        the class of every pixel, :data:`IGNORE` where no listed segment covers it.
    """
    ids = np.asarray(ids).astype(np.int64)
    out = np.full(ids.shape, IGNORE, dtype=np.int64)
    for seg in segments:
        out[ids == int(seg["id"])] = int(seg[key])
    return out


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``[K + 1, K]`` counts: row = predicted class (row K = no class), column = GT class.

    Pixels whose GT is :data:`IGNORE` are left out.
    """
    gt, pred = np.asarray(gt).ravel(), np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"GT and prediction maps differ in size: {gt.shape} vs {pred.shape}")
    keep = gt != IGNORE
    gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"GT classes must be in [0, {num_classes}), got {gt.min()}..{gt.max()}")
    pred = np.where(pred == IGNORE, num_classes, pred)
    if pred.size and (pred.min() < 0 or pred.max() > num_classes):
        raise ValueError(
            f"predicted classes must be in [0, {num_classes}), got {pred.min()}..{pred.max()}"
        )
    flat = pred * num_classes + gt
    return (
        np.bincount(flat, minlength=(num_classes + 1) * num_classes)
        .reshape(num_classes + 1, num_classes)
        .astype(np.int64)
    )


def summarize_miou(conf: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"mIoU", "pixel_accuracy", "per_class": {name: IoU or None}}`` in percent.

    A class with no GT pixel has IoU None and is left out of the mean (its false positives
    still lower the IoU of the classes they cover). mIoU is None when no class occurs.
    """
    conf = np.asarray(conf, dtype=np.float64)
    num_classes = conf.shape[1]
    tp = np.diag(conf[:num_classes])
    gt_pixels = conf.sum(0)
    pred_pixels = conf[:num_classes].sum(1)
    union = gt_pixels + pred_pixels - tp
    present = gt_pixels > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    names = list(names) if names is not None else [str(c) for c in range(num_classes)]
    return {
        "mIoU": float(100 * iou[present].mean()) if present.any() else None,
        "pixel_accuracy": float(100 * tp.sum() / gt_pixels.sum()) if gt_pixels.sum() else None,
        "per_class": {n: (None if np.isnan(v) else float(100 * v)) for n, v in zip(names, iou)},
    }
