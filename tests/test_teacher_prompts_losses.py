"""SAM-style prompt sampling and the promptable losses, on hand-made cases."""

import math

import pytest
import torch

from pipeline.losses.promptable import dice_loss, focal_loss, mask_iou, promptable_loss
from pipeline.teacher.prompts import corrective_points, mask_boxes, noisy_boxes, sample_points


def _square(h, w, r0, r1, c0, c1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


def test_mask_boxes_are_tight_pixel_index_boxes():
    masks = torch.stack([_square(10, 12, 2, 5, 3, 9), _square(10, 12, 0, 1, 11, 12)])
    assert mask_boxes(masks).tolist() == [[3, 2, 8, 4], [11, 0, 11, 0]]
    with pytest.raises(ValueError, match="at least one pixel"):
        mask_boxes(torch.zeros(1, 4, 4, dtype=torch.bool))


def test_noisy_boxes_scale_with_side_cap_and_stay_inside():
    boxes = torch.tensor([[10.0, 10.0, 19.0, 29.0]])  # width 10, height 20
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((1, 4), generator=torch.Generator().manual_seed(0))
    out = noisy_boxes(boxes, 0.1, 20.0, (100, 100), g)
    expect = boxes + eps * torch.tensor([[1.0, 2.0, 1.0, 2.0]])  # std = 10 % of the side
    assert torch.allclose(out, expect, atol=1e-5)
    # the cap bounds the std; clipping keeps the box in the frame and ordered
    big = torch.tensor([[0.0, 0.0, 999.0, 999.0]])
    out = noisy_boxes(big, 0.1, 2.0, (1000, 1000), torch.Generator().manual_seed(1))
    eps = torch.randn((1, 4), generator=torch.Generator().manual_seed(1))
    expect = (big + 2.0 * eps).clamp(0, 999)
    assert torch.allclose(out, expect, atol=1e-4)
    assert out[0, 0] <= out[0, 2] and out[0, 1] <= out[0, 3]


def test_sample_points_lie_in_their_mask_and_pad_with_minus_one():
    masks = torch.stack([_square(8, 8, 1, 3, 2, 5), _square(8, 8, 6, 7, 0, 1)])
    pts, labels = sample_points(masks, torch.tensor([3, 1]), torch.Generator().manual_seed(3))
    assert pts.shape == (2, 3, 2) and labels.tolist() == [[1, 1, 1], [1, -1, -1]]
    for k in range(2):
        for n in range(3):
            if labels[k, n] == 1:
                x, y = int(pts[k, n, 0]), int(pts[k, n, 1])
                assert masks[k, y, x]
    assert pts[1, 0].tolist() == [0.0, 6.0]  # the single-pixel mask


def test_corrective_point_sign_follows_the_error_kind():
    target = _square(6, 6, 0, 3, 0, 3).expand(2, -1, -1).clone()
    pred = torch.zeros_like(target)
    pred[1] = _square(6, 6, 0, 6, 0, 6)  # everything predicted: errors are false positives only
    pred[1] &= ~target[1]
    pred[1] |= target[1]
    valid = torch.ones(6, 6, dtype=torch.bool)
    pts, labels = corrective_points(pred, target, valid, torch.Generator().manual_seed(0))
    # image 0 misses the whole square: a positive point inside it
    x, y = int(pts[0, 0, 0]), int(pts[0, 0, 1])
    assert labels[0, 0] == 1 and target[0, y, x]
    # image 1 covers too much: a negative point outside the square
    x, y = int(pts[1, 0, 0]), int(pts[1, 0, 1])
    assert labels[1, 0] == 0 and not target[1, y, x]
    # no error (or errors only on ignored pixels): padding point
    pts, labels = corrective_points(target.clone(), target, valid, torch.Generator())
    assert labels.tolist() == [[-1], [-1]]
    pts, labels = corrective_points(
        pred, target, torch.zeros(6, 6, dtype=torch.bool), torch.Generator()
    )
    assert labels.tolist() == [[-1], [-1]]


def test_losses_against_hand_computed_values():
    # one prompt, two candidates over 4 pixels; the last pixel is ignored
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]], [[-2.0, -2.0], [-2.0, -2.0]]]])
    target = torch.tensor([[[True, False], [False, True]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    # IoU over valid pixels: candidate 0 predicts {0, 2}, target {0}: 1/2; candidate 1: 0/1
    assert mask_iou(logits, target, valid).tolist() == [[0.5, 0.0]]

    def focal(x, t, alpha=0.25, gamma=2.0):
        p = 1 / (1 + math.exp(-x))
        pt = p if t else 1 - p
        ce = -math.log(pt)
        a = alpha if t else 1 - alpha
        return a * ce * (1 - pt) ** gamma

    f0 = (focal(2.0, 1) + focal(-1.0, 0) + focal(0.5, 0)) / 3
    f1 = (focal(-2.0, 1) + focal(-2.0, 0) + focal(-2.0, 0)) / 3
    assert focal_loss(logits, target, valid)[0].tolist() == pytest.approx([f0, f1], rel=1e-5)

    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    d0 = 1 - (2 * s(2.0) + 1) / (s(2.0) + s(-1.0) + s(0.5) + 1 + 1)
    d1 = 1 - (2 * s(-2.0) + 1) / (3 * s(-2.0) + 1 + 1)
    assert dice_loss(logits, target, valid)[0].tolist() == pytest.approx([d0, d1], rel=1e-5)

    iou_pred = torch.tensor([[0.7, 0.1]])
    losses, true_iou, best = promptable_loss(logits, iou_pred, target, valid, 20.0, 1.0, 2.0)
    b = 0 if 20 * f0 + d0 < 20 * f1 + d1 else 1
    assert best.tolist() == [b]
    assert float(losses["loss_focal"]) == pytest.approx(20 * [f0, f1][b], rel=1e-5)
    assert float(losses["loss_dice"]) == pytest.approx([d0, d1][b], rel=1e-5)
    assert float(losses["loss_iou"]) == pytest.approx(
        2.0 * ((0.7 - 0.5) ** 2 + 0.1**2) / 2, rel=1e-5
    )
