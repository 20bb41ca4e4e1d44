"""Warping cached teacher outputs onto augmented views: exact cases and an equivariant teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.geometry import hflip_matrix, scale_matrix, translate_matrix, warp_affine
from pipeline.training.teacher_targets import (
    batch_warp_teacher_targets,
    inside_extent,
    map_to_view_matrix,
    stack_teacher_items,
    warp_teacher_targets,
)
from pipeline.training.trainer import collate_training_batch


def _item(features, mask_logits, orig_size, input_size, num_classes=3, seed=0):
    """A TeacherCache.get-style dict."""
    g = torch.Generator().manual_seed(seed)
    m = mask_logits.shape[0]
    return {
        "features": features,
        "level_names": [f"l{i}" for i in range(len(features))],
        "segment_ids": torch.arange(m, dtype=torch.int64) * 7 + 1,
        "mask_logits": mask_logits,
        "iou": torch.rand(m, generator=g),
        "embeddings": torch.randn(m, 256, generator=g),
        "cls_logits": torch.randn(m, num_classes, generator=g),
        "scale": input_size / max(orig_size),
        "input_size": input_size,
        "orig_size": orig_size,
    }


# ---------------------------------------------------------------- exact flip + translate
def _flip_translate_case():
    # S = 64, original 48 x 64 (s = 1): the image fills frame rows [0, 48), rows [48, 64) are
    # SAM's zero padding. Maps are 16 x 16 (stride 4), masks 32 x 32 (stride 2).
    # View 64 x 64: x' = 56 - x (flip, then shift left by 8), y' = y + 8.
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(5, 16, 16, generator=g)
    masks = torch.randn(2, 32, 32, generator=g)
    item = _item([fmap], masks, orig_size=(48, 64), input_size=64)
    transform = translate_matrix(-8, 8) @ hflip_matrix(64)
    return item, transform, fmap, masks


def test_flip_translate_is_exact_by_hand():
    item, transform, fmap, masks = _flip_translate_case()
    out = warp_teacher_targets(item, transform, (64, 64), [(16, 16)], (16, 16))
    feat, valid = out["features"][0], out["feature_valid"][0]
    # grid cell (i, j) has view centre (4j + 2, 4i + 2) -> original (54 - 4j, 4i - 6), which is
    # the centre of cached cell (i - 2, 13 - j); inside the 48 x 64 image for i in 2..13, j <= 13
    expected_valid = torch.zeros(16, 16, dtype=torch.bool)
    expected_valid[2:14, :14] = True
    assert torch.equal(valid, expected_valid)
    for i in range(2, 14):
        for j in range(14):
            torch.testing.assert_close(feat[:, i, j], fmap[:, i - 2, 13 - j], rtol=0, atol=1e-5)
    assert torch.all(feat[:, ~valid] == 0)
    # cached rows 12..15 are SAM padding: rows 14, 15 of the view map to them and are invalid
    assert not valid[14:].any()


def test_mask_grid_uses_its_own_resolution():
    # masks are 32 x 32 over the 64-px frame: cell (i, j) of the 16 x 16 mask grid has original
    # centre (54 - 4j, 4i - 6) = mask coordinates (27 - 2j, 2i - 3), the corner shared by four
    # mask cells, so bilinear sampling gives their mean.
    item, transform, _, masks = _flip_translate_case()
    out = warp_teacher_targets(item, transform, (64, 64), [(16, 16)], (16, 16))
    assert torch.equal(out["mask_valid"], out["feature_valid"][0])
    for i in range(2, 14):
        for j in range(14):
            block = masks[:, 2 * i - 4 : 2 * i - 2, 26 - 2 * j : 28 - 2 * j].mean((1, 2))
            torch.testing.assert_close(out["mask_logits"][:, i, j], block, rtol=0, atol=1e-5)
    assert torch.equal(out["segment_ids"], item["segment_ids"])
    torch.testing.assert_close(out["cls_logits"], item["cls_logits"])


def test_composed_matrix_follows_the_documented_chain():
    a_view = translate_matrix(3, -5) @ scale_matrix(1.5, 1.5) @ hflip_matrix(80)
    m = map_to_view_matrix(a_view, scale=0.8, input_size=64, map_size=(16, 8))
    # map cell (0, 0), centre (0.5, 0.5), by hand: frame = (0.5 * 64 / 8, 0.5 * 64 / 16) = (4, 2);
    # original = frame / 0.8 = (5, 2.5); view = flip (75, 2.5) -> scale 1.5 (112.5, 3.75)
    # -> translate (115.5, -1.25)
    np.testing.assert_allclose(m @ np.array([0.5, 0.5, 1.0]), [115.5, -1.25, 1.0])


# ----------------------------------------------------------- equivariant stand-in teacher
S = 64


def _stand_in_teacher(frame: torch.Tensor) -> torch.Tensor:
    """Fixed random 3x3 conv (left-right symmetric kernel, so it commutes with a flip) then a
    4x4 average pool: a stride-4 map, equivariant to flips and to shifts by multiples of 4."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(8, 3, 3, 3, generator=g)
    k = (k + k.flip(-1)) / 2
    return F.avg_pool2d(F.conv2d(frame[None], k, padding=1), 4)[0]


def _sam_frame(image: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SAM's preprocessing: longest side -> S (bilinear, antialiased), top-left, zero-padded."""
    h, w = image.shape[-2:]
    s = S / max(h, w)
    nh, nw = round(h * s), round(w * s)
    resized = F.interpolate(
        image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
    )[0]
    return F.pad(resized, (0, S - nw, 0, S - nh)), s


def _smooth_image(h: int, w: int) -> torch.Tensor:
    """3 channels, each a sum of plane waves with wavelengths in [72, 144] original px."""
    rng = np.random.default_rng(0)
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    chans = []
    for _ in range(3):
        v = torch.zeros(h, w)
        for _ in range(3):
            lam, th, ph = rng.uniform(72, 144), rng.uniform(0, 2 * math.pi), rng.uniform(0, 6.3)
            v += torch.cos(2 * math.pi * (xx * math.cos(th) + yy * math.sin(th)) / lam + ph)
        chans.append(v)
    return torch.stack(chans)


def _erode(valid: torch.Tensor, cells: int) -> torch.Tensor:
    """Keep cells at least ``cells`` away from an invalid cell or the grid edge."""
    invalid = F.pad((~valid).float()[None, None], (cells,) * 4, value=1.0)
    return F.max_pool2d(invalid, 2 * cells + 1, stride=1)[0, 0] == 0


def test_cached_equivariant_teacher_matches_live_run_on_augmented_view():
    """Cache on the original, warp to a flipped / scaled / cropped / padded view, compare with the
    same teacher run live on the view.

    Original 72 x 96 -> frame scale s = 64 / 96. View 128 x 128 = flip, scale 4/3, shift
    (-12, +20): the left 12 px are cropped, the top 20 / bottom 12 / right 12 px are padding. The
    live run resizes the 128-px view to the 64-px frame (scale 1/2), so view and cache frames
    have the same scale (4/3 * 1/2 = 2/3) and the live map is exactly the stride-8 student grid
    (16 x 16). The two frames differ by a flip and shifts of 6 and 10 frame px, i.e. half a map
    cell off the cached cells: every warped value is a bilinear blend of two cached cells.

    Tolerance: 4% of the largest feature magnitude. The features are smooth (image wavelengths
    >= 72 original px = 48 frame px); interpolating a sinusoid of wavelength 48 px half-way
    between samples 4 px apart errs by at most 1 - cos(pi * 4 / 48) = 3.4% of its amplitude, and
    the two resampling paths (96 -> 64 vs 96 -> 128 -> 64) differ by well under 1%. Cells within
    two cells of an invalid cell or of the view edge are excluded: there the conv's zero padding
    and SAM's padding differ between the two runs. Negative controls (no flip; one cell off) must
    exceed the tolerance several times over.
    """
    h0, w0 = 72, 96
    image = _smooth_image(h0, w0)
    frame, s = _sam_frame(image)
    cached = _stand_in_teacher(frame)  # [8, 16, 16] over the 64-px frame
    item = _item([cached], torch.zeros(0, 16, 16), orig_size=(h0, w0), input_size=S)
    assert item["scale"] == s

    transform = translate_matrix(-12, 20) @ scale_matrix(4 / 3, 4 / 3) @ hflip_matrix(w0)
    view, view_valid = warp_affine(image, transform, (128, 128), "bilinear")
    assert not view_valid.all() and view_valid.any()  # padding present
    live = _stand_in_teacher(_sam_frame(view)[0])  # [8, 16, 16] = stride 8 over the view

    def max_rel_error(matrix):
        out = warp_teacher_targets(item, matrix, (128, 128), [(16, 16)], (32, 32))
        keep = _erode(out["feature_valid"][0], 2)
        err = (out["features"][0] - live).abs()[:, keep].max()
        return (err / live[:, keep].abs().max()).item(), out, keep

    rel, out, keep = max_rel_error(transform)
    # valid region by hand: view content spans x' in (-12, 116], y' in [20, 116); cell centres
    # 8k + 4 -> rows 2..13, columns 0..14
    expected_valid = torch.zeros(16, 16, dtype=torch.bool)
    expected_valid[2:14, :15] = True
    assert torch.equal(out["feature_valid"][0], expected_valid)
    assert keep.sum() >= 60
    assert rel < 0.04, rel

    no_flip = translate_matrix(-12, 20) @ scale_matrix(4 / 3, 4 / 3)
    one_cell_off = translate_matrix(-4, 20) @ scale_matrix(4 / 3, 4 / 3) @ hflip_matrix(w0)
    assert max_rel_error(no_flip)[0] > 0.5
    assert max_rel_error(one_cell_off)[0] > 0.15


# ---------------------------------------------------------------------------- batching
def test_batch_equals_per_image_and_handles_absent_entries():
    g = torch.Generator().manual_seed(1)
    items = [
        _item(
            [torch.randn(4, 16, 16, generator=g), torch.randn(6, 8, 8, generator=g)],
            torch.randn(3, 32, 32, generator=g),
            orig_size=(40, 64),
            input_size=64,
            seed=1,
        ),
        None,
        _item(
            [torch.randn(4, 16, 16, generator=g), torch.randn(6, 8, 8, generator=g)],
            torch.randn(1, 32, 32, generator=g),
            orig_size=(64, 50),
            input_size=64,
            seed=2,
        ),
    ]
    transforms = [
        translate_matrix(-5, 3) @ scale_matrix(1.3, 1.3) @ hflip_matrix(64),
        np.eye(3),
        translate_matrix(7, -2) @ scale_matrix(0.9, 0.9),
    ]
    sizes = [(16, 16), (8, 8)]
    batch = batch_warp_teacher_targets(items, transforms, (64, 64), sizes, (16, 16))
    assert batch["present"].tolist() == [True, False, True]
    for level in range(2):
        assert batch["features"][level].shape == (3, (4, 6)[level], *sizes[level])
        assert not batch["feature_valid"][level][1].any()
    assert not batch["mask_valid"][1].any()
    assert batch["mask_logits"][1].shape == (0, 16, 16) and batch["segment_ids"][1].numel() == 0
    assert batch["cls_logits"][1].shape == (0, 3)
    for b in (0, 2):
        single = warp_teacher_targets(items[b], transforms[b], (64, 64), sizes, (16, 16))
        for level in range(2):
            torch.testing.assert_close(batch["features"][level][b], single["features"][level])
            assert torch.equal(batch["feature_valid"][level][b], single["feature_valid"][level])
        torch.testing.assert_close(batch["mask_logits"][b], single["mask_logits"])
        assert torch.equal(batch["mask_valid"][b], single["mask_valid"])
        assert torch.equal(batch["segment_ids"][b], items[b]["segment_ids"])
    # a level can be skipped
    skipped = batch_warp_teacher_targets(items, transforms, (64, 64), [None, (8, 8)], (16, 16))
    assert skipped["features"][0] is None and skipped["feature_valid"][0] is None
    torch.testing.assert_close(skipped["features"][1], batch["features"][1])


def test_inside_extent_matches_a_pixel_by_pixel_check():
    theta = 0.3
    rotation = np.array(
        [
            [math.cos(theta), -math.sin(theta), 4.0],
            [math.sin(theta), math.cos(theta), -2.0],
            [0, 0, 1],
        ]
    )
    axis = translate_matrix(-5.5, 3.25) @ scale_matrix(1.7, 0.6) @ hflip_matrix(10)
    matrices = torch.as_tensor(np.stack([axis, rotation, np.eye(3)]))
    extents = torch.tensor([[10.0, 7.0], [9.0, 12.0], [3.0, 2.0]], dtype=torch.float64)
    h, w = 9, 11
    for pick in ([0, 2], [0, 1, 2]):  # axis-aligned only (separable test), and mixed
        got = inside_extent(matrices[pick], (h, w), extents[pick])
        for k, b in enumerate(pick):
            inv = np.linalg.inv(matrices[b].numpy())
            want = torch.zeros(h, w, dtype=torch.bool)
            for i in range(h):
                for j in range(w):
                    x, y, _ = inv @ np.array([j + 0.5, i + 0.5, 1.0])
                    want[i, j] = bool(0 <= x < extents[b, 0] and 0 <= y < extents[b, 1])
            assert torch.equal(got[k], want), (pick, b)


def test_stacked_batch_keeps_the_dtype_and_warps_like_the_list():
    g = torch.Generator().manual_seed(4)
    items = [
        _item(
            [torch.randn(4, 16, 16, generator=g).half()],
            torch.randn(2, 32, 32, generator=g).half(),
            orig_size=(40, 64),
            input_size=64,
            seed=1,
        ),
        None,
        _item(
            [torch.randn(4, 16, 16, generator=g).half()],
            torch.randn(3, 32, 32, generator=g).half(),
            orig_size=(64, 64),
            input_size=64,
            seed=2,
        ),
    ]
    stacked = stack_teacher_items(items)
    assert stacked["features"][0].shape == (3, 4, 16, 16)
    assert stacked["features"][0].dtype == torch.float16 and not stacked["features"][0][1].any()
    assert stacked["features"][0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(stacked["features"][0][2], items[2]["features"][0])
    assert stacked["mask_logits"].shape == (5, 32, 32) and stacked["mask_counts"] == [2, 0, 3]
    assert stacked["present"].tolist() == [True, False, True]
    assert stacked["orig_size"].tolist() == [[40, 64], [0, 0], [64, 64]]
    transforms = [
        translate_matrix(-5, 3) @ scale_matrix(1.3, 1.3),
        np.eye(3),
        translate_matrix(7, -2) @ scale_matrix(0.9, 0.9) @ hflip_matrix(64),
    ]
    from_stack = batch_warp_teacher_targets(stacked, transforms, (64, 64), [(16, 16)], (16, 16))
    from_list = batch_warp_teacher_targets(items, transforms, (64, 64), [(16, 16)], (16, 16))
    assert from_stack["features"][0].dtype == torch.float32
    assert torch.equal(from_stack["features"][0], from_list["features"][0])
    for a, b in zip(from_stack["mask_logits"], from_list["mask_logits"]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mask size"):
        stack_teacher_items([items[0], {**items[2], "mask_logits": torch.zeros(3, 16, 16)}])


def test_collate_moves_teacher_entries_into_one_stacked_batch():
    g = torch.Generator().manual_seed(5)

    def sample(i, teacher):
        s = {
            "image": torch.zeros(3, 32, 32, dtype=torch.uint8),
            "masks": torch.zeros(1, 32, 32, dtype=torch.bool),
            "ignore": torch.zeros(32, 32, dtype=torch.bool),
            "valid": torch.ones(32, 32, dtype=torch.bool),
            "labels": torch.zeros(1, dtype=torch.int64),
            "segment_ids": torch.ones(1, dtype=torch.int64),
            "transform": np.eye(3),
            "file_name": f"{i}.jpg",
            "image_id": i,
        }
        if teacher is not False:
            s["teacher"] = teacher
        return s

    item = _item(
        [torch.randn(4, 16, 16, generator=g)],
        torch.randn(1, 32, 32, generator=g),
        orig_size=(32, 32),
        input_size=64,
    )
    batch = collate_training_batch([sample(0, item), sample(1, None)])
    assert all("teacher" not in t for t in batch["targets"])
    assert batch["teacher"]["present"].tolist() == [True, False]
    assert torch.equal(batch["teacher"]["features"][0][0], item["features"][0])
    assert "teacher" not in collate_training_batch([sample(0, False)])
    with pytest.raises(ValueError, match="some samples"):
        collate_training_batch([sample(0, item), sample(1, False)])


def test_teacher_targets_carry_no_gradient():
    item, transform, _, _ = _flip_translate_case()
    out = warp_teacher_targets(item, transform, (64, 64), [(16, 16)], (16, 16))
    assert not out["features"][0].requires_grad and not out["mask_logits"].requires_grad


def test_bad_entries_raise_clear_errors():
    item, transform, _, _ = _flip_translate_case()
    broken = {k: v for k, v in item.items() if k != "mask_logits"}
    with pytest.raises(KeyError, match="mask_logits"):
        warp_teacher_targets(broken, transform, (64, 64), [(16, 16)], (16, 16))
    with pytest.raises(ValueError, match="scale"):
        warp_teacher_targets({**item, "scale": 0.5}, transform, (64, 64), [(16, 16)], (16, 16))
    with pytest.raises(ValueError, match="level_sizes has 2"):
        warp_teacher_targets(item, transform, (64, 64), [(16, 16), (8, 8)], (16, 16))
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        warp_teacher_targets(item, np.eye(2), (64, 64), [(16, 16)], (16, 16))
    with pytest.raises(ValueError, match="segment count"):
        warp_teacher_targets(
            {**item, "segment_ids": torch.arange(5)}, transform, (64, 64), [(16, 16)], (16, 16)
        )
    with pytest.raises(ValueError, match="no image of the batch"):
        batch_warp_teacher_targets([None], [np.eye(3)], (64, 64), [(16, 16)], (16, 16))
    with pytest.raises(ValueError, match="2 transforms"):
        batch_warp_teacher_targets([item], [np.eye(3)] * 2, (64, 64), [(16, 16)], (16, 16))
