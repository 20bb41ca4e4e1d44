"""Training and evaluation augmentations that track the exact original -> view affine map.

Every transform takes a data sample (see ``docs/architecture.md``) holding at least
``image`` uint8 ``[3, H, W]``, ``masks`` bool ``[N, H, W]``, ``labels`` int64 ``[N]``,
``segment_ids`` int64 ``[N]``, ``ignore`` bool ``[H, W]``, ``valid`` bool ``[H, W]`` and
``transform`` float64 ``[3, 3]``, and returns a new sample in which the label maps have been
moved by the same pixel-centre arithmetic as :func:`pipeline.data.geometry.warp_affine` and
``transform`` has been left-multiplied by the step's matrix. Hence, for every view pixel with
``valid`` true, ``warp_affine(original_map, sample["transform"], view_size, "nearest")`` gives
exactly the view's labels.

Each step moves the labels itself (a nearest resize of the crop window, then an array flip or an
array crop/pad) and the step matrices are only composed afterwards: the final ``transform`` is
never what produced the labels, so a test of that identity checks the bookkeeping rather than
restating it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.data.geometry import hflip_matrix, scale_matrix, translate_matrix, warp_affine

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TrainTransform",
    "EvalTransform",
    "normalize_images",
    "resize_sample",
    "hflip_sample",
    "crop_pad_sample",
    "drop_empty_segments",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Sample = dict[str, Any]


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``[B, 3, H, W]`` RGB in ``[0, 255]`` -> float32 ImageNet-normalised ``[B, 3, H, W]``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _label_stack(sample: Sample) -> Tensor:
    """Pack the label maps into int32 ``[3, H, W]`` so resampling cost does not grow with N.

    Channel 0 is ``1 + k`` where mask ``k`` covers the pixel (0: none), channel 1 ``ignore``,
    channel 2 ``valid``. Panoptic masks are disjoint; overlapping masks are rejected.
    """
    masks = sample["masks"]
    codes = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    for k, m in enumerate(masks):
        codes.masked_fill_(m, k + 1)
    if int(torch.count_nonzero(masks)) != int(torch.count_nonzero(codes)):
        raise ValueError("sample masks overlap; panoptic masks must be disjoint")
    return torch.stack([codes, sample["ignore"].to(torch.int32), sample["valid"].to(torch.int32)])


def _with_labels(sample: Sample, image: Tensor, labels: Tensor, step: np.ndarray) -> Sample:
    """Unpack :func:`_label_stack` output into a new sample and compose ``step`` into its transform."""
    n = sample["masks"].shape[0]
    valid = labels[2].bool()
    out = dict(sample)
    out["image"] = image
    out["masks"] = labels[0][None] == torch.arange(1, n + 1, dtype=torch.int32).view(n, 1, 1)
    out["ignore"] = labels[1].bool() | ~valid
    out["valid"] = valid
    out["transform"] = step @ np.asarray(sample["transform"], dtype=np.float64)
    return out


def _crop_pad(t: Tensor, top: int, left: int, size: tuple[int, int], fill: float | bool) -> Tensor:
    """Window ``[top, top + H) x [left, left + W)`` of ``t [..., h, w]``; outside is ``fill``."""
    H, W = size
    h, w = t.shape[-2:]
    out = torch.full((*t.shape[:-2], H, W), fill, dtype=t.dtype)
    y0, y1 = max(top, 0), min(top + H, h)
    x0, x1 = max(left, 0), min(left + W, w)
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = t[..., y0:y1, x0:x1]
    return out


def resize_sample(
    sample: Sample,
    size: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
) -> Sample:
    """Resize a sample to ``size = (H, W)``; the exact per-axis scale is ``W / w`` and ``H / h``.

    The image is resampled bilinearly with antialiasing (``align_corners=False``: the same
    pixel-centre convention); label maps with :func:`warp_affine` in nearest mode.

    Arguments:
        sample: the sample to resize.
        size: ``(H, W)`` after resizing.
        window: optional ``(top, left, height, width)`` of the resized sample to keep (parts
            outside it are padding). Only that window of the labels is resampled, which is
            identical to resizing everything and cropping afterwards, but much cheaper.
    """
    H, W = (int(s) for s in size)
    h, w = sample["image"].shape[-2:]
    top, left, Hc, Wc = (0, 0, H, W) if window is None else (int(v) for v in window)
    if (H, W, top, left, Hc, Wc) == (h, w, 0, 0, h, w):
        return dict(sample)
    step = translate_matrix(-left, -top) @ scale_matrix(W / w, H / h)
    image = sample["image"]
    if (H, W) != (h, w):
        image = F.interpolate(
            image[None].float(), size=(H, W), mode="bilinear", align_corners=False, antialias=True
        )[0]
        image = image.round_().clamp_(0, 255).to(torch.uint8)
    image = _crop_pad(image, top, left, (Hc, Wc), 0)
    labels, _ = warp_affine(_label_stack(sample), step, (Hc, Wc), mode="nearest")
    return _with_labels(sample, image, labels, step)


def hflip_sample(sample: Sample) -> Sample:
    """Mirror a sample left-right (column ``j`` -> ``w - 1 - j``)."""
    w = sample["image"].shape[-1]
    labels = torch.flip(_label_stack(sample), dims=[-1])
    return _with_labels(sample, torch.flip(sample["image"], dims=[-1]), labels, hflip_matrix(w))


def crop_pad_sample(sample: Sample, top: int, left: int, size: tuple[int, int]) -> Sample:
    """Take the window ``[top, top + H) x [left, left + W)`` of a sample, padding what lies outside.

    Padding is image 0, masks false, ``ignore`` true and ``valid`` false.
    """
    top, left = int(top), int(left)
    size = (int(size[0]), int(size[1]))
    labels = _crop_pad(_label_stack(sample), top, left, size, 0)
    image = _crop_pad(sample["image"], top, left, size, 0)
    return _with_labels(sample, image, labels, translate_matrix(-left, -top))


def drop_empty_segments(sample: Sample) -> Sample:
    """Remove segments whose mask has no pixel in the view (masks, labels, segment_ids)."""
    keep = sample["masks"].flatten(1).any(dim=1)
    if bool(keep.all()):
        return sample
    out = dict(sample)
    for key in ("masks", "labels", "segment_ids"):
        out[key] = sample[key][keep]
    return out


class TrainTransform:
    """Large-scale jitter, random crop and horizontal flip to a fixed ``crop_size``.

    1. Draw ``scale ~ U(scale_range)`` and resize the image so it fits inside
       ``scale * crop_size`` keeping its aspect ratio (each axis then scales by
       ``out_size / in_size`` exactly).
    2. With probability ``hflip_prob`` mirror it.
    3. Crop a random ``crop_size`` window (an axis shorter than the crop is taken whole) and
       pad bottom/right up to ``crop_size``.

    Arguments:
        crop_size: ``(H, W)`` of every training view.
        scale_range: ``(low, high)`` of the jitter scale.
        hflip_prob: probability of a horizontal flip.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float] = (0.5, 2.0),
        hflip_prob: float = 0.5,
    ) -> None:
        if len(crop_size) != 2 or min(crop_size) <= 0:
            raise ValueError(f"crop_size must be two positive ints, got {crop_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must lie in [0, 1], got {hflip_prob}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(lo), float(hi))
        self.hflip_prob = float(hflip_prob)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
            f"hflip_prob={self.hflip_prob})"
        )

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        """Augment one sample; all randomness comes from ``generator``."""
        Hc, Wc = self.crop_size
        h, w = sample["image"].shape[-2:]
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(u[0])
        ratio = min(scale * Hc / h, scale * Wc / w)
        Hn, Wn = max(1, _round_half_up(h * ratio)), max(1, _round_half_up(w * ratio))
        top = int(torch.randint(max(Hn - Hc, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(max(Wn - Wc, 0) + 1, (1,), generator=generator))

        # resize -> flip -> crop equals resize -> crop the mirrored window -> flip; the latter
        # only resamples the labels inside the crop.
        flip = float(u[1]) < self.hflip_prob
        window_left = Wn - left - Wc if flip else left
        out = resize_sample(sample, (Hn, Wn), window=(top, window_left, Hc, Wc))
        if flip:
            out = hflip_sample(out)
        return drop_empty_segments(out)


class EvalTransform:
    """Resize the longest side to ``test_size`` and pad bottom/right to a multiple of ``size_divisibility``.

    Arguments:
        test_size: longest side of the view; ``None`` keeps the original resolution.
        size_divisibility: the padded view's height and width are multiples of this.
    """

    def __init__(self, test_size: int | None, size_divisibility: int = 32) -> None:
        if test_size is not None and test_size <= 0:
            raise ValueError(f"test_size must be positive or None, got {test_size}")
        if size_divisibility <= 0:
            raise ValueError(f"size_divisibility must be positive, got {size_divisibility}")
        self.test_size = None if test_size is None else int(test_size)
        self.size_divisibility = int(size_divisibility)

    def __repr__(self) -> str:
        return (
            f"EvalTransform(test_size={self.test_size}, size_divisibility={self.size_divisibility})"
        )

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        """Resize and pad one sample (deterministic; ``generator`` is ignored)."""
        h, w = sample["image"].shape[-2:]
        out = sample
        if self.test_size is not None:
            ratio = self.test_size / max(h, w)
            size = (max(1, _round_half_up(h * ratio)), max(1, _round_half_up(w * ratio)))
            out = resize_sample(out, size)
        h, w = out["image"].shape[-2:]
        d = self.size_divisibility
        out = crop_pad_sample(out, 0, 0, (math.ceil(h / d) * d, math.ceil(w / d) * d))
        return drop_empty_segments(out)
