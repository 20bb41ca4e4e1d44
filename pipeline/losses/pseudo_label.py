"""Output distillation on unlabelled images: the student's queries matched to SAM's own segments.

An unlabelled image has no ground truth; its targets are the teacher's automatic segments from
the unlabelled cache (already filtered by confidence, :func:`confident_segments`, and warped onto
the student's mask grid). Each is a soft mask (the teacher's logits) and a soft class
distribution ``q = softmax(cls_logits / T)`` (the prototypes' pseudo-classes, softened by the
distillation temperature). The student's final-stage queries are matched to them one to one by
the Hungarian algorithm on the matcher's costs (:mod:`pipeline.losses.matcher`), with the class
cost taken in expectation under the soft label:

``C[q, m] = w_cls * (-sum_k q_mk p_qk) + w_mask * BCE(pred_q, t_m) + w_dice * dice(pred_q, t_m)``

where ``p = softmax(student logits)`` and ``t_m`` is the teacher's binary mask (logit > 0),
both over the valid pixels of the view. A matched pair then gets the labelled output distillation
terms (:func:`~pipeline.losses.distill.cls_distill_loss`,
:func:`~pipeline.losses.distill.mask_distill_loss`). Unmatched queries get nothing: SAM's
automatic mode misses segments, and pushing those queries to "no object" would teach the student
to suppress what the teacher missed.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pipeline.losses.matcher import cost_dice, cost_mask_bce

__all__ = ["confident_segments", "pseudo_label_cost", "match_pseudo_labels"]


def confident_segments(entry: dict, min_confidence: float) -> dict:
    """An unlabelled cache entry without the segments whose confidence is below the threshold.

    Arguments:
        entry: a :meth:`TeacherCache.get` dict of an unlabelled cache (``confidence [M]``).
        min_confidence: keep segments with ``confidence >= min_confidence``.

    Returns:
        a shallow copy with ``segment_ids``, ``labels``, ``mask_logits``, ``iou``,
        ``embeddings``, ``cls_logits``, ``stability`` and ``confidence`` cut to the kept rows.
    """
    if "confidence" not in entry:
        raise KeyError(
            "the teacher entry has no 'confidence': it is not from an unlabelled cache "
            "(`python -m pipeline cache-teacher --split unlabeled`)"
        )
    keep = entry["confidence"] >= min_confidence
    out = dict(entry)
    for key in (
        "segment_ids",
        "labels",
        "mask_logits",
        "iou",
        "embeddings",
        "cls_logits",
        "stability",
        "confidence",
    ):
        if key in out:
            out[key] = out[key][keep]
    return out


def pseudo_label_cost(
    pred_logits: Tensor,
    pred_masks: Tensor,
    soft_labels: Tensor,
    teacher_masks: Tensor,
    valid: Tensor,
    *,
    cost_class: float,
    cost_mask: float,
    cost_dice: float,
) -> Tensor:
    """Matching cost between one image's queries and its teacher segments.

    Arguments:
        pred_logits: ``[Q, K + 1]`` student class logits.
        pred_masks: ``[Q, h, w]`` student mask logits.
        soft_labels: ``[M, K]`` teacher class distributions (rows sum to 1).
        teacher_masks: ``[M, h, w]`` teacher mask logits on the same grid.
        valid: bool ``[h, w]`` pixels the teacher saw (inside the image and the view).
        cost_class, cost_mask, cost_dice: the weights of the three costs.

    Returns:
        ``[Q, M]`` float32.
    """
    probs = pred_logits.float().softmax(-1)[:, :-1]  # [Q, K]
    c_cls = -probs @ soft_labels.float().T
    pts = valid.flatten()
    pred = pred_masks.flatten(1).float()  # [Q, P]
    tgt = (teacher_masks.flatten(1) > 0).float()  # [M, P]
    w = pts.float()
    cost = (
        cost_class * c_cls
        + cost_mask * cost_mask_bce(pred, tgt, w)
        + cost_dice * cost_dice_fn(pred, tgt, w)
    )
    if not torch.isfinite(cost).all():
        raise ValueError("pseudo-label matching cost is not finite; the predictions hold NaN/inf")
    return cost


cost_dice_fn = cost_dice  # the parameter of the same name shadows the function


@torch.no_grad()
def match_pseudo_labels(
    pred_logits: Tensor,
    pred_masks: Tensor,
    soft_labels: Tensor,
    teacher_masks: Tensor,
    valid: Tensor,
    *,
    cost_class: float,
    cost_mask: float,
    cost_dice: float,
) -> tuple[Tensor, Tensor]:
    """Hungarian assignment of queries to teacher segments (:func:`pseudo_label_cost`).

    Returns:
        ``(query_idx, segment_idx)`` int64 ``[min(Q, M)]``, sorted by query.
    """
    if teacher_masks.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    cost = pseudo_label_cost(
        pred_logits,
        pred_masks,
        soft_labels,
        teacher_masks,
        valid,
        cost_class=cost_class,
        cost_mask=cost_mask,
        cost_dice=cost_dice,
    )
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
