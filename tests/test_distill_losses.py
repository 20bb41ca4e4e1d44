"""SAM distillation losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.distill import (
    cls_distill_loss,
    feat_distill_loss,
    mask_distill_loss,
    sample_valid_pixels,
)

R = 1 / math.sqrt(2)


# ------------------------------------------------------------------------------ features
def _feat_pair():
    # pixels: student (1, 0), (0, 2); teacher (3, 0), (2, 2) -> cosines 1 and 1/sqrt(2)
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]], requires_grad=True)  # [1, 2, 1, 2]
    teacher = torch.tensor([[[[3.0, 2.0]], [[0.0, 2.0]]]], requires_grad=True)
    return student, teacher


def test_feat_distill_by_hand():
    student, teacher = _feat_pair()
    both = torch.ones(1, 1, 2, dtype=torch.bool)
    # per pixel 2 (1 - cos): 0 and 2 - sqrt(2)
    assert feat_distill_loss(student, teacher, both).item() == pytest.approx((2 - 2 * R) / 2)
    second = torch.tensor([[[False, True]]])
    assert feat_distill_loss(student, teacher, second).item() == pytest.approx(2 - 2 * R)
    # invariant to the feature norms, zero for parallel features
    assert feat_distill_loss(teacher * 5, teacher, both).item() == pytest.approx(0.0, abs=1e-7)


def _feat_reference(student, teacher, valid):
    per_pixel = (F.normalize(student, dim=1) - F.normalize(teacher, dim=1)).pow(2).sum(1)
    w = valid.float()
    return (per_pixel * w).sum() / w.sum().clamp(min=1.0)


def test_feat_distill_equals_normalised_difference_with_zero_vectors():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 4, 6, generator=g)
    teacher = torch.randn(3, 5, 4, 6, generator=g)
    student[0, :, 1, 2] = 0  # a dead (all-ReLU-zero) student pixel
    teacher[1, :, :2] = 0  # zeroed (invalid) teacher pixels, here counted as valid
    valid = torch.rand(3, 4, 6, generator=g) > 0.3
    valid[0, 1, 2] = valid[1, 0, 0] = True
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    got, want = feat_distill_loss(s1, teacher, valid), _feat_reference(s2, teacher, valid)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    assert torch.isfinite(s1.grad).all()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_feat_distill_nothing_valid_is_zero_but_differentiable():
    student, teacher = _feat_pair()
    loss = feat_distill_loss(student, teacher, torch.zeros(1, 1, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_feat_distill_gradient_reaches_student_only():
    student, teacher = _feat_pair()
    feat_distill_loss(student, teacher, torch.ones(1, 1, 2, dtype=torch.bool)).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_feat_distill_bad_shapes():
    with pytest.raises(ValueError, match="equal"):
        feat_distill_loss(
            torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="valid must be"):
        feat_distill_loss(
            torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(3, 3, dtype=torch.bool)
        )


# ------------------------------------------------------------------------------- classes
def test_cls_distill_known_distributions_and_t_squared():
    T = 2.0
    p_t = torch.tensor([[0.5, 0.25, 0.25], [0.8, 0.1, 0.1]])
    teacher = p_t.log() * T  # softmax(teacher / T) = p_t
    student = torch.cat([torch.zeros(2, 3), torch.tensor([[7.0], [-3.0]])], 1)  # uniform + no-obj
    kl = (p_t * (p_t / (1 / 3)).log()).sum(1)  # KL(p_t || uniform) per row
    expected = kl.mean() * T**2
    assert cls_distill_loss(student, teacher, T).item() == pytest.approx(expected.item(), rel=1e-6)
    # hand value of row 0: 0.5 ln 1.5 + 0.5 ln 0.75
    assert kl[0].item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    # the no-object logit does not enter
    student2 = student.clone()
    student2[:, -1] = 100.0
    assert cls_distill_loss(student2, teacher, T).item() == pytest.approx(expected.item(), rel=1e-6)


def test_cls_distill_equal_is_zero_and_t_squared_scaling():
    torch.manual_seed(0)
    t = torch.randn(4, 5)
    s = torch.cat([t, torch.randn(4, 1)], 1)
    assert cls_distill_loss(s, t, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    # same softened distributions at T = 1 and T = 3 (logits scaled by 3): the loss scales by 9
    s, t = torch.randn(4, 6), torch.randn(4, 5)
    base = cls_distill_loss(s, t, 1.0)
    scaled = cls_distill_loss(s * 3, t * 3, 3.0)
    assert scaled.item() == pytest.approx(9 * base.item(), rel=1e-5)


def test_cls_distill_gradient_and_empty():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 3, requires_grad=True)
    cls_distill_loss(s, t, 4.0).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert s.grad[:, -1].abs().sum() == 0  # no-object logit untouched
    empty = cls_distill_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 3), 4.0)
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match=r"\[M, K\+1\]"):
        cls_distill_loss(torch.zeros(3, 3), torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        cls_distill_loss(torch.zeros(3, 4), torch.zeros(3, 3), 0.0)


# --------------------------------------------------------------------------------- masks
def test_mask_distill_by_hand():
    T = 2.0
    student = torch.tensor([[[0.0, 2.0]]])  # [M=1, 1, 2]
    teacher = torch.tensor([[[0.0, T * math.log(3.0)]]])  # sigmoid(t / T) = 0.5, 0.75
    both = torch.ones(1, 1, 2, dtype=torch.bool)
    bce0 = math.log(2.0)  # x = 0, y = 0.5
    bce1 = 2 - 2 * 0.75 + math.log(1 + math.exp(-2))  # max(x,0) - x y + log(1 + e^-|x|)
    assert mask_distill_loss(student, teacher, both, T, 16).item() == pytest.approx(
        (bce0 + bce1) / 2, rel=1e-6
    )
    first = torch.tensor([[[True, False]]])
    assert mask_distill_loss(student, teacher, first, T, 16).item() == pytest.approx(bce0)
    # torch's BCE agrees on the same two pixels
    ref = F.binary_cross_entropy_with_logits(student.flatten(), torch.tensor([0.5, 0.75]))
    assert mask_distill_loss(student, teacher, both, T, 16).item() == pytest.approx(ref.item())


def test_mask_distill_is_minimal_at_the_softened_teacher():
    # BCE with a soft target y is minimised at logit x = logit(y) = t / T: zero gradient there
    T = 4.0
    teacher = torch.randn(3, 6, 6) * 5
    student = (teacher / T).clone().requires_grad_(True)
    mask_distill_loss(student, teacher, torch.ones(1, 6, 6, dtype=torch.bool), T, 64).backward()
    assert student.grad.abs().max().item() < 1e-7


def test_mask_distill_per_mask_valid_and_broadcast():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    shared = torch.rand(1, 4, 4) > 0.3
    torch.testing.assert_close(
        mask_distill_loss(s, t, shared, 2.0, 100),
        mask_distill_loss(s, t, shared.expand(2, -1, -1), 2.0, 100),
    )
    # a mask with no valid pixel is left out of the mean over masks
    valid = torch.stack([shared[0], torch.zeros(4, 4, dtype=torch.bool)])
    torch.testing.assert_close(
        mask_distill_loss(s, t, valid, 2.0, 100), mask_distill_loss(s[:1], t[:1], shared, 2.0, 100)
    )
    none = mask_distill_loss(s.requires_grad_(), t, torch.zeros(1, 4, 4, dtype=torch.bool), 2.0, 8)
    assert none.item() == 0.0 and none.requires_grad


def test_mask_distill_teacher_gets_no_gradient():
    s = torch.randn(2, 5, 5, requires_grad=True)
    t = torch.randn(2, 5, 5, requires_grad=True)
    mask_distill_loss(s, t, torch.ones(1, 5, 5, dtype=torch.bool), 3.0, 10).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_sample_valid_pixels_draws_distinct_valid_pixels():
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[0].view(-1)[[0, 3, 5, 6, 9, 10, 11, 12, 14, 15]] = True  # 10 valid
    valid[1, 1:3, 1:3] = True  # 4 valid
    gen = torch.Generator().manual_seed(3)
    index, weight = sample_valid_pixels(valid, 4, gen)
    assert index.shape == (2, 4) and torch.all(weight == 1)
    for m in range(2):
        assert len(set(index[m].tolist())) == 4
        assert valid[m].view(-1)[index[m]].all()
    # few valid pixels: every one of them is taken, the filler has weight 0
    index, weight = sample_valid_pixels(valid, 12)
    for m in range(2):
        taken = set(index[m][weight[m] > 0].tolist())
        assert taken == set(valid[m].view(-1).nonzero().view(-1).tolist())
    # at least as many points as pixels: every pixel, weighted by its validity
    index, weight = sample_valid_pixels(valid, 16)
    assert torch.equal(index, torch.arange(16).expand(2, 16))
    assert torch.equal(weight, valid.flatten(1).float())
    # reproducible from a generator
    a = sample_valid_pixels(valid, 3, torch.Generator().manual_seed(7))[0]
    b = sample_valid_pixels(valid, 3, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_mask_distill_subsample_is_unbiased_estimate():
    # averaging the sampled loss over many draws approaches the all-pixel loss
    torch.manual_seed(0)
    s, t = torch.randn(1, 8, 8) * 3, torch.randn(1, 8, 8) * 3
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    full = mask_distill_loss(s, t, valid, 1.0, 64)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([mask_distill_loss(s, t, valid, 1.0, 16, gen) for _ in range(400)])
    assert not torch.allclose(draws, full)  # individual draws differ
    assert draws.mean().item() == pytest.approx(full.item(), rel=0.03)


def test_mask_distill_bad_shapes():
    with pytest.raises(ValueError, match="valid must be"):
        mask_distill_loss(
            torch.zeros(2, 4, 4),
            torch.zeros(2, 4, 4),
            torch.ones(3, 4, 4, dtype=torch.bool),
            1.0,
            8,
        )
    with pytest.raises(ValueError, match="equal"):
        mask_distill_loss(
            torch.zeros(2, 4, 4),
            torch.zeros(2, 4, 5),
            torch.ones(1, 4, 4, dtype=torch.bool),
            1.0,
            8,
        )
    with pytest.raises(ValueError, match="num_points"):
        sample_valid_pixels(torch.ones(1, 2, 2, dtype=torch.bool), 0)
