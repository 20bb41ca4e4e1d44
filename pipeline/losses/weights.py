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
    "loss_sam_distill_unlabeled": (
        "loss_feat_distill_unlabeled",
        "loss_cls_distill_unlabeled",
        "loss_mask_distill_unlabeled",
    ),
}  # total -> its logged parts


def loss_weight_table(model_cfg: Any, unlabeled: bool = False) -> dict[str, float]:
    """The terms of the training loss and their weights, from ``cfg.model``.

    Reads ``loss.{cls,mask,dice,iou}_weight``, ``use_resolution_distill`` and
    ``use_sam_distill``; ``unlabeled`` (``training.unlabeled_ratio > 0``) adds
    ``loss_sam_distill_unlabeled``, the distillation on unlabelled images (weighted inside by
    ``model.sam_distill.unlabeled_weight``). The order is the summation order of the total.

    ================================ ======= =================================================
    term                             weight  parts (logged, never re-added)
    ================================ ======= =================================================
    ``loss_cls``                     w_cls   (deep supervision summed over stages)
    ``loss_mask``                    w_mask
    ``loss_dice``                    w_dice
    ``loss_iou``                     w_iou
    ``loss_resolution_distill``      1       ``loss_sr``, ``loss_fa``
    ``loss_sam_distill``             1       ``loss_feat_distill``, ``loss_cls_distill``,
                                             ``loss_mask_distill``
    ``loss_sam_distill_unlabeled``   1       ``loss_feat_distill_unlabeled``,
                                             ``loss_cls_distill_unlabeled``,
                                             ``loss_mask_distill_unlabeled``
    ================================ ======= =================================================
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
    if unlabeled:
        if not model_cfg.use_sam_distill:
            raise ValueError(
                "training.unlabeled_ratio > 0 needs model.use_sam_distill: true (unlabelled "
                "images are learned from the teacher only)"
            )
        table["loss_sam_distill_unlabeled"] = 1.0
    return table
