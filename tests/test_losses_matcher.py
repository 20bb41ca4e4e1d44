"""Matching costs against hand-computed values; HungarianMatcher against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.losses.matcher import HungarianMatcher, cost_class, cost_dice, cost_mask_bce


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_cost_class_hand_computed() -> None:
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [3.0, 1.0, 0.0 + 1e-30]]))
    cost = cost_class(logits, torch.tensor([1, 0]))
    assert torch.allclose(cost, torch.tensor([[-0.5, -0.25], [-0.25, -0.75]]), atol=1e-6)


def test_cost_mask_bce_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cost = cost_mask_bce(logits, targets)
    expected = torch.tensor(
        [[math.log(2), math.log(2)], [softplus(-2), (softplus(-2) + softplus(2)) / 2]]
    )
    assert torch.allclose(cost, expected, atol=1e-6)
    # an ignored point contributes nothing; the mean is over valid points only
    valid = torch.tensor([True, False])
    masked = cost_mask_bce(logits, targets, valid)
    assert torch.allclose(
        masked, torch.tensor([[math.log(2), math.log(2)], [softplus(-2), softplus(-2)]]), atol=1e-6
    )


def test_cost_dice_hand_computed() -> None:
    logits = torch.zeros(1, 4)  # p = 0.5 everywhere
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    cost = cost_dice(logits, targets)
    # 1 - (2 * 1 + 1) / (2 + 2 + 1) and 1 - 1 / (2 + 0 + 1)
    assert torch.allclose(cost, torch.tensor([[1 - 3 / 5, 1 - 1 / 3]]))
    valid = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert torch.allclose(cost_dice(logits, targets, valid), torch.tensor([[1 - 2 / 3, 1 - 1 / 2]]))


def _random_case(num_queries: int, num_targets: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(1, num_queries, 4, generator=g),
        "pred_masks": 3 * torch.randn(1, num_queries, 8, 8, generator=g),
    }
    target = {
        "masks": torch.rand(num_targets, 32, 32, generator=g) > 0.5,
        "labels": torch.randint(0, 3, (num_targets,), generator=g),
        "ignore": torch.rand(32, 32, generator=g) > 0.8,
    }
    return outputs, target


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_queries,num_targets", [(4, 3), (5, 2), (3, 3)])
def test_matcher_equals_brute_force(seed: int, num_queries: int, num_targets: int) -> None:
    outputs, target = _random_case(num_queries, num_targets, seed)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    torch.manual_seed(100 + seed)
    cost = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], target)
    torch.manual_seed(100 + seed)  # the same random points inside the matcher
    ((rows, cols),) = matcher(outputs, [target])

    best = min(
        itertools.permutations(range(num_queries), num_targets),
        key=lambda perm: sum(float(cost[q, t]) for t, q in enumerate(perm)),
    )
    expected = sorted((q, t) for t, q in enumerate(best))
    assert sorted(zip(rows.tolist(), cols.tolist())) == expected
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64


def test_zero_targets_give_empty_matches() -> None:
    outputs, target = _random_case(4, 0, 0)
    ((rows, cols),) = HungarianMatcher(num_points=16)(outputs, [target])
    assert rows.numel() == 0 and cols.numel() == 0


def test_ignored_pixels_do_not_change_costs() -> None:
    outputs, target = _random_case(4, 3, 7)
    target["ignore"][:] = False
    target["ignore"][:16, :16] = True  # the top-left 4x4 prediction cells plus a margin
    matcher = HungarianMatcher(num_points=500)
    torch.manual_seed(0)
    before = matcher.cost_matrix(outputs["pred_logits"][0], outputs["pred_masks"][0], target)
    changed = outputs["pred_masks"].clone()
    changed[..., :3, :3] = 50.0  # cells whose bilinear support lies inside the ignore region
    torch.manual_seed(0)
    after = matcher.cost_matrix(outputs["pred_logits"][0], changed[0], target)
    assert torch.equal(before, after)
    # ...while the same change outside the ignore region does change them
    changed = outputs["pred_masks"].clone()
    changed[..., 5:, 5:] = 50.0
    torch.manual_seed(0)
    assert not torch.equal(
        before, matcher.cost_matrix(outputs["pred_logits"][0], changed[0], target)
    )


def test_bad_targets_are_named() -> None:
    outputs, target = _random_case(4, 2, 0)
    matcher = HungarianMatcher(num_points=16)
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'ignore'"):
        matcher(outputs, [{"masks": target["masks"], "labels": target["labels"]}])
    with pytest.raises(ValueError, match=r"targets\[0\]: 'ignore' must be \[H, W\]"):
        matcher(outputs, [{**target, "ignore": torch.zeros(5, 5, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        matcher(outputs, [target, target])
    outputs["pred_masks"][0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        matcher(outputs, [target])
