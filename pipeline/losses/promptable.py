"""SAM's promptable-segmentation losses (SAM paper, appendix "Training algorithm").

Small pure functions over predicted mask logits ``[K, M, H, W]`` (K prompts, M candidate masks
per prompt: 3 for SAM's multimask output, 1 otherwise), a target ``[K, H, W]`` and the pixels
that count ``valid [K, H, W]`` (void, crowd and padding excluded). The mask loss is a linear
combination of focal and dice loss (SAM: 20:1) taken on the candidate with the lowest loss; the
IoU head is regressed onto each candidate's true IoU with a mean squared error.
"""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss

__all__ = ["PROMPTABLE_TERMS", "dice_loss", "focal_loss", "mask_iou", "promptable_loss"]

PROMPTABLE_TERMS = ("loss_focal", "loss_dice", "loss_iou")


def _expand(valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return valid[:, None].expand_as(like).to(like.dtype)


def mask_iou(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with the target over the valid pixels.

    Returns:
      float ``[K, M]``; 1 where prediction and target are both empty.
    """
    pred = logits > 0
    tgt = target[:, None].expand_as(pred)
    v = valid[:, None].expand_as(pred)
    inter = (pred & tgt & v).flatten(2).sum(-1).float()
    union = ((pred | tgt) & v).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Sigmoid focal loss (torchvision's) averaged over each mask's valid pixels: ``[K, M]``."""
    tgt = target[:, None].expand_as(logits).to(logits.dtype)
    w = _expand(valid, logits)
    per_pixel = sigmoid_focal_loss(logits, tgt, alpha=alpha, gamma=gamma, reduction="none")
    return (per_pixel * w).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with p = sigmoid(logits), over valid pixels:
    ``[K, M]``."""
    tgt = target[:, None].expand_as(logits).to(logits.dtype)
    w = _expand(valid, logits)
    p = logits.sigmoid() * w
    t = tgt * w
    num = 2 * (p * t).flatten(2).sum(-1) + 1
    den = p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1
    return 1 - num / den


def promptable_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    focal_alpha: float = 0.25,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The weighted loss terms of one round of prompts.

    Arguments:
      logits: ``[K, M, H, W]`` mask logits.
      iou_pred: ``[K, M]`` the IoU head's predictions.
      target: bool ``[K, H, W]``.
      valid: bool ``[K, H, W]``.

    Returns:
      ``({"loss_focal", "loss_dice", "loss_iou"}, true_iou [K, M], best [K])``: focal and dice
      of the best candidate per prompt (lowest weighted mask loss, index ``best``), averaged over
      prompts; the IoU MSE over every candidate. Each term is already multiplied by its weight.
    """
    focal = focal_loss(logits, target, valid, alpha=focal_alpha)
    dice = dice_loss(logits, target, valid)
    combined = focal_weight * focal + dice_weight * dice
    best = combined.detach().argmin(dim=1, keepdim=True)
    with torch.no_grad():
        true_iou = mask_iou(logits, target, valid)
    losses = {
        "loss_focal": focal_weight * focal.gather(1, best).mean(),
        "loss_dice": dice_weight * dice.gather(1, best).mean(),
        "loss_iou": iou_weight * torch.mean((iou_pred.float() - true_iou) ** 2),
    }
    return losses, true_iou, best[:, 0]
