"""point_sample and Mask2Former importance sampling."""

from __future__ import annotations

import pytest
import torch

from pipeline.losses.point_sampling import (
    point_sample,
    sample_pixels,
    uncertainty,
    uncertainty_points,
)


def test_point_sample_pixel_centres_and_midpoints() -> None:
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None, None]  # [1, 1, 2, 3]
    # pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H) in normalised coordinates
    coords = torch.tensor([[[0.5 / 3, 0.25], [2.5 / 3, 0.75], [1.0 / 3, 0.25], [1.5 / 3, 0.5]]])
    out = point_sample(grid, coords)
    assert out.shape == (1, 1, 4)
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 6.0, 1.5, 3.5]))


def test_point_sample_nearest_and_3d_input() -> None:
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])[None]  # [1, 2, 3]
    coords = torch.tensor([[[0.01, 0.01], [0.99, 0.99], [0.4, 0.6]]])
    out = point_sample(grid, coords, mode="nearest")
    assert out.shape == (1, 3)
    assert torch.equal(out[0], torch.tensor([1.0, 6.0, 5.0]))


def test_point_sample_same_location_across_resolutions() -> None:
    # a coarse map and its 4x nearest-upsampled copy agree at every point under "nearest"
    coarse = torch.randn(1, 1, 4, 5)
    fine = coarse.repeat_interleave(4, -2).repeat_interleave(4, -1)
    coords = torch.rand(1, 200, 2)
    assert torch.equal(
        point_sample(coarse, coords, mode="nearest"), point_sample(fine, coords, mode="nearest")
    )


def test_point_sample_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"coords \[N, P, 2\]"):
        point_sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5, 3))


def test_sample_pixels_floor_convention_keeps_dtype() -> None:
    maps = torch.tensor([[[True, False, False], [False, False, True]]])  # [1, 2, 3]
    # x = 0.34 * 3 = 1.02 -> column 1; x = 1/3 exactly -> column 1; y = 0.5 -> row 1; 1.0 clamps
    shared = torch.tensor([[0.1, 0.1], [0.34, 0.2], [1 / 3 + 1e-6, 0.5], [1.0, 1.0]])
    out = sample_pixels(maps, shared)
    assert out.dtype == torch.bool
    assert out.tolist() == [[True, False, False, True]]
    per_map = torch.stack([shared[:2], shared[2:]])
    two = torch.stack([maps[0], ~maps[0]])
    assert sample_pixels(two, per_map).tolist() == [[True, False], [True, False]]
    # away from pixel borders it agrees with grid_sample's nearest mode
    coords = (torch.randint(0, 30, (2, 50, 2)) + 0.5) / 30
    fine = torch.rand(2, 30, 30) > 0.5
    assert torch.equal(
        sample_pixels(fine, coords), point_sample(fine.float(), coords, "nearest") > 0.5
    )
    with pytest.raises(ValueError, match="coords"):
        sample_pixels(two, torch.rand(3, 4, 2))


def test_uncertainty_is_minus_abs() -> None:
    assert torch.equal(uncertainty(torch.tensor([-2.0, 0.0, 3.0])), torch.tensor([-2.0, 0.0, -3.0]))


def _boundary_logits(n: int = 2, size: int = 16) -> torch.Tensor:
    # decision boundary at x = 0.5: logit = 10 * (x - 0.5) at pixel centres
    xs = (torch.arange(size) + 0.5) / size
    return (10 * (xs - 0.5)).expand(n, size, size).clone()


def test_importance_points_are_the_most_uncertain_candidates() -> None:
    logits = _boundary_logits()
    points = uncertainty_points(
        logits,
        num_points=40,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        generator=torch.Generator().manual_seed(0),
    )
    assert points.shape == (2, 40, 2)
    assert ((points >= 0) & (points <= 1)).all()

    candidates = torch.rand(2, 120, 2, generator=torch.Generator().manual_seed(0))
    score = -point_sample(logits, candidates).abs()
    expected = torch.gather(
        candidates, 1, score.topk(30, dim=1).indices[..., None].expand(-1, -1, 2)
    )
    assert torch.equal(points[:, :30], expected)
    # importance points hug the boundary much more closely than the uniform remainder
    assert (points[:, :30, 0] - 0.5).abs().mean() < 0.5 * (points[:, 30:, 0] - 0.5).abs().mean()


def test_importance_points_avoid_ignored_pixels() -> None:
    logits = _boundary_logits(n=1)
    ignore = torch.zeros(1, 64, 64, dtype=torch.bool)
    ignore[:, :, 28:] = True  # the uncertain band right of x = 0.4375 is void
    points = uncertainty_points(
        logits, 50, 3.0, 0.5, ignore=ignore, generator=torch.Generator().manual_seed(1)
    )
    assert (points[0, :25, 0] < 28 / 64).all()


def test_bad_ratios_are_rejected() -> None:
    with pytest.raises(ValueError, match="oversample_ratio"):
        uncertainty_points(torch.zeros(1, 4, 4), 8, oversample_ratio=0.5)
