"""warp_affine against hand-derived resamplings and torch's own interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.geometry import hflip_matrix, scale_matrix, translate_matrix, warp_affine


def _ramp(c: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(c * h * w, dtype=dtype).view(c, h, w)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_identity(mode):
    src = _ramp(2, 5, 7)
    out, valid = warp_affine(src, np.eye(3), (5, 7), mode)
    assert valid.all() and valid.shape == (5, 7)
    if mode == "nearest":
        assert torch.equal(out, src)
    else:  # float32 sampling grid
        torch.testing.assert_close(out, src, rtol=0, atol=1e-4)


def test_integer_translation_shifts_and_marks_outside_invalid():
    src = _ramp(1, 4, 5, torch.int64) + 1
    out, valid = warp_affine(src, translate_matrix(2, 1), (4, 5), "nearest", fill=-1)
    expected_valid = torch.zeros(4, 5, dtype=torch.bool)
    expected_valid[1:, 2:] = True
    assert torch.equal(valid, expected_valid)
    assert torch.equal(out[0, 1:, 2:], src[0, :3, :3])
    assert (out[0][~valid] == -1).all()


def test_nearest_upscale_by_two_repeats_pixels():
    src = _ramp(1, 3, 4, torch.int64)
    out, valid = warp_affine(src, scale_matrix(2, 2), (6, 8), "nearest")
    assert torch.equal(out, src.repeat_interleave(2, 1).repeat_interleave(2, 2)) and valid.all()


def test_nearest_downscale_by_two_takes_pixel_covering_centre():
    # dst pixel i has centre i + 0.5 -> src 2i + 1.0, which lies in src pixel 2i + 1.
    src = _ramp(1, 6, 8, torch.int64)
    out, _ = warp_affine(src, scale_matrix(0.5, 0.5), (3, 4), "nearest")
    assert torch.equal(out, src[:, 1::2, 1::2])


def test_nearest_odd_ratio_by_hand():
    # 3 -> 2 columns: dst centres 0.5, 1.5 -> src 0.75, 2.25 -> columns 0, 2.
    src = torch.tensor([[[10, 11, 12]]])
    out, _ = warp_affine(src, scale_matrix(2 / 3, 1), (1, 2), "nearest")
    assert out.tolist() == [[[10, 12]]]


def test_nearest_is_exact_for_large_int64_and_bool():
    src = (torch.arange(35, dtype=torch.int64) + (1 << 40)).view(1, 5, 7)
    out, _ = warp_affine(src, hflip_matrix(7), (5, 7), "nearest")
    assert out.dtype == torch.int64 and torch.equal(out, torch.flip(src, dims=[-1]))
    mask = src % 3 == 0
    out_b, _ = warp_affine(mask, scale_matrix(3, 3), (15, 21), "nearest")
    assert out_b.dtype == torch.bool
    assert torch.equal(out_b, mask.repeat_interleave(3, 1).repeat_interleave(3, 2))


def test_bilinear_matches_interpolate_with_align_corners_false():
    src = torch.rand(3, 5, 6, dtype=torch.float64)
    out, valid = warp_affine(src, scale_matrix(13 / 6, 11 / 5), (11, 13), "bilinear")
    ref = F.interpolate(src[None], size=(11, 13), mode="bilinear", align_corners=False)[0]
    assert valid.all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_bilinear_downscale_by_two_averages_blocks():
    src = torch.rand(2, 4, 6)
    out, _ = warp_affine(src, scale_matrix(0.5, 0.5), (2, 3), "bilinear")
    ref = F.avg_pool2d(src[None], 2)[0]
    torch.testing.assert_close(out, ref)


def test_rotation_uses_general_inverse():
    # (x, y) -> (h - y, x) is a clockwise quarter turn: dst[i, j] = src[h - 1 - j, i].
    src = _ramp(1, 3, 5, torch.int64)
    h = 3
    m = np.array([[0.0, -1.0, h], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out, valid = warp_affine(src, m, (5, 3), "nearest")
    assert torch.equal(out, torch.rot90(src, k=-1, dims=(1, 2))) and valid.all()


def test_batch_of_matrices_matches_loop():
    src = torch.rand(3, 2, 7, 9)
    mats = np.stack(
        [
            scale_matrix(1.7, 0.6),
            translate_matrix(-2.5, 1) @ hflip_matrix(9),
            scale_matrix(0.5, 2.0) @ translate_matrix(1, 1),
        ]
    )
    for mode in ("nearest", "bilinear"):
        out, valid = warp_affine(src, torch.from_numpy(mats), (8, 10), mode)
        assert out.shape == (3, 2, 8, 10) and valid.shape == (3, 8, 10)
        for b in range(3):
            ob, vb = warp_affine(src[b], mats[b], (8, 10), mode)
            assert torch.equal(out[b], ob) and torch.equal(valid[b], vb)
    shared, _ = warp_affine(src, mats[0], (8, 10), "nearest")
    assert torch.equal(shared[2], warp_affine(src[2], mats[0], (8, 10), "nearest")[0])


def test_valid_region_of_a_shrink_into_a_larger_canvas():
    src = torch.ones(1, 4, 6)
    out, valid = warp_affine(src, scale_matrix(0.5, 0.5), (5, 5), "bilinear")
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :3] = True
    assert torch.equal(valid, expected) and torch.equal(out[0], expected.float())
    # fill=None: no fill pass, the border-extended samples stay where the caller will mask
    kept, valid_kept = warp_affine(src, scale_matrix(0.5, 0.5), (5, 5), "bilinear", fill=None)
    assert torch.equal(valid_kept, expected) and torch.equal(kept, torch.ones(1, 5, 5))


def test_errors():
    src = torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="floating point"):
        warp_affine(src, np.eye(3), (4, 4), "bilinear")
    with pytest.raises(ValueError, match="singular"):
        warp_affine(src, scale_matrix(0, 1), (4, 4), "nearest")
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        warp_affine(src, np.eye(2), (4, 4), "nearest")
    with pytest.raises(ValueError, match="last row"):
        warp_affine(src, np.ones((3, 3)), (4, 4), "nearest")
    with pytest.raises(ValueError, match="src must be"):
        warp_affine(torch.zeros(4, 4), np.eye(3), (4, 4), "nearest")
    with pytest.raises(ValueError, match="batch"):
        warp_affine(torch.zeros(2, 1, 4, 4), np.stack([np.eye(3)] * 3), (4, 4), "nearest")
    with pytest.raises(ValueError, match="mode"):
        warp_affine(src, np.eye(3), (4, 4), "cubic")


@pytest.mark.parametrize("seed", range(10))
def test_nearest_matches_per_pixel_reference(seed):
    """Random axis-aligned maps (incl. flips, fractional shifts) against a per-pixel numpy loop."""
    rng = np.random.default_rng(seed)
    h, w, H, W = (int(v) for v in rng.integers(2, 12, 4))
    sx, sy = rng.uniform(0.3, 3.0, 2) * rng.choice([-1, 1], 2)
    tx, ty = rng.uniform(-5, 15, 2)
    m = np.array([[sx, 0, tx], [0, sy, ty], [0, 0, 1]])
    src = torch.from_numpy(rng.integers(0, 1000, (2, h, w)))
    out, valid = warp_affine(src, m, (H, W), "nearest", fill=-7)
    for i in range(H):
        for j in range(W):
            x, y = (j + 0.5 - tx) / sx, (i + 0.5 - ty) / sy
            inside = 0 <= x < w and 0 <= y < h
            assert bool(valid[i, j]) == inside
            expected = (
                src[:, int(np.floor(y)), int(np.floor(x))] if inside else torch.full((2,), -7)
            )
            assert torch.equal(out[:, i, j], expected)
