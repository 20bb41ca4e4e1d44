"""Pseudo-label matching and the unlabelled output distillation on hand-made cases."""

import math

import pytest
import torch

from pipeline.losses.pseudo_label import (
    confident_segments,
    match_pseudo_labels,
    pseudo_label_cost,
)
from pipeline.losses.weights import loss_weight_table
from pipeline.models.sam_distill import SamDistiller

LN2, LN3 = math.log(2.0), math.log(3.0)


def flat(x) -> list[float]:
    return torch.as_tensor(x, dtype=torch.float64).flatten().tolist()


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def bce(x: float, y: float) -> float:
    """BCE with logits, by hand: -(y log s + (1 - y) log(1 - s)), s = sigmoid(x)."""
    s = 1 / (1 + math.exp(-x))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


# two queries, two classes, a 1 x 2 grid: query 0 says class 0 on pixel 0, query 1 the reverse
PRED_LOGITS = torch.tensor(
    [[LN2, 0.0, 0.0], [0.0, LN2, 0.0]]
)  # softmax: [.5 .25 .25], [.25 .5 .25]
PRED_MASKS = torch.tensor([[[5.0, -5.0]], [[-5.0, 5.0]]])
T_MASKS = torch.tensor([[[10.0, -10.0]], [[-10.0, 10.0]]])  # segment 0 = pixel 0, 1 = pixel 1


def test_class_cost_is_the_expected_probability_under_the_soft_label():
    soft = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    cost = pseudo_label_cost(
        PRED_LOGITS,
        PRED_MASKS,
        soft,
        T_MASKS,
        torch.ones(1, 2, dtype=torch.bool),
        cost_class=1.0,
        cost_mask=0.0,
        cost_dice=0.0,
    )
    expected = [[-0.5, -(0.25 * 0.5 + 0.75 * 0.25)], [-0.25, -(0.25 * 0.25 + 0.75 * 0.5)]]
    assert flat(cost) == pytest.approx(flat(expected))


def test_mask_and_dice_costs_by_hand_and_invalid_pixels_ignored():
    soft = torch.full((2, 2), 0.5)
    all_valid = torch.ones(1, 2, dtype=torch.bool)
    cost = pseudo_label_cost(
        PRED_LOGITS,
        PRED_MASKS,
        soft,
        T_MASKS,
        all_valid,
        cost_class=0.0,
        cost_mask=1.0,
        cost_dice=0.0,
    )
    # teacher masks binarised at logit 0: segment 0 = [1, 0]; BCE averaged over the 2 pixels
    same, swapped = softplus(-5.0), softplus(5.0)
    assert flat(cost) == pytest.approx([same, swapped, swapped, same], rel=1e-5)
    only_px0 = torch.tensor([[True, False]])
    cost = pseudo_label_cost(
        PRED_LOGITS,
        PRED_MASKS,
        soft,
        T_MASKS,
        only_px0,
        cost_class=0.0,
        cost_mask=0.0,
        cost_dice=1.0,
    )
    s = 1 / (1 + math.exp(-5.0))  # query 0's probability on pixel 0; query 1's is 1 - s
    dice = lambda p, t: 1 - (2 * p * t + 1) / (p + t + 1)  # noqa: E731  (one valid pixel)
    assert flat(cost) == pytest.approx(
        flat([[dice(s, 1), dice(s, 0)], [dice(1 - s, 1), dice(1 - s, 0)]]), rel=1e-5
    )


def test_hungarian_assignment_follows_the_masks_over_a_misleading_class():
    soft = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # classes say: swap; masks say: keep
    rows, cols = match_pseudo_labels(
        PRED_LOGITS,
        PRED_MASKS,
        soft,
        T_MASKS,
        torch.ones(1, 2, dtype=torch.bool),
        cost_class=1.0,
        cost_mask=1.0,
        cost_dice=1.0,
    )
    assert rows.tolist() == [0, 1] and cols.tolist() == [0, 1]
    rows, cols = match_pseudo_labels(
        PRED_LOGITS,
        PRED_MASKS,
        soft,
        T_MASKS,
        torch.ones(1, 2, dtype=torch.bool),
        cost_class=20.0,
        cost_mask=0.0,
        cost_dice=0.0,
    )
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    empty = match_pseudo_labels(
        PRED_LOGITS,
        PRED_MASKS,
        soft[:0],
        T_MASKS[:0],
        torch.ones(1, 2, dtype=torch.bool),
        cost_class=1.0,
        cost_mask=1.0,
        cost_dice=1.0,
    )
    assert [t.numel() for t in empty] == [0, 0]


def test_low_confidence_segments_are_ignored():
    entry = {
        "segment_ids": torch.tensor([1, 2, 3]),
        "labels": torch.tensor([0, 1, 0]),
        "mask_logits": torch.arange(3.0)[:, None, None].expand(3, 2, 2),
        "iou": torch.tensor([0.9, 0.9, 0.9]),
        "embeddings": torch.zeros(3, 4),
        "cls_logits": torch.zeros(3, 2),
        "confidence": torch.tensor([0.2, 0.6, 0.9]),
        "stability": torch.ones(3),
        "scale": 1.0,
    }
    kept = confident_segments(entry, 0.5)
    assert kept["segment_ids"].tolist() == [2, 3]
    assert kept["mask_logits"][:, 0, 0].tolist() == [1.0, 2.0]
    assert kept["confidence"].tolist() == pytest.approx([0.6, 0.9]) and kept["scale"] == 1.0
    assert confident_segments(entry, 0.95)["mask_logits"].shape == (0, 2, 2)
    with pytest.raises(KeyError, match="unlabelled cache"):
        confident_segments({"segment_ids": torch.zeros(0)}, 0.5)


def test_unlabelled_output_distillation_by_hand():
    distiller = SamDistiller(
        student_channels=[4],
        teacher_channels=[3],
        distill_feat_layers=[],
        feat_distill_weight=1.0,
        output_distill_weight=2.0,
        temperature=1.0,
        num_points=16,
        unlabeled_weight=0.5,
        match_costs=(1.0, 1.0, 1.0),
    )
    # segment 2 has no positive pixel in this view: it is left out of the matching
    masks = torch.cat([T_MASKS, torch.full((1, 1, 2), -10.0)])
    cls = torch.tensor([[LN3, 0.0], [0.0, LN3], [5.0, 0.0]])  # soft labels [.75 .25], [.25 .75]
    teacher = {
        "features": [None],
        "feature_valid": [None],
        "mask_logits": [masks],
        "mask_valid": torch.ones(1, 1, 2, dtype=torch.bool),
        "cls_logits": [cls],
    }
    feats = {"neck_features": [torch.zeros(1, 4, 1, 2, requires_grad=True)]}
    outputs = {"pred_logits": PRED_LOGITS[None].requires_grad_(), "pred_masks": PRED_MASKS[None]}
    out = distiller.forward_unlabeled(feats, outputs, teacher)
    assert distiller.stats_unlabeled == {"matched": 2}
    kl = 0.75 * math.log(0.75 / (2 / 3)) + 0.25 * math.log(0.25 / (1 / 3))  # same for both pairs
    sig10 = 1 / (1 + math.exp(-10.0))
    mask = (bce(5.0, sig10) + bce(-5.0, 1 - sig10)) / 2  # per pair, both pairs alike
    assert out["loss_feat_distill_unlabeled"].item() == 0.0
    assert out["loss_cls_distill_unlabeled"].item() == pytest.approx(kl, rel=1e-5)
    assert out["loss_mask_distill_unlabeled"].item() == pytest.approx(mask, rel=1e-5)
    assert out["loss_sam_distill_unlabeled"].item() == pytest.approx(
        0.5 * 2.0 * (kl + mask), rel=1e-5
    )
    out["loss_sam_distill_unlabeled"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0  # the student learns from it


def test_weight_table_adds_the_unlabelled_term_only_when_asked():
    from pipeline.config import load_config
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/base.yaml")
    assert "loss_sam_distill_unlabeled" not in loss_weight_table(cfg.model)
    cfg.model.use_sam_distill = True
    table = loss_weight_table(cfg.model, unlabeled=True)
    assert list(table)[-2:] == ["loss_sam_distill", "loss_sam_distill_unlabeled"]
    cfg.model.use_sam_distill = False
    with pytest.raises(ValueError, match="use_sam_distill"):
        loss_weight_table(cfg.model, unlabeled=True)
