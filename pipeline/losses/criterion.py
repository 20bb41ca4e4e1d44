"""Set criterion: Hungarian matching then class, mask, dice and IoU-score losses per stage.

Mask losses compare stride-``r`` predictions with full-resolution targets at normalised points
(:mod:`pipeline.losses.point_sampling`). Ignored pixels (void, crowd, padding) are excluded from
the mask, dice and IoU terms: a point on one has weight 0 and IoU targets skip those pixels.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.matcher import HungarianMatcher, check_targets
from pipeline.losses.point_sampling import point_sample, sample_pixels, uncertainty_points
from pipeline.losses.weights import TASK_TERMS

__all__ = [
    "sigmoid_bce_loss",
    "dice_loss",
    "mask_iou",
    "iou_score_loss",
    "num_masks_across_ranks",
    "SetCriterion",
]

DEFAULT_WEIGHTS = {"loss_cls": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_iou": 1.0}


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-mask mean BCE over valid points: ``[M, P]`` (x3) -> ``[M]``.

    A mask with no valid point has loss 0.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    if valid is None:
        return loss.mean(-1)
    w = valid.to(loss.dtype)
    return (loss * w).sum(-1) / w.sum(-1).clamp(min=1.0)


def dice_loss(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-mask ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` over valid points: ``[M, P]`` -> ``[M]``."""
    probs, targets = logits.sigmoid(), targets.to(logits.dtype)
    if valid is not None:
        probs = probs * valid.to(probs.dtype)
        targets = targets * valid.to(probs.dtype)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def mask_iou(
    pred_logits: Tensor, targets: Tensor, ignore: Tensor | None = None, chunk_size: int = 16
) -> Tensor:
    """IoU of binarised predictions (``logit > 0``) with bool targets, ignored pixels skipped.

    Arguments:
        pred_logits: ``[M, h, w]`` at any stride; resized bilinearly to the target size.
        targets: bool ``[M, H, W]``.
        ignore: optional bool ``[M, H, W]``.

    Returns:
        ``[M]`` in [0, 1]; an empty union (both masks empty on valid pixels) counts as IoU 1.
        Masks are processed ``chunk_size`` at a time to bound the full-resolution memory.
    """
    if pred_logits.shape[0] > chunk_size:
        return torch.cat(
            [
                mask_iou(
                    pred_logits[i : i + chunk_size],
                    targets[i : i + chunk_size],
                    None if ignore is None else ignore[i : i + chunk_size],
                    chunk_size,
                )
                for i in range(0, pred_logits.shape[0], chunk_size)
            ]
        )
    if pred_logits.shape[-2:] != targets.shape[-2:]:
        pred_logits = F.interpolate(
            pred_logits[:, None].float(),
            size=targets.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )[:, 0]
    pred = pred_logits > 0
    tgt = targets.bool()
    if ignore is not None:
        keep = ~ignore.bool()
        pred, tgt = pred & keep, tgt & keep
    inter = (pred & tgt).flatten(1).sum(-1).float()
    union = (pred | tgt).flatten(1).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


def iou_score_loss(pred_iou: Tensor, target_iou: Tensor) -> Tensor:
    """Per-mask squared error of the predicted IoU score (in [0, 1]) to a detached target."""
    return (pred_iou - target_iou.detach().to(pred_iou.dtype)) ** 2


def num_masks_across_ranks(targets: Sequence[dict[str, Any]], device: torch.device) -> float:
    """Number of ground-truth masks averaged over DDP ranks (if initialised), at least 1."""
    num = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return max(float(num.item()), 1.0)


class SetCriterion(nn.Module):
    """Mask2Former-style set loss with an IoU-score term, summed over all supervised stages."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float] | None = None,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        """
        Arguments:
            num_classes: K; logits have K + 1 entries, the last is "no object".
            matcher: assigns predictions to targets, per stage.
            weight_dict: the loss-term table (:func:`~pipeline.losses.weights.loss_weight_table`);
                the criterion takes the weights of its terms ``loss_cls``, ``loss_mask``,
                ``loss_dice``, ``loss_iou`` from it and ignores the others. None = 2, 5, 5, 1.
            no_object_weight: the CE weight of the no-object class.
            num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask
                losses (:func:`uncertainty_points`).
        """
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        weight_dict = DEFAULT_WEIGHTS if weight_dict is None else weight_dict
        missing = [name for name in TASK_TERMS if name not in weight_dict]
        if missing:
            raise KeyError(f"weight_dict has no weight for {missing} (terms of SetCriterion)")
        self.weights = {name: float(weight_dict[name]) for name in TASK_TERMS}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        self.register_buffer("class_weight", class_weight, persistent=False)

    def loss_cls(
        self,
        logits: Tensor,
        targets: Sequence[dict[str, Any]],
        indices: Sequence[tuple[Tensor, Tensor]],
    ) -> Tensor:
        """Weighted cross-entropy; unmatched queries target "no object". logits ``[B, Q, K+1]``."""
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (query_idx, target_idx) in enumerate(indices):
            target_classes[b, query_idx.to(logits.device)] = targets[b]["labels"][
                target_idx.to(targets[b]["labels"].device)
            ].to(logits.device)
        return F.cross_entropy(
            logits.float().transpose(1, 2),
            target_classes,
            weight=self.class_weight.to(logits.device),
        )

    def loss_masks(
        self,
        outputs: dict[str, Tensor],
        targets: Sequence[dict[str, Any]],
        indices: Sequence[tuple[Tensor, Tensor]],
        num_masks: float,
    ) -> dict[str, Tensor]:
        """BCE and dice at uncertainty-sampled points, and the IoU-score loss, for matched pairs."""
        pred_masks, pred_iou = outputs["pred_masks"], outputs["pred_iou"]
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])
        query_idx = torch.cat([q for q, _ in indices])
        if query_idx.numel() == 0:
            zero = (pred_masks.sum() + pred_iou.sum()) * 0.0
            return {"loss_mask": zero, "loss_dice": zero, "loss_iou": zero}
        device = pred_masks.device
        src = pred_masks[batch_idx.to(device), query_idx.to(device)].float()  # [M, h, w]
        src_iou = pred_iou[batch_idx.to(device), query_idx.to(device)].float()  # [M]
        tgt = torch.cat(
            [t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)]
        )
        ignore = torch.cat(
            [t["ignore"][None].expand(len(j), -1, -1) for t, (_, j) in zip(targets, indices)]
        )
        tgt, ignore = tgt.to(device), ignore.to(device)

        coords = uncertainty_points(
            src, self.num_points, self.oversample_ratio, self.importance_sample_ratio, ignore=ignore
        )
        point_logits = point_sample(src, coords)  # [M, P]
        point_targets = sample_pixels(tgt, coords)  # [M, P] bool
        valid = ~sample_pixels(ignore, coords)
        target_iou = mask_iou(src.detach(), tgt, ignore)
        return {
            "loss_mask": sigmoid_bce_loss(point_logits, point_targets, valid).sum() / num_masks,
            "loss_dice": dice_loss(point_logits, point_targets, valid).sum() / num_masks,
            "loss_iou": iou_score_loss(src_iou, target_iou).sum() / num_masks,
        }

    def stage_losses(
        self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Any]], num_masks: float
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """Unweighted losses of one stage and its matching."""
        indices = self.matcher(outputs, targets)
        losses = {"loss_cls": self.loss_cls(outputs["pred_logits"], targets, indices)}
        losses.update(self.loss_masks(outputs, targets, indices, num_masks))
        return losses, indices

    def forward(
        self, outputs: dict[str, Any], targets: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """
        Arguments:
            outputs: student head outputs (``pred_logits [B, Q, K+1]``, ``pred_masks
                [B, Q, h, w]``, ``pred_iou [B, Q]``, optional ``aux_outputs``).
            targets: data sample dicts with ``masks`` bool ``[N, H, W]``, ``labels`` ``[N]``,
                ``ignore`` bool ``[H, W]``; ``H / h == W / w`` (the same image extent).

        Returns:
            weighted ``loss_cls``, ``loss_mask``, ``loss_dice``, ``loss_iou`` summed over the
            final stage and every ``aux_outputs`` stage, and the final stage's matching.
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes, expected "
                f"num_classes + 1 = {self.num_classes + 1}"
            )
        check_targets(targets, logits.shape[0])
        h, w = masks.shape[-2:]
        for b, t in enumerate(targets):
            H, W = t["masks"].shape[-2:]
            if H * w != W * h:
                raise ValueError(
                    f"targets[{b}]['masks'] is {H}x{W}, which does not cover the "
                    f"same extent as pred_masks {h}x{w}"
                )
        num_masks = num_masks_across_ranks(targets, logits.device)

        total: dict[str, Tensor] = {}
        final_indices: list[tuple[Tensor, Tensor]] = []
        stages = [outputs] + list(outputs.get("aux_outputs", []))
        for i, stage in enumerate(stages):
            losses, indices = self.stage_losses(stage, targets, num_masks)
            if i == 0:
                final_indices = indices
            for name in TASK_TERMS:
                value = self.weights[name] * losses[name]
                total[name] = total[name] + value if name in total else value
        return total, final_indices
