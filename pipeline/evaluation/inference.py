"""From student outputs to a panoptic segmentation of the original image.

Three small steps, each usable on its own:

1. :func:`postprocess` resamples one image's mask logits from the network input frame
   (eval resize + pad) back to the original image with the sample's exact ``transform``.
2. :func:`panoptic_merge` turns query classes and masks into an id map and ``segments_info``
   (MaskFormer-style panoptic inference).
3. :func:`to_coco_panoptic` encodes the result as a COCO panoptic PNG and ``segments_info``
   with the dataset's original category ids.

:func:`run_panoptic_inference` chains the model forward pass (:func:`forward_samples`) with
steps 1 and 2 (:func:`panoptic_from_outputs`) for a list of eval-transformed samples; evaluation
and folder prediction both go through it. :func:`thing_queries_at_original` gives the scored
thing queries that instance AP needs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.config import OBJECT_MASK_THRESHOLD, OVERLAP_THRESHOLD
from pipeline.data.coco_panoptic import id_to_rgb
from pipeline.data.geometry import warp_affine
from pipeline.data.transforms import normalize_images
from pipeline.evaluation.instance_ap import select_thing_queries
from pipeline.evaluation.pq import CategoryLike

__all__ = [
    "OUTSIDE_LOGIT",
    "panoptic_merge",
    "mask_logits_to_original",
    "postprocess",
    "to_coco_panoptic",
    "unbatch_outputs",
    "pad_images",
    "forward_samples",
    "panoptic_from_outputs",
    "thing_queries_at_original",
    "run_panoptic_inference",
    "forward_pixels",
]

OUTSIDE_LOGIT = -1e4  # mask logit for original pixels outside the network input (none if exact)


def panoptic_merge(
    pred_logits: Tensor,
    pred_masks: Tensor,
    pred_iou: Tensor | None,
    isthing: Sequence[bool],
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
    iou_score_weight: float = 0.0,
    mask_threshold: float = 0.5,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Panoptic segmentation of one image from per-query classes and masks.

    Queries predicting "no object" (the last class) or whose class probability is not above
    ``object_mask_threshold`` are dropped. Each kept query gets the score
    ``p_class * clamp(pred_iou, 0, 1) ** iou_score_weight`` (``iou_score_weight = 0``: the class
    probability alone), and every pixel goes to the kept query with the largest
    ``score * sigmoid(mask)``. A query keeps the pixels it wins where its own mask probability is
    ``>= mask_threshold``; it is dropped when that kept area is less than ``overlap_threshold``
    of its own mask area (``sigmoid >= mask_threshold``). Stuff queries of the same class are
    merged into one segment. Queries are visited in descending score, so segment ids are
    deterministic and a merged stuff segment has its best query's score. (MaskFormer divides the
    whole won area, including pixels below ``mask_threshold``, by the mask area; here only the
    pixels the segment actually keeps count, so the ratio is a fraction in ``[0, 1]``.)

    Arguments:
        pred_logits: ``[Q, K + 1]`` class logits, last = no object.
        pred_masks: ``[Q, H, W]`` mask logits, already at the output resolution.
        pred_iou: ``[Q]`` predicted mask IoU (mask quality), or None.
        isthing: ``K`` flags, ``isthing[train_id]``.

    Returns:
        ``id_map`` int32 ``[H, W]`` (0 = unassigned, segments numbered from 1) and
        ``segments_info``: dicts ``id``, ``category_id`` (train id), ``isthing``, ``score``,
        ``area`` (pixels in ``id_map``).
    """
    num_classes = len(isthing)
    if pred_logits.ndim != 2 or pred_logits.shape[1] != num_classes + 1:
        raise ValueError(
            f"pred_logits must be [Q, K + 1] = [Q, {num_classes + 1}] for "
            f"{num_classes} categories, got {tuple(pred_logits.shape)}"
        )
    num_queries = pred_logits.shape[0]
    if pred_masks.ndim != 3 or pred_masks.shape[0] != num_queries:
        raise ValueError(
            f"pred_masks must be [Q={num_queries}, H, W], got {tuple(pred_masks.shape)}"
        )
    if pred_iou is not None and tuple(pred_iou.shape) != (num_queries,):
        raise ValueError(f"pred_iou must be [Q={num_queries}], got {tuple(pred_iou.shape)}")

    height, width = pred_masks.shape[-2:]
    id_map = torch.zeros((height, width), dtype=torch.int32, device=pred_masks.device)
    class_prob, labels = pred_logits.float().softmax(-1).max(-1)
    scores = class_prob
    if pred_iou is not None and iou_score_weight != 0:
        scores = class_prob * pred_iou.float().clamp(0, 1) ** iou_score_weight
    keep = (labels != num_classes) & (class_prob > object_mask_threshold)
    kept = keep.nonzero().squeeze(1)
    kept = kept[torch.argsort(scores[kept], descending=True, stable=True)]
    if kept.numel() == 0:
        return id_map, []

    mask_prob = pred_masks[kept].float().sigmoid()
    owner = (scores[kept, None, None] * mask_prob).argmax(0)

    segments: list[dict[str, Any]] = []
    stuff_segment: dict[int, dict[str, Any]] = {}
    for k, query in enumerate(kept.tolist()):
        own = mask_prob[k] >= mask_threshold
        mask = (owner == k) & own
        own_area, kept_area = int(own.sum()), int(mask.sum())
        if kept_area == 0 or kept_area < overlap_threshold * own_area:
            continue
        label = int(labels[query])
        if not isthing[label] and label in stuff_segment:
            id_map[mask] = stuff_segment[label]["id"]
            continue
        segment = {
            "id": len(segments) + 1,
            "category_id": label,
            "isthing": bool(isthing[label]),
            "score": float(scores[query]),
        }
        id_map[mask] = segment["id"]
        segments.append(segment)
        if not isthing[label]:
            stuff_segment[label] = segment

    areas = torch.bincount(id_map.flatten().long(), minlength=len(segments) + 1).tolist()
    for segment in segments:
        segment["area"] = int(areas[segment["id"]])
    return id_map, segments


def mask_logits_to_original(
    mask_logits: Tensor,
    transform: Tensor | np.ndarray,
    input_size: tuple[int, int],
    orig_size: tuple[int, int],
) -> Tensor:
    """Resample mask logits from the network input frame to the original image.

    Arguments:
        mask_logits: ``[Q, h, w]`` logits covering the whole network input ``input_size``
            (the view, possibly padded further by batching at its bottom/right).
        transform: ``[3, 3]`` original-image coordinates -> view coordinates.
        input_size: ``(H, W)`` of the network input.
        orig_size: ``(H0, W0)`` of the original image.

    Returns:
        ``[Q, H0, W0]`` bilinearly resampled logits.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be [Q, h, w], got {tuple(mask_logits.shape)}")
    h, w = mask_logits.shape[-2:]
    in_h, in_w = (int(s) for s in input_size)
    grid_to_input = np.diag([in_w / w, in_h / h, 1.0])
    view_from_orig = np.asarray(torch.as_tensor(transform).cpu(), dtype=np.float64)
    if view_from_orig.shape != (3, 3):
        raise ValueError(f"transform must be a 3x3 matrix, got shape {view_from_orig.shape}")
    matrix = np.linalg.inv(view_from_orig) @ grid_to_input
    out, _ = warp_affine(
        mask_logits.float(),
        matrix,
        (int(orig_size[0]), int(orig_size[1])),
        "bilinear",
        fill=OUTSIDE_LOGIT,
    )
    return out


def postprocess(
    outputs: Mapping[str, Tensor],
    sample: Mapping[str, Any],
    input_size: tuple[int, int] | None = None,
) -> dict[str, Tensor | None]:
    """One image's outputs at the original resolution.

    Arguments:
        outputs: one image's ``pred_logits [Q, K + 1]``, ``pred_masks [Q, h, w]`` and
            optionally ``pred_iou [Q]`` (see :func:`unbatch_outputs`).
        sample: the data sample (``transform``, ``orig_size``, ``image``).
        input_size: ``(H, W)`` of the batched network input; defaults to the sample's view size.

    Returns:
        ``pred_logits [Q, K + 1]``, ``pred_masks [Q, H0, W0]`` (logits), ``pred_iou [Q]`` or None.
    """
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise KeyError(f"model outputs have no {key!r}")
    for key in ("transform", "orig_size", "image"):
        if key not in sample:
            raise KeyError(f"sample has no {key!r}")
    if input_size is None:
        input_size = tuple(sample["image"].shape[-2:])
    masks = mask_logits_to_original(
        outputs["pred_masks"], sample["transform"], input_size, tuple(sample["orig_size"])
    )
    return {
        "pred_logits": outputs["pred_logits"],
        "pred_masks": masks,
        "pred_iou": outputs.get("pred_iou"),
    }


def unbatch_outputs(outputs: Mapping[str, Any]) -> list[dict[str, Tensor | None]]:
    """Per-image dicts from batched ``pred_logits [B, Q, K+1]``, ``pred_masks [B, Q, h, w]``
    and ``pred_iou [B, Q]`` (other keys, e.g. ``aux_outputs``, are dropped)."""
    batch = outputs["pred_logits"].shape[0]
    iou = outputs.get("pred_iou")
    return [
        {
            "pred_logits": outputs["pred_logits"][b],
            "pred_masks": outputs["pred_masks"][b],
            "pred_iou": None if iou is None else iou[b],
        }
        for b in range(batch)
    ]


def pad_images(images: Sequence[Tensor]) -> Tensor:
    """uint8 ``[3, H_i, W_i]`` views -> ``[B, 3, max H, max W]``, zero-padded bottom/right."""
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for b, im in enumerate(images):
        batch[b, :, : im.shape[-2], : im.shape[-1]] = im
    return batch


def _drop_unused_queries(
    outputs: dict[str, Tensor | None], object_mask_threshold: float
) -> dict[str, Tensor | None]:
    """Keep the queries :func:`panoptic_merge` would keep by class alone (before upsampling)."""
    class_prob, labels = outputs["pred_logits"].float().softmax(-1).max(-1)
    keep = (labels != outputs["pred_logits"].shape[-1] - 1) & (class_prob > object_mask_threshold)
    return {k: None if v is None else v[keep] for k, v in outputs.items()}


def forward_pixels(model: torch.nn.Module, images: Tensor) -> dict[str, Any]:
    """Outputs of ``model`` on uint8 RGB ``[B, 3, H, W]``.

    A model with its own ``forward_pixels`` (the student, which normalises with its backbone's
    mean/std, and :class:`pipeline.deploy.runner.ExportedStudent`) is called through it; any
    other module gets ImageNet-normalised images (:func:`normalize_images`).
    """
    own = getattr(model, "forward_pixels", None)
    return own(images) if callable(own) else model(normalize_images(images))


@torch.no_grad()
def forward_samples(
    model: torch.nn.Module, samples: Sequence[Mapping[str, Any]], device: torch.device | str
) -> tuple[list[dict[str, Tensor | None]], tuple[int, int]]:
    """Model forward on a list of eval-transformed samples.

    The views are zero-padded to a common size and run through ``model`` by
    :func:`forward_pixels` (the student, or an exported one, normalises inside; ``model`` must
    return ``pred_logits`` / ``pred_masks`` / optionally ``pred_iou``). The caller sets
    ``model.eval()``.

    Returns:
        per sample its outputs (:func:`unbatch_outputs`), and the ``(H, W)`` of the network input.
    """
    images = pad_images([s["image"] for s in samples]).to(device)
    outputs = forward_pixels(model, images)
    return unbatch_outputs(outputs), (int(images.shape[-2]), int(images.shape[-1]))


@torch.no_grad()
def panoptic_from_outputs(
    outputs: dict[str, Tensor | None],
    sample: Mapping[str, Any],
    input_size: tuple[int, int],
    isthing: Sequence[bool],
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
    iou_score_weight: float = 0.0,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """One image's panoptic result at the original resolution: the queries
    :func:`panoptic_merge` would drop by class alone are removed first, the rest are resampled
    to the original size (:func:`postprocess`) and merged."""
    out = _drop_unused_queries(outputs, object_mask_threshold)
    full = postprocess(out, sample, input_size)
    return panoptic_merge(
        full["pred_logits"],
        full["pred_masks"],
        full["pred_iou"],
        isthing,
        object_mask_threshold=object_mask_threshold,
        overlap_threshold=overlap_threshold,
        iou_score_weight=iou_score_weight,
    )


@torch.no_grad()
def thing_queries_at_original(
    outputs: dict[str, Tensor | None],
    sample: Mapping[str, Any],
    input_size: tuple[int, int],
    isthing: Sequence[bool],
    topk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's ``topk`` best (query, thing class) pairs with their masks at the original
    resolution (for instance AP, :mod:`pipeline.evaluation.instance_ap`).

    Returns:
        ``(mask_logits [M, H0, W0] of the M distinct queries, labels [N] train ids,
        class_prob [N], query_index [N] row of mask_logits per pair)``, pairs best first.
    """
    queries, labels, class_prob = select_thing_queries(outputs["pred_logits"], isthing, topk)
    unique, inverse = queries.unique(return_inverse=True)
    masks = mask_logits_to_original(
        outputs["pred_masks"][unique], sample["transform"], input_size, tuple(sample["orig_size"])
    )
    return masks, labels, class_prob, inverse


@torch.no_grad()
def run_panoptic_inference(
    model: torch.nn.Module,
    samples: Sequence[Mapping[str, Any]],
    isthing: Sequence[bool],
    device: torch.device | str,
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
    iou_score_weight: float = 0.0,
) -> list[tuple[Tensor, list[dict[str, Any]]]]:
    """:func:`forward_samples` then :func:`panoptic_from_outputs` for every sample.

    Returns:
        per sample, ``(id_map int32 [H0, W0], segments_info)`` with train-id categories.
    """
    if not samples:
        return []
    outputs, input_size = forward_samples(model, samples, device)
    return [
        panoptic_from_outputs(
            out,
            sample,
            input_size,
            isthing,
            object_mask_threshold=object_mask_threshold,
            overlap_threshold=overlap_threshold,
            iou_score_weight=iou_score_weight,
        )
        for out, sample in zip(outputs, samples)
    ]


def to_coco_panoptic(
    id_map: Tensor | np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    categories: Sequence[CategoryLike],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Encode a panoptic result in COCO format.

    Arguments:
        id_map: integer ``[H, W]`` segment ids (0 = void).
        segments_info: :func:`panoptic_merge` segments (``category_id`` = train id).
        categories: the dataset categories ordered by train id (``categories[t].id`` is the
            original category id of train id ``t``).

    Returns:
        RGB uint8 ``[H, W, 3]`` with ``id = R + 256 G + 256^2 B`` and ``segments_info`` dicts
        ``id``, ``category_id`` (original id), ``iscrowd`` (0), ``isthing``, ``area``, ``score``.
    """
    ids = id_map.cpu().numpy() if isinstance(id_map, Tensor) else np.asarray(id_map)
    out = []
    for i, seg in enumerate(segments_info):
        train_id = int(seg["category_id"])
        if not 0 <= train_id < len(categories):
            raise ValueError(
                f"segments_info[{i}] has category_id (train id) {train_id}, "
                f"outside [0, {len(categories)})"
            )
        cat = categories[train_id]
        area = seg["area"] if "area" in seg else (ids == seg["id"]).sum()
        out.append(
            {
                "id": int(seg["id"]),
                "category_id": int(cat.id),
                "iscrowd": 0,
                "isthing": bool(cat.isthing),
                "area": int(area),
                "score": float(seg.get("score", 1.0)),
            }
        )
    return id_to_rgb(ids), out
