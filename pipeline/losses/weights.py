"""The one table of loss terms: term name -> weight, in the order the training total sums them.

As Mask2Former's ``weight_dict``, one dict drives both sides: :class:`SetCriterion` (and its
matcher's costs) take the weights of their terms from it, and
:func:`~pipeline.training.trainer.total_loss` sums exactly its terms, in its order. Adding a
term to the total is one entry here (and the module that computes it).

Each term reaches the total already weighted by the module that computes it: the criterion
multiplies every supervised stage's term by its weight before summing the stages (deep
supervision); the two distillation totals carry their own sub-weights
(``model.resolution_distill.{sr,fa}_loss_weight``, ``model.sam_distill.{feat,output}_distill_weight``)
and enter with weight 1. Their parts (``loss_sr``, ``loss_fa``, ``loss_feat_distill``,
``loss_cls_distill``, ``loss_mask_distill``) are logged, never added again.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TASK_TERMS", "DISTILL_TERMS", "loss_weight_table"]

TASK_TERMS = ("loss_cls", "loss_mask", "loss_dice", "loss_iou")  # SetCriterion's terms
DISTILL_TERMS = {
    "loss_resolution_distill": ("loss_sr", "loss_fa"),
    "loss_sam_distill": ("loss_feat_distill", "loss_cls_distill", "loss_mask_distill"),
}  # total -> its logged parts


def loss_weight_table(model_cfg: Any) -> dict[str, float]:
    """The terms of the training loss and their weights, from ``cfg.model``.

    Reads ``loss.{cls,mask,dice,iou}_weight``, ``use_resolution_distill`` and
    ``use_sam_distill``. The order is the summation order of the total.
    """
    lc = model_cfg.loss
    table = {
        "loss_cls": float(lc.cls_weight),
        "loss_mask": float(lc.mask_weight),
        "loss_dice": float(lc.dice_weight),
        "loss_iou": float(lc.iou_weight),
    }
    if model_cfg.use_resolution_distill:
        table["loss_resolution_distill"] = 1.0
    if model_cfg.use_sam_distill:
        table["loss_sam_distill"] = 1.0
    return table
