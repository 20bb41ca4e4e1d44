"""One table of loss terms drives the criterion, its matcher and the training total."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.losses.criterion import SetCriterion
from pipeline.losses.matcher import HungarianMatcher
from pipeline.losses.weights import loss_weight_table
from pipeline.training.trainer import build_criterion, distill_ramp, total_loss

ROOT = Path(__file__).resolve().parents[1]


def test_table_follows_the_config_in_summation_order():
    cfg = load_config(ROOT / "configs/reg_sam/regnet_distill.yaml", ["model.loss.dice_weight=3.0"])
    table = loss_weight_table(cfg.model)
    assert list(table) == [
        "loss_cls",
        "loss_mask",
        "loss_dice",
        "loss_iou",
        "loss_resolution_distill",
        "loss_sam_distill",
    ]
    assert table["loss_dice"] == 3.0 and table["loss_sam_distill"] == 1.0
    base = load_config(ROOT / "configs/reg_sam/baseline.yaml")
    assert list(loss_weight_table(base.model)) == ["loss_cls", "loss_mask", "loss_dice", "loss_iou"]
    criterion = build_criterion(cfg, num_classes=5)
    assert criterion.weights == {
        k: table[k] for k in ("loss_cls", "loss_mask", "loss_dice", "loss_iou")
    }
    m = criterion.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice) == (
        table["loss_cls"],
        table["loss_mask"],
        table["loss_dice"],
    )


def test_total_sums_the_table_terms_in_order_and_never_the_parts():
    g = torch.Generator().manual_seed(0)
    names = [
        "loss_cls",
        "loss_mask",
        "loss_dice",
        "loss_iou",
        "loss_sr",
        "loss_fa",
        "loss_resolution_distill",
        "loss_feat_distill",
        "loss_sam_distill",
    ]
    losses = {k: torch.rand((), generator=g) for k in names}
    table = {
        "loss_cls": 2.0,
        "loss_mask": 5.0,
        "loss_dice": 5.0,
        "loss_iou": 1.0,
        "loss_resolution_distill": 1.0,
        "loss_sam_distill": 1.0,
    }
    expected = (
        losses["loss_cls"]
        + losses["loss_mask"]
        + losses["loss_dice"]
        + losses["loss_iou"]
        + losses["loss_resolution_distill"]
        + losses["loss_sam_distill"]
    )
    assert torch.equal(total_loss(losses, table), expected)  # same terms, same order: same bits
    # a term of the table missing from the step (e.g. distillation off) is simply not added
    del losses["loss_sam_distill"]
    without = (
        losses["loss_cls"]
        + losses["loss_mask"]
        + losses["loss_dice"]
        + losses["loss_iou"]
        + losses["loss_resolution_distill"]
    )
    assert torch.equal(total_loss(losses, table), without)
    # a distillation warm-up scales the distillation totals only, never the task terms
    half = (
        losses["loss_cls"]
        + losses["loss_mask"]
        + losses["loss_dice"]
        + losses["loss_iou"]
        + 0.25 * losses["loss_resolution_distill"]
    )
    assert torch.allclose(total_loss(losses, table, distill_scale=0.25), half)
    assert torch.equal(total_loss(losses, table, distill_scale=1.0), without)


def test_distill_ramp_is_linear_from_zero_to_one():
    assert [distill_ramp(it, 4) for it in (0, 1, 2, 3, 4, 5, 100)] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
        1.0,
        1.0,
    ]
    assert distill_ramp(0, 0) == 1.0 and distill_ramp(7, 0) == 1.0  # off: full weight at once
    with pytest.raises(ValueError, match="warmup_iters"):
        distill_ramp(3, -1)


def test_criterion_needs_a_weight_for_each_of_its_terms():
    with pytest.raises(KeyError, match="loss_iou"):
        SetCriterion(
            3,
            HungarianMatcher(num_points=16),
            weight_dict={"loss_cls": 1.0, "loss_mask": 1.0, "loss_dice": 1.0},
        )
