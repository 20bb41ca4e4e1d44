"""End to end: the student and the set criterion fit one synthetic image with two squares."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pipeline.losses.criterion import SetCriterion, mask_iou
from pipeline.losses.matcher import HungarianMatcher
from pipeline.models.student import build_student


def two_squares(size: int = 64) -> tuple[torch.Tensor, dict]:
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 8:28, 10:30] = True
    masks[1, 36:60, 30:58] = True
    image = 0.1 * torch.randn(1, 3, size, size)
    image[0, 0][masks[0]] += 2.0
    image[0, 2][masks[1]] += 2.0
    ignore = torch.zeros(size, size, dtype=torch.bool)
    ignore[:, :4] = True  # a void border, excluded from the mask losses
    masks[:, ignore] = False
    return image, {"masks": masks, "labels": torch.tensor([0, 1]), "ignore": ignore}


def test_overfits_two_squares() -> None:
    torch.manual_seed(0)
    image, target = two_squares()
    cfg = SimpleNamespace(
        backbone=SimpleNamespace(name="regnetx_002", pretrained_path=None, freeze_bn=False),
        neck=SimpleNamespace(channels=32, mask_stride=4, use_coord=True),
        use_learnable_fusion=True,
        head=SimpleNamespace(
            num_queries=8, num_stages=2, ffn_dim=64, num_mask_fcs=1, kernel_size=3
        ),
    )
    student = build_student(cfg, num_classes=2).train()
    criterion = SetCriterion(2, HungarianMatcher(num_points=256), num_points=256)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)

    first = None
    for _ in range(150):
        losses, _ = criterion(student(image), [target])
        loss = sum(losses.values())
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first

    student.eval()
    with torch.no_grad():
        out = student(image)
    probs = out["pred_logits"][0].softmax(-1)  # [Q, K + 1]
    for k in range(2):
        # PQ-like: the most confident query for the class is a real detection of that class
        # whose mask overlaps the ground truth with IoU > 0.8 (void pixels ignored)
        q = int(probs[:, k].argmax())
        assert int(probs[q].argmax()) == k
        iou = mask_iou(
            out["pred_masks"][0, q : q + 1], target["masks"][k : k + 1], target["ignore"][None]
        )
        assert float(iou) > 0.8, (k, float(iou))
        assert abs(float(out["pred_iou"][0, q]) - float(iou)) < 0.2
