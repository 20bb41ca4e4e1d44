"""SAM's automatic mode: the teacher's own segments of an image nobody annotated.

The same steps as segment-anything's ``SamAutomaticMaskGenerator`` (one crop layer), built from
its own helpers (``build_point_grid``, ``calculate_stability_score``, ``batched_mask_to_box``,
``ResizeLongestSide.apply_coords``, ``Sam.postprocess_masks``) and torchvision's
``batched_nms``:

1. a grid of ``points_per_side``^2 points (``build_point_grid``) scaled to the original image,
   moved to the teacher frame with ``apply_coords``, one positive point per prompt;
2. the mask decoder's three-mask output for every point, in batches of ``points_per_batch``;
   the logits upsampled to the original image with ``postprocess_masks`` (as ``SamPredictor``);
3. per batch, masks kept when the predicted IoU exceeds ``pred_iou_thresh`` and the stability
   score (IoU of the masks thresholded at ``mask_threshold +- stability_score_offset``) reaches
   ``stability_score_thresh``; boxes of the binary masks;
4. box NMS over all kept masks at ``box_nms_thresh``, scored by predicted IoU; the output is in
   NMS order (best first).

Intended differences from ``SamAutomaticMaskGenerator`` (checked against it in
``tests/test_teacher_automatic.py``):

* **one crop layer** (``crop_n_layers=0``, the generator's default): no crop boxes, so no crop
  NMS and no near-crop-edge filter (with the whole image as the only crop that filter keeps
  every mask anyway);
* **no small-region post-processing** (``min_mask_region_area=0``, its default; it needs OpenCV);
* **empty masks are dropped** (the generator keeps one only when its stability filter is off);
  an empty segment has no box and nothing to pool an embedding from;
* **at most** ``max_segments`` **segments** (the cache's capacity), the best by NMS order;
* besides the binary masks it returns what the cache stores: the low-resolution logits over
  SAM's padded input frame (the frame of every cached map), predicted IoU and stability.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_point_grid,
    calculate_stability_score,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor
from torchvision.ops.boxes import batched_nms

__all__ = ["AutomaticSegments", "automatic_segments", "grid_points"]


@dataclass
class AutomaticSegments:
    """SAM's automatic segments of one image, best first.

    Attributes:
      low_res_logits: float32 ``[M, 4h, 4w]``, the decoder's logits over the padded S x S frame.
      masks: bool ``[M, H0, W0]``, binary masks at the original resolution (on the CPU).
      iou: float32 ``[M]``, predicted IoU.
      stability: float32 ``[M]``, stability score.
      boxes: float32 ``[M, 4]``, ``(x0, y0, x1, y1)`` of each mask (pixel indices, inclusive).
      points: float64 ``[M, 2]``, the ``(x, y)`` prompt point in original coordinates.
    """

    low_res_logits: Tensor
    masks: Tensor
    iou: Tensor
    stability: Tensor
    boxes: Tensor
    points: Tensor

    def __len__(self) -> int:
        return int(self.iou.shape[0])


def grid_points(points_per_side: int, orig_size: tuple[int, int]) -> np.ndarray:
    """The generator's point grid on an ``(H0, W0)`` image: float64 ``[n^2, 2]`` ``(x, y)``."""
    h0, w0 = orig_size
    return build_point_grid(points_per_side) * np.array([[w0, h0]], dtype=np.float64)


@torch.no_grad()
def automatic_segments(
    sam: Sam,
    embedding: Tensor,
    orig_size: tuple[int, int],
    *,
    points_per_side: int,
    points_per_batch: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    stability_score_offset: float,
    box_nms_thresh: float,
    max_segments: int | None = None,
    autocast: Any = None,
) -> AutomaticSegments:
    """Run SAM's automatic mode on one encoded image (see the module docstring).

    Arguments:
      sam: the teacher.
      embedding: its image embedding ``[1, 256, h, w]`` of the preprocessed image.
      orig_size: ``(H0, W0)``.
      points_per_side ... box_nms_thresh: the generator's settings (``teacher.automatic``).
      max_segments: keep at most this many (None = all).
      autocast: optional context-manager factory for the decoder calls (bf16 on CUDA).
    """
    device = embedding.device
    h0, w0 = (int(v) for v in orig_size)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    input_size = transform.get_preprocess_shape(h0, w0, sam.image_encoder.img_size)
    pe = sam.prompt_encoder
    dense_pe = pe.get_dense_pe()
    points_all = grid_points(points_per_side, (h0, w0))
    kept: dict[str, list[Tensor]] = {k: [] for k in ("low", "masks", "iou", "stab", "box", "pt")}
    for start in range(0, len(points_all), points_per_batch):
        points = points_all[start : start + points_per_batch]
        coords = torch.as_tensor(transform.apply_coords(points, (h0, w0)), device=device)
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=device)
        with autocast() if autocast is not None else nullcontext():
            sparse, dense = pe(points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None)
            low_res, iou = sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
        low_res, iou = low_res.float(), iou.float()
        masks = sam.postprocess_masks(low_res, input_size, (h0, w0)).flatten(0, 1)
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        pts = torch.as_tensor(np.repeat(points, 3, axis=0))
        keep = torch.ones(iou.shape[0], dtype=torch.bool, device=device)
        if pred_iou_thresh > 0.0:
            keep &= iou > pred_iou_thresh
        stability = calculate_stability_score(masks, sam.mask_threshold, stability_score_offset)
        if stability_score_thresh > 0.0:
            keep &= stability >= stability_score_thresh
        binary = masks > sam.mask_threshold
        keep &= binary.flatten(1).any(1)  # an empty mask has no box and no embedding
        idx = torch.nonzero(keep).flatten()
        if idx.numel() == 0:
            continue
        binary = binary[idx]
        kept["low"].append(low_res[idx])
        kept["masks"].append(binary.cpu())
        kept["iou"].append(iou[idx])
        kept["stab"].append(stability[idx])
        kept["box"].append(batched_mask_to_box(binary).float())
        kept["pt"].append(pts[idx.cpu()])
    if not kept["iou"]:
        side = int(dense_pe.shape[-1]) * 4
        return AutomaticSegments(
            low_res_logits=torch.zeros(0, side, side, device=device),
            masks=torch.zeros(0, h0, w0, dtype=torch.bool),
            iou=torch.zeros(0, device=device),
            stability=torch.zeros(0, device=device),
            boxes=torch.zeros(0, 4, device=device),
            points=torch.zeros(0, 2, dtype=torch.float64),
        )
    cat = {k: torch.cat(v) for k, v in kept.items()}
    order = batched_nms(
        cat["box"], cat["iou"], torch.zeros_like(cat["iou"]), iou_threshold=box_nms_thresh
    )
    if max_segments is not None:
        order = order[:max_segments]
    cpu_order = order.cpu()
    return AutomaticSegments(
        low_res_logits=cat["low"][order],
        masks=cat["masks"][cpu_order],
        iou=cat["iou"][order],
        stability=cat["stab"][order],
        boxes=cat["box"][order],
        points=cat["pt"][cpu_order],
    )
