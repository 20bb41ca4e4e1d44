"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former style).

Mask costs are computed at ``num_points`` uniformly random points shared by all predictions and
targets of an image; points on ignored pixels (void, crowd, padding) carry no cost.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from pipeline.losses.point_sampling import point_sample, sample_pixels

__all__ = ["cost_class", "cost_mask_bce", "cost_dice", "HungarianMatcher", "check_targets"]


def cost_class(logits: Tensor, labels: Tensor) -> Tensor:
    """``-p(label)``: logits ``[Q, K + 1]``, labels ``[N]`` -> cost ``[Q, N]``."""
    return -logits.float().softmax(-1)[:, labels]


def cost_mask_bce(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean binary cross-entropy over valid points.

    Arguments:
        logits: ``[Q, P]`` predicted mask logits at the points.
        targets: ``[N, P]`` target values in [0, 1].
        valid: optional ``[P]`` 0/1 point weights (0 = ignored).

    Returns:
        ``[Q, N]``.
    """
    logits, targets = logits.float(), targets.float()
    w = torch.ones(logits.shape[1], device=logits.device) if valid is None else valid.float()
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    cost = (pos * w) @ targets.T + (neg * w) @ (1 - targets).T
    return cost / w.sum().clamp(min=1.0)


def cost_dice(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with ``p = sigmoid(logits)``, over valid points.

    Shapes as :func:`cost_mask_bce`; returns ``[Q, N]``.
    """
    probs, targets = logits.float().sigmoid(), targets.float()
    if valid is not None:
        probs = probs * valid.float()
        targets = targets * valid.float()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def check_targets(targets: Sequence[dict[str, Any]], batch: int) -> None:
    """Raise a ValueError naming the field when a target dict does not fit the data contract."""
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} predictions")
    for b, t in enumerate(targets):
        for key in ("masks", "labels", "ignore"):
            if key not in t:
                raise ValueError(f"targets[{b}] has no {key!r}")
        masks, labels, ignore = t["masks"], t["labels"], t["ignore"]
        if masks.ndim != 3 or labels.ndim != 1 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{b}]: 'masks' must be [N, H, W] and 'labels' [N], got "
                f"{tuple(masks.shape)} and {tuple(labels.shape)}"
            )
        if ignore.shape != masks.shape[-2:]:
            raise ValueError(
                f"targets[{b}]: 'ignore' must be [H, W] = {tuple(masks.shape[-2:])}, "
                f"got {tuple(ignore.shape)}"
            )


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising
    ``cost_class * C_cls + cost_mask * C_bce + cost_dice * C_dice``."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one matching cost weight must be non-zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, masks: Tensor, target: dict[str, Any]) -> Tensor:
        """Cost ``[Q, N]`` for one image: logits ``[Q, K+1]``, masks ``[Q, h, w]``."""
        labels, tgt_masks, ignore = target["labels"], target["masks"], target["ignore"]
        coords = torch.rand(self.num_points, 2, device=masks.device)
        pred = point_sample(masks.float().unsqueeze(0), coords.unsqueeze(0)).squeeze(0)  # [Q, P]
        tgt = sample_pixels(tgt_masks.to(masks.device), coords)  # [N, P] bool
        valid = ~sample_pixels(ignore.to(masks.device)[None], coords)[0]  # [P]
        cost = (
            self.cost_class * cost_class(logits, labels)
            + self.cost_mask * cost_mask_bce(pred, tgt, valid)
            + self.cost_dice * cost_dice(pred, tgt, valid)
        )
        if not torch.isfinite(cost).all():
            raise ValueError("matching cost is not finite; the predictions contain NaN or inf")
        return cost

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Any]]
    ) -> list[tuple[Tensor, Tensor]]:
        """
        Arguments:
            outputs: ``pred_logits [B, Q, K+1]`` and ``pred_masks [B, Q, h, w]``.
            targets: per image ``masks`` bool ``[N, H, W]``, ``labels`` int64 ``[N]``,
                ``ignore`` bool ``[H, W]``.

        Returns:
            per image ``(query_idx, target_idx)``, int64 ``[min(Q, N)]`` each, sorted by query.
        """
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        check_targets(targets, logits.shape[0])
        indices = []
        for b, target in enumerate(targets):
            num_targets = target["labels"].shape[0]
            if num_targets == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[b], masks[b], target)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
