"""Instance AP of the thing classes (Mask2Former's AP^Th_pan), with pycocotools.

The ground truth is the thing segments of the panoptic ground truth; crowd segments become COCO
``iscrowd`` annotations, which COCOeval treats as it does on COCO: a detection matched to a
crowd region is neither a true nor a false positive. The detections are the model's scored thing
queries: per image the ``topk`` best (query, thing class) pairs by class probability, each
with its binarised mask (``logit > 0``) and the score ``p_class * mean sigmoid inside the mask``
(Mask2Former's instance inference, restricted to thing classes). Masks are RLE-encoded with
``pycocotools.mask`` and scored with ``COCOeval(iouType="segm")``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

__all__ = [
    "encode_mask",
    "gt_thing_annotations",
    "thing_detections",
    "select_thing_queries",
    "coco_instance_ap",
]

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool ``[H, W]`` mask (``counts`` as bytes)."""
    return mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))


def gt_thing_annotations(
    gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]], image_id: int
) -> list[dict[str, Any]]:
    """COCO instance annotations of the thing segments of one panoptic GT image.

    Arguments:
        gt_ids: integer ``[H, W]`` panoptic GT segment ids.
        gt_segments: dicts with ``id``, ``train_id``, ``isthing`` and ``iscrowd``.
        image_id: the integer id of this image in the evaluation.

    Returns:
        dicts ``image_id``, ``category_id`` (train id), ``segmentation`` (RLE), ``area``,
        ``bbox``, ``iscrowd``; segments without pixels are left out. Ids are assigned later.
    """
    gt_ids = np.asarray(gt_ids)
    out = []
    for seg in gt_segments:
        if not seg["isthing"]:
            continue
        mask = gt_ids == int(seg["id"])
        if not mask.any():
            continue
        rle = encode_mask(mask)
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(seg["train_id"]),
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": mask_util.toBbox(rle).tolist(),
                "iscrowd": int(bool(seg["iscrowd"])),
            }
        )
    return out


def select_thing_queries(
    pred_logits: Tensor, isthing: Sequence[bool], topk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``topk`` best (query, thing class) pairs of one image by class probability.

    Arguments:
        pred_logits: ``[Q, K + 1]`` class logits, last = no object.
        isthing: ``K`` flags.

    Returns:
        ``(queries [N], labels [N] train ids, class_prob [N])``, best first, ``N <= topk``.
    """
    num_classes = len(isthing)
    if pred_logits.ndim != 2 or pred_logits.shape[1] != num_classes + 1:
        raise ValueError(
            f"pred_logits must be [Q, K + 1] = [Q, {num_classes + 1}], got "
            f"{tuple(pred_logits.shape)}"
        )
    things = torch.tensor(
        [i for i, t in enumerate(isthing) if t], dtype=torch.int64, device=pred_logits.device
    )
    probs = pred_logits.float().softmax(-1)[:, things]  # [Q, T]
    k = min(int(topk), probs.numel())
    scores, flat = probs.flatten().topk(k)
    return flat // len(things), things[flat % len(things)], scores


def thing_detections(
    mask_logits: Tensor,
    labels: Tensor,
    class_prob: Tensor,
    image_id: int,
    query_index: Tensor | None = None,
) -> list[dict[str, Any]]:
    """COCO results of one image from selected thing queries.

    Arguments:
        mask_logits: ``[M, H0, W0]`` mask logits at the original resolution.
        labels: ``[N]`` train ids; class_prob: ``[N]`` their class probabilities.
        query_index: ``[N]`` row of ``mask_logits`` of each pair (a query selected with two
            classes shares its mask); None = row ``i`` for pair ``i`` (``M == N``).

    Returns:
        dicts ``image_id``, ``category_id``, ``segmentation`` (RLE), ``score`` =
        ``class_prob * mean sigmoid inside the mask``; pairs with an empty mask are left out.
    """
    if query_index is None:
        query_index = torch.arange(mask_logits.shape[0])
    if mask_logits.shape[0] == 0 or query_index.numel() == 0:
        return []
    binary = mask_logits > 0  # [M, H0, W0]
    area = binary.flatten(1).sum(1)
    mask_score = (mask_logits.float().sigmoid() * binary).flatten(1).sum(1) / area.clamp(min=1)
    # one pycocotools call encodes every mask ([H, W, M] Fortran order)
    rles = mask_util.encode(np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy(), np.uint8))
    scores = (class_prob.float() * mask_score[query_index]).tolist()
    out = []
    for i, row in enumerate(query_index.tolist()):
        if int(area[row]) == 0:
            continue
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(labels[i]),
                "segmentation": rles[row],
                "score": scores[i],
            }
        )
    return out


def coco_instance_ap(
    gt_annotations: Sequence[Mapping[str, Any]],
    detections: Sequence[Mapping[str, Any]],
    images: Sequence[tuple[int, int, int]],
    thing_classes: Sequence[int],
    names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """COCOeval ``segm`` AP (percent) of ``detections`` against ``gt_annotations``.

    Arguments:
        gt_annotations: :func:`gt_thing_annotations` of every evaluated image.
        detections: :func:`thing_detections` of every evaluated image.
        images: ``(image_id, height, width)`` of every evaluated image (images without things
            count too).
        thing_classes: the thing train ids (COCO category ids here).
        names: optional train id -> name for the per-class rows.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP}}``; values are None
        when the ground truth has no non-crowd thing segment (AP is undefined).
    """
    names = dict(names or {})
    empty = {k: None for k in AP_KEYS} | {"per_class": {}}
    if not any(not a["iscrowd"] for a in gt_annotations):
        return empty
    gt = COCO()
    gt.dataset = {
        "images": [{"id": int(i), "height": int(h), "width": int(w)} for i, h, w in images],
        "categories": [{"id": int(c), "name": names.get(int(c), str(c))} for c in thing_classes],
        "annotations": [dict(a, id=n + 1) for n, a in enumerate(gt_annotations)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not detections:
            return {k: 0.0 for k in AP_KEYS} | {"per_class": {}}
        dt = gt.loadRes([dict(d) for d in detections])
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) for s in ev.stats[:6]]
    out: dict[str, Any] = {k: (None if s < 0 else 100 * s) for k, s in zip(AP_KEYS, stats)}
    # precision [T, R, K, A, M]: IoU thresholds, recall points, classes, area ranges, max dets
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[names.get(int(cat), str(cat))] = float(100 * p.mean()) if p.size else None
    out["per_class"] = per_class
    return out
