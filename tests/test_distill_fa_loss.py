"""Feature-affinity loss: hand-computed values and batch independence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.fa_loss import affinity_matrix, fa_loss, pool_factor


def _hand_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 student map with pixels (1,0) (0,1) / (1,1) (-2,0); a teacher map all along +x."""
    student = torch.tensor([[[1.0, 0.0], [1.0, -2.0]], [[0.0, 1.0], [1.0, 0.0]]])[
        None
    ]  # [1, C=2, 2, 2]
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])[None]
    return student, teacher


def test_affinity_matrix_by_hand():
    student, teacher = _hand_pair()
    r = 1 / math.sqrt(2)
    expected = torch.tensor(
        [[1, 0, r, -1], [0, 1, r, 0], [r, r, 1, -r], [-1, 0, -r, 1]], dtype=torch.float32
    )
    torch.testing.assert_close(affinity_matrix(student, 1.0)[0], expected)
    torch.testing.assert_close(affinity_matrix(teacher, 1.0)[0], torch.ones(4, 4))


def test_fa_loss_hand_computed_2x2():
    # |A_s - 1| upper-triangle entries: 1, 1 - r, 2, 1 - r, 1, 1 + r -> sum 7 - r; the diagonal
    # is 0 and the matrix symmetric, so the mean over 16 entries is (14 - 2 r) / 16.
    student, teacher = _hand_pair()
    expected = (14 - 2 / math.sqrt(2)) / 16
    assert fa_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_pooling_uses_kernel_and_stride_one_over_subscale():
    # Each pixel repeated 2x2 pools back to the 2x2 map (k = round(1 / 0.5) = 2).
    student, teacher = _hand_pair()
    big_s = student.repeat_interleave(2, 2).repeat_interleave(2, 3)
    big_t = teacher.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(fa_loss(big_s, big_t, 0.5), fa_loss(student, teacher, 1.0))
    # a 5x5 map with k = 2 keeps the 2x2 full windows and drops the last row / column
    x = torch.randn(1, 3, 5, 5)
    pooled = F.avg_pool2d(x[..., :4, :4], 2)
    torch.testing.assert_close(affinity_matrix(x, 0.5), affinity_matrix(pooled, 1.0))
    assert pool_factor(0.0625) == 16


def test_equal_inputs_give_zero_and_scale_invariance():
    x = torch.randn(2, 4, 8, 8)
    assert fa_loss(x, x.clone(), 0.25).item() == 0.0
    # cosine affinities ignore a per-pixel positive scale of the features
    scaled = x * torch.rand(2, 1, 8, 8).add(0.5)
    assert fa_loss(scaled, x, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_batch_loss_is_mean_of_per_sample_losses():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 8, 8), torch.randn(3, 7, 8, 8)  # teacher width may differ
    per_sample = torch.stack([fa_loss(s[i : i + 1], t[i : i + 1], 0.25) for i in range(3)])
    batched = fa_loss(s, t, 0.25)
    torch.testing.assert_close(batched, per_sample.mean())
    # and it does not depend on which other samples share the batch
    torch.testing.assert_close(fa_loss(s[:2], t[:2], 0.25), per_sample[:2].mean())


def test_naive_batch_reductions_differ():
    """Why the public DSRL code is wrong for B > 1.

    (a) It takes ``torch.norm(A_s - A_t, 1) / N^2`` over the whole ``[B, N, N]`` tensor: the L1
        norm sums over the batch, so the value is B times the per-sample mean and grows with the
        batch size.
    (b) A reshape that flattens the batch into one pixel set (``[C, B * N]``) builds one
        ``[B N, B N]`` affinity matrix whose off-diagonal blocks compare pixels of *different*
        images, which have nothing to do with either image's structure.
    Our loss equals the mean of per-sample losses (previous test); both naive values differ.
    """
    torch.manual_seed(1)
    B, k = 3, 2
    s, t = torch.randn(B, 4, 8, 8), torch.randn(B, 4, 8, 8)
    ours = fa_loss(s, t, 1 / k)
    n = (8 // k) ** 2

    naive_sum = (affinity_matrix(s, 1 / k) - affinity_matrix(t, 1 / k)).abs().sum() / n**2
    torch.testing.assert_close(naive_sum, B * ours)  # exactly B times too large

    def mixed_affinity(x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, k)
        flat = pooled.permute(1, 0, 2, 3).reshape(x.shape[1], -1)  # [C, B * N]: samples mixed
        unit = F.normalize(flat, dim=0)
        return unit.T @ unit  # [B N, B N]

    naive_mixed = (mixed_affinity(s) - mixed_affinity(t)).abs().mean()
    assert abs(naive_mixed.item() - ours.item()) > 0.05 * ours.item()
    # with B = 1 the mixing reshape is harmless: the same value as ours
    torch.testing.assert_close(
        (mixed_affinity(s[:1]) - mixed_affinity(t[:1])).abs().mean(), fa_loss(s[:1], t[:1], 1 / k)
    )


def test_gradient_flows_to_student_only_when_teacher_detached():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 3, 8, 8, requires_grad=True)
    fa_loss(s, t.detach(), 0.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same batch and spatial size"):
        fa_loss(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), 1.0)
    with pytest.raises(ValueError, match="only 8x8"):
        fa_loss(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), 1 / 16)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        affinity_matrix(torch.randn(1, 2, 8, 8), 2.0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        affinity_matrix(torch.randn(2, 8, 8), 1.0)
