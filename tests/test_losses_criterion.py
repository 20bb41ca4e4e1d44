"""SetCriterion and its loss functions: hand-computed values, ignore pixels, deep supervision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.losses.criterion import (
    SetCriterion,
    dice_loss,
    iou_score_loss,
    mask_iou,
    num_masks_across_ranks,
    sigmoid_bce_loss,
)
from pipeline.losses.matcher import HungarianMatcher


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------ pure loss functions
def test_sigmoid_bce_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    assert torch.allclose(
        sigmoid_bce_loss(logits, targets),
        torch.tensor([(math.log(2) + softplus(2) + softplus(1)) / 3]),
    )
    valid = torch.tensor([[True, True, False]])
    assert torch.allclose(
        sigmoid_bce_loss(logits, targets, valid), torch.tensor([(math.log(2) + softplus(2)) / 2])
    )
    assert sigmoid_bce_loss(logits, targets, torch.zeros_like(valid)).item() == 0.0


def test_dice_loss_hand_computed() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(dice_loss(logits, targets), torch.tensor([1 - 3 / 5]))
    valid = torch.tensor([[True, False, True, False]])
    assert torch.allclose(dice_loss(logits, targets, valid), torch.tensor([1 - 2 / 3]))


def test_mask_iou_hand_computed_with_ignore_and_resize() -> None:
    pred = torch.full((1, 2, 2), -5.0)
    pred[0, 0, :] = 5.0  # top row of 2x2 cells on -> top half of the 8x8 image
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :, :4] = True  # left half
    # inter = 16, union = 48
    assert torch.allclose(mask_iou(pred, target), torch.tensor([16 / 48]))
    ignore = torch.zeros(1, 8, 8, dtype=torch.bool)
    ignore[0, 4:, :] = True  # bottom half void: inter 16, union 32
    assert torch.allclose(mask_iou(pred, target, ignore), torch.tensor([0.5]))
    # empty prediction and empty target on valid pixels: IoU 1
    assert (
        mask_iou(torch.full((1, 8, 8), -1.0), torch.zeros(1, 8, 8, dtype=torch.bool)).item() == 1.0
    )


def test_mask_iou_chunks_agree() -> None:
    pred = torch.randn(37, 5, 6)
    target = torch.rand(37, 20, 24) > 0.5
    ignore = torch.rand(37, 20, 24) > 0.7
    assert torch.allclose(
        mask_iou(pred, target, ignore, chunk_size=4), mask_iou(pred, target, ignore, chunk_size=100)
    )


def test_iou_score_loss_is_detached_squared_error() -> None:
    pred = torch.tensor([0.3, 0.9], requires_grad=True)
    target = torch.tensor([0.5, 0.4], requires_grad=True)
    loss = iou_score_loss(pred, target)
    assert torch.allclose(loss, torch.tensor([0.04, 0.25]))
    loss.sum().backward()
    assert target.grad is None and torch.allclose(pred.grad, torch.tensor([-0.4, 1.0]))


# ------------------------------------------------------------------------- criterion
def _criterion(**kw) -> SetCriterion:
    weights = {"loss_cls": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_iou": 1.0}
    for term in ("cls", "mask", "dice", "iou"):
        if f"{term}_weight" in kw:
            weights[f"loss_{term}"] = kw.pop(f"{term}_weight")
    return SetCriterion(
        3,
        HungarianMatcher(num_points=kw.pop("matcher_points", 256)),
        weight_dict=weights,
        num_points=kw.pop("num_points", 256),
        **kw,
    )


def _outputs(batch: int = 1, queries: int = 4, size: int = 8, stages: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def stage():
        return {
            "pred_logits": torch.randn(batch, queries, 4, generator=g).requires_grad_(),
            "pred_masks": (
                2 * torch.randn(batch, queries, size, size, generator=g)
            ).requires_grad_(),
            "pred_iou": torch.rand(batch, queries, generator=g).requires_grad_(),
        }

    out = stage()
    out["aux_outputs"] = [stage() for _ in range(stages)]
    return out


def _target(num: int = 2, size: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    for i in range(num):
        y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
        masks[i, y : y + size // 2, x : x + size // 2] = True
    return {
        "masks": masks,
        "labels": torch.arange(num) % 3,
        "ignore": torch.zeros(size, size, dtype=torch.bool),
    }


def test_single_query_hand_computed() -> None:
    """Q = 1, one target: every term is known in closed form."""
    logits = torch.tensor([[[1.0, 2.0, 0.0, 0.5]]])
    masks = torch.full((1, 1, 2, 2), -20.0)
    masks[0, 0, 0, :] = 20.0  # predicted: top half
    target = {
        "masks": torch.zeros(1, 8, 8, dtype=torch.bool),
        "labels": torch.tensor([1]),
        "ignore": torch.zeros(8, 8, dtype=torch.bool),
    }
    target["masks"][0, :, :4] = True  # left half -> IoU 1/3
    outputs = {"pred_logits": logits, "pred_masks": masks, "pred_iou": torch.tensor([[0.8]])}
    losses, indices = _criterion(cls_weight=2.0, iou_weight=1.0)(outputs, [target])
    assert [(q.tolist(), t.tolist()) for q, t in indices] == [([0], [0])]
    ce = -F.log_softmax(logits[0, 0], -1)[1]
    assert torch.allclose(losses["loss_cls"], 2.0 * ce)
    assert torch.allclose(losses["loss_iou"], torch.tensor(1.0 * (0.8 - 1 / 3) ** 2))


def test_no_object_weight_in_cross_entropy() -> None:
    outputs = _outputs(queries=3)
    target = _target(num=1)
    losses, indices = _criterion(cls_weight=1.0, no_object_weight=0.1)(outputs, [target])
    q = int(indices[0][0][0])
    logp = F.log_softmax(outputs["pred_logits"][0].detach(), -1)
    weights = torch.tensor([1.0 if i == q else 0.1 for i in range(3)])
    classes = [int(target["labels"][0]) if i == q else 3 for i in range(3)]
    nll = torch.stack([-logp[i, c] for i, c in enumerate(classes)])
    assert torch.allclose(losses["loss_cls"], (weights * nll).sum() / weights.sum())


def test_zero_targets_only_no_object_cross_entropy() -> None:
    outputs = _outputs(batch=2, stages=2)
    empty = {
        "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
        "labels": torch.zeros(0, dtype=torch.int64),
        "ignore": torch.zeros(32, 32, dtype=torch.bool),
    }
    losses, indices = _criterion(cls_weight=2.0)(outputs, [empty, empty])
    expected = sum(
        2.0 * -F.log_softmax(o["pred_logits"].detach(), -1)[..., 3].mean()
        for o in [outputs] + outputs["aux_outputs"]
    )
    assert torch.allclose(losses["loss_cls"], expected)
    for name in ("loss_mask", "loss_dice", "loss_iou"):
        assert losses[name].item() == 0.0
    sum(losses.values()).backward()  # the graph is intact
    assert outputs["pred_logits"].grad is not None
    assert all(len(q) == 0 and len(t) == 0 for q, t in indices)


def test_mixed_empty_and_non_empty_images() -> None:
    outputs = _outputs(batch=2, stages=1)
    empty = {
        "masks": torch.zeros(0, 32, 32, dtype=torch.bool),
        "labels": torch.zeros(0, dtype=torch.int64),
        "ignore": torch.zeros(32, 32, dtype=torch.bool),
    }
    losses, indices = _criterion()(outputs, [_target(num=2), empty])
    assert len(indices[0][0]) == 2 and len(indices[1][0]) == 0
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_deep_supervision_sums_every_stage() -> None:
    outputs = _outputs(batch=2, stages=3, seed=3)
    targets = [_target(2, seed=1), _target(3, seed=2)]
    criterion = _criterion()
    torch.manual_seed(0)
    total, indices = criterion(outputs, targets)
    torch.manual_seed(0)  # per-stage calls draw the same random points in the same order
    stages = [{k: outputs[k] for k in ("pred_logits", "pred_masks", "pred_iou")}]
    stages += outputs["aux_outputs"]
    separate = [criterion(stage, targets) for stage in stages]
    for name in total:
        assert torch.allclose(total[name], sum(s[0][name] for s in separate)), name
    for (q, t), (q0, t0) in zip(indices, separate[0][1]):  # indices are the final stage's
        assert torch.equal(q, q0) and torch.equal(t, t0)
    assert len(separate[1][0]) == 4 and separate[1][0]["loss_mask"] != separate[0][0]["loss_mask"]


def test_weights_scale_each_term() -> None:
    outputs, targets = _outputs(stages=1), [_target()]
    torch.manual_seed(0)
    base, _ = _criterion(cls_weight=1.0, mask_weight=1.0, dice_weight=1.0, iou_weight=1.0)(
        outputs, targets
    )
    torch.manual_seed(0)
    scaled, _ = _criterion(cls_weight=2.0, mask_weight=5.0, dice_weight=3.0, iou_weight=0.5)(
        outputs, targets
    )
    for name, w in [("loss_cls", 2.0), ("loss_mask", 5.0), ("loss_dice", 3.0), ("loss_iou", 0.5)]:
        assert torch.allclose(scaled[name], w * base[name]), name


def test_ignored_pixels_change_no_loss() -> None:
    outputs = _outputs(batch=1, queries=4, size=16, stages=1, seed=5)
    target = _target(num=2, size=64, seed=4)
    target["ignore"][:32, :32] = True  # prediction cells [0, 8) x [0, 8)
    criterion = _criterion(num_points=512, matcher_points=512)
    torch.manual_seed(0)
    before, idx_before = criterion(outputs, [target])

    changed = {
        k: v.detach().clone().requires_grad_() for k, v in outputs.items() if k != "aux_outputs"
    }
    changed["aux_outputs"] = [
        {k: v.detach().clone() for k, v in a.items()} for a in outputs["aux_outputs"]
    ]
    with torch.no_grad():
        # cells at least one cell inside the void block: no valid point interpolates from them
        changed["pred_masks"][..., :7, :7] = torch.randn(1, 4, 7, 7) * 30
        changed["aux_outputs"][0]["pred_masks"][..., :7, :7] = 30.0
    torch.manual_seed(0)
    after, idx_after = criterion(changed, [target])
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(torch.equal(a[0], b[0]) for a, b in zip(idx_before, idx_after))
    sum(after.values()).backward()
    assert changed["pred_masks"].grad[..., :7, :7].abs().max() == 0
    assert changed["pred_masks"].grad.abs().max() > 0


def test_normalised_by_number_of_masks() -> None:
    """Two copies of one image give the same (per-mask averaged) mask losses as one copy."""
    one = _outputs(batch=1, stages=0, seed=8)
    two = {k: torch.cat([v.detach(), v.detach()]) for k, v in one.items() if k != "aux_outputs"}
    target = _target(2, seed=9)
    criterion = SetCriterion(
        3, HungarianMatcher(num_points=20000), num_points=20000, importance_sample_ratio=0.0
    )  # uniform points: a near-exact average
    torch.manual_seed(0)
    single, _ = criterion(one, [target])
    torch.manual_seed(1)
    double, _ = criterion(two, [target, target])
    for name in ("loss_mask", "loss_dice", "loss_iou"):
        assert torch.allclose(single[name].detach(), double[name], rtol=0.03), name
    assert torch.allclose(single["loss_cls"], double["loss_cls"])


def test_bad_inputs_are_named() -> None:
    outputs = _outputs()
    with pytest.raises(ValueError, match="num_classes \\+ 1 = 6"):
        SetCriterion(5, HungarianMatcher(num_points=16))(outputs, [_target()])
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\] is 32x48"):
        _criterion()(
            outputs,
            [
                {
                    "masks": torch.zeros(1, 32, 48, dtype=torch.bool),
                    "labels": torch.tensor([0]),
                    "ignore": torch.zeros(32, 48, dtype=torch.bool),
                }
            ],
        )


# ------------------------------------------------------------------------ DDP averaging
def _ddp_worker(rank: int, world_size: int, init_file: str, results) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        targets = [{"labels": torch.zeros(3 if rank == 0 else 1)}]
        results[rank] = num_masks_across_ranks(targets, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_num_masks_all_reduced_across_ranks(tmp_path) -> None:
    assert num_masks_across_ranks([{"labels": torch.zeros(0)}], torch.device("cpu")) == 1.0
    assert (
        num_masks_across_ranks(
            [{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}], torch.device("cpu")
        )
        == 5.0
    )
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, start_method="spawn"
        )
        assert dict(results) == {0: 2.0, 1: 2.0}  # (3 + 1) / 2 on both ranks
