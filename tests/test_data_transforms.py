"""Augmentations: the recorded transform reproduces the augmented labels exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.geometry import hflip_matrix, warp_affine
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    normalize_images,
)

CROWD_ID = 7


def _random_sample(rng: np.random.Generator, h: int, w: int) -> tuple[dict, torch.Tensor]:
    """A sample whose id map is per-pixel noise (ids 0..11; 0 void, 7 crowd), so any
    off-by-one in resampling changes labels."""
    ids = torch.from_numpy(rng.integers(0, 12, (h, w)))
    seg_ids = torch.tensor([i for i in range(1, 12) if i != CROWD_ID and (ids == i).any()])
    sample = {
        "image": torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)),
        "masks": ids[None] == seg_ids[:, None, None],
        "labels": seg_ids % 4,
        "segment_ids": seg_ids,
        "ignore": (ids == 0) | (ids == CROWD_ID),
        "valid": torch.ones(h, w, dtype=torch.bool),
        "transform": np.eye(3),
        "image_id": "x",
        "orig_size": (h, w),
        "file_name": "x.png",
    }
    return sample, ids


def _check_view(orig: dict, ids: torch.Tensor, view: dict, size: tuple[int, int]) -> None:
    T = view["transform"]
    assert T.dtype == np.float64 and T.shape == (3, 3)
    assert T[0, 1] == 0 and T[1, 0] == 0 and T[1, 1] > 0 and tuple(T[2]) == (0, 0, 1)
    H, W = size
    assert view["image"].shape == (3, H, W) and view["image"].dtype == torch.uint8
    assert view["masks"].shape[1:] == (H, W)

    warped, valid = warp_affine(ids[None], T, size, "nearest")
    warped = warped[0]
    assert torch.equal(view["valid"], valid)
    # labels: rebuild the view's id map from its masks and compare on valid pixels
    view_ids = torch.zeros(H, W, dtype=torch.int64)
    assert view["masks"].sum(0).max() <= 1, "masks overlap"
    for m, sid in zip(view["masks"], view["segment_ids"]):
        view_ids[m] = sid
    noncrowd = (warped != 0) & (warped != CROWD_ID)
    assert torch.equal(view_ids[valid], torch.where(noncrowd, warped, 0)[valid])
    assert not view["masks"][:, ~valid].any()
    # ignore = warped void/crowd on valid pixels, and everything outside the image
    assert torch.equal(view["ignore"], ~valid | ((warped == 0) | (warped == CROWD_ID)))
    # kept segments are exactly those with a pixel in the view; labels follow their ids
    present = sorted(set(warped[valid & noncrowd].tolist()))
    assert sorted(view["segment_ids"].tolist()) == present
    assert torch.equal(view["labels"], view["segment_ids"] % 4)
    assert (view["image"][:, ~valid] == 0).all()
    # the image sits where the labels are: for pure upscales it matches bilinear warping
    if abs(T[0, 0]) >= 1 and T[1, 1] >= 1:
        ref, _ = warp_affine(orig["image"].double(), T, size, "bilinear")
        diff = (ref.round() - view["image"].double()).abs()[:, valid]
        assert diff.max() <= 1


@pytest.mark.parametrize("seed", range(120))
def test_train_transform_matrix_reproduces_labels(seed):
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(3, 40, 2))
    crop = tuple(int(v) for v in rng.integers(4, 48, 2))
    lo = float(rng.uniform(0.2, 1.5))
    tf = TrainTransform(
        crop_size=crop, scale_range=(lo, lo + float(rng.uniform(0, 2.5))), hflip_prob=0.5
    )
    sample, ids = _random_sample(rng, h, w)
    view = tf(sample, torch.Generator().manual_seed(seed))
    _check_view(sample, ids, view, crop)


def test_train_transform_covers_flips_up_and_down_scales_and_padding():
    """The seeds of the property test exercise every branch."""
    seen = set()
    for seed in range(120):
        rng = np.random.default_rng(seed)
        h, w = (int(v) for v in rng.integers(3, 40, 2))
        crop = tuple(int(v) for v in rng.integers(4, 48, 2))
        lo = float(rng.uniform(0.2, 1.5))
        tf = TrainTransform(crop_size=crop, scale_range=(lo, lo + float(rng.uniform(0, 2.5))))
        view = tf(_random_sample(rng, h, w)[0], torch.Generator().manual_seed(seed))
        T = view["transform"]
        seen.add("flip" if T[0, 0] < 0 else "noflip")
        seen.add("up" if T[1, 1] > 1 else "down")
        seen.add("pad" if not view["valid"].all() else "full")
        seen.add("crop" if T[1, 2] < 0 else "nocrop")
    assert seen == {"flip", "noflip", "up", "down", "pad", "full", "crop", "nocrop"}


@pytest.mark.parametrize("seed", range(30))
def test_eval_transform_matrix_reproduces_labels(seed):
    rng = np.random.default_rng(1000 + seed)
    h, w = (int(v) for v in rng.integers(3, 60, 2))
    test_size = int(rng.integers(8, 80))
    sample, ids = _random_sample(rng, h, w)
    view = EvalTransform(test_size, size_divisibility=16)(sample)
    H, W = view["image"].shape[-2:]
    assert H % 16 == 0 and W % 16 == 0
    ratio = test_size / max(h, w)
    assert view["valid"].any(0).sum() == int(np.floor(w * ratio + 0.5))
    assert view["valid"].any(1).sum() == int(np.floor(h * ratio + 0.5))
    _check_view(sample, ids, view, (H, W))


def test_flip_without_resize_by_hand():
    rng = np.random.default_rng(0)
    sample, ids = _random_sample(rng, 5, 6)
    tf = TrainTransform(crop_size=(5, 6), scale_range=(1.0, 1.0), hflip_prob=1.0)
    view = tf(sample, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(view["transform"], hflip_matrix(6))
    assert torch.equal(view["image"], torch.flip(sample["image"], dims=[-1]))
    for m, sid in zip(view["masks"], view["segment_ids"]):
        assert torch.equal(m, torch.flip(ids == sid, dims=[-1]))
    assert view["valid"].all()


def test_crop_larger_than_image_pads_bottom_right():
    rng = np.random.default_rng(1)
    sample, ids = _random_sample(rng, 4, 6)
    # scale 1 and crop 8x12: the image fits at ratio 2 -> resized to 8x12, no padding;
    # scale 0.5 -> ratio 1 -> 4x6 image at the top-left of an 8x12 view.
    view = TrainTransform(crop_size=(8, 12), scale_range=(0.5, 0.5), hflip_prob=0.0)(
        sample, torch.Generator().manual_seed(0)
    )
    np.testing.assert_array_equal(view["transform"], np.eye(3))
    assert view["valid"][:4, :6].all() and view["valid"].sum() == 24
    assert view["ignore"][4:].all() and view["ignore"][:, 6:].all()
    assert torch.equal(view["image"][:, :4, :6], sample["image"])


def test_segments_leaving_the_view_are_dropped():
    ids = torch.zeros(8, 8, dtype=torch.int64)
    ids[:, :4], ids[:, 4:] = 1, 2
    seg = torch.tensor([1, 2])
    sample = {
        "image": torch.zeros(3, 8, 8, dtype=torch.uint8),
        "masks": ids[None] == seg[:, None, None],
        "labels": torch.tensor([0, 1]),
        "segment_ids": seg,
        "ignore": ids == 0,
        "valid": torch.ones(8, 8, dtype=torch.bool),
        "transform": np.eye(3),
    }
    kept = set()
    for s in range(40):
        view = TrainTransform((4, 4), (2.0, 2.0), 0.5)(sample, torch.Generator().manual_seed(s))
        kept.add(tuple(view["segment_ids"].tolist()))
        assert len(view["labels"]) == len(view["segment_ids"]) == view["masks"].shape[0]
    assert {(1,), (2,)} <= kept


def test_transform_is_deterministic_given_generator():
    sample, _ = _random_sample(np.random.default_rng(3), 17, 23)
    tf = TrainTransform((16, 16), (0.5, 2.0), 0.5)
    a = tf(sample, torch.Generator().manual_seed(11))
    b = tf(sample, torch.Generator().manual_seed(11))
    assert np.array_equal(a["transform"], b["transform"]) and torch.equal(a["image"], b["image"])


def test_normalize_images_by_hand():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2)
    out = normalize_images(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 2)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(
            -IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-6
        )
        assert out[1, c, 0, 1].item() == pytest.approx(
            (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6
        )
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        normalize_images(torch.zeros(3, 4, 4, dtype=torch.uint8))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform((8, 8), (2.0, 1.0))
    with pytest.raises(ValueError, match="hflip_prob"):
        TrainTransform((8, 8), (1.0, 1.0), 1.5)
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform((0, 8))
    with pytest.raises(ValueError, match="test_size"):
        EvalTransform(0)


def test_overlapping_masks_are_rejected():
    sample, _ = _random_sample(np.random.default_rng(5), 6, 6)
    sample["masks"] = torch.ones(2, 6, 6, dtype=torch.bool)
    sample["segment_ids"] = sample["labels"] = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="overlap"):
        EvalTransform(12)(sample)
