"""Point sampling of dense maps in normalised coordinates (Mask2Former / PointRend style).

A point ``(u, v)`` in ``[0, 1]^2`` is the continuous location ``(u W, v H)`` of a map of size
``H x W``, whatever its resolution, so predictions at stride 4 and targets at full resolution
are compared at the same image locations (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["point_sample", "sample_pixels", "uncertainty", "uncertainty_points"]


def point_sample(input: Tensor, coords: Tensor, mode: str = "bilinear") -> Tensor:
    """Sample ``input`` at normalised points.

    Arguments:
        input: ``[N, C, H, W]`` (or ``[N, H, W]``, treated as C = 1).
        coords: ``[N, P, 2]`` points ``(x, y)`` in ``[0, 1]``.
        mode: ``"bilinear"`` or ``"nearest"`` (the pixel containing the point).

    Returns:
        ``[N, C, P]`` (or ``[N, P]`` for a 3-D input). Bilinear sampling clamps at the border.
    """
    squeeze = input.ndim == 3
    if squeeze:
        input = input.unsqueeze(1)
    if (
        input.ndim != 4
        or coords.ndim != 3
        or coords.shape[-1] != 2
        or coords.shape[0] != input.shape[0]
    ):
        raise ValueError(
            f"point_sample expects input [N, C, H, W] and coords [N, P, 2], got "
            f"{tuple(input.shape)} and {tuple(coords.shape)}"
        )
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(input.dtype)  # [N, P, 1, 2]
    out = F.grid_sample(input, grid, mode=mode, padding_mode="border", align_corners=False)
    out = out.squeeze(3)
    return out.squeeze(1) if squeeze else out


def sample_pixels(maps: Tensor, coords: Tensor) -> Tensor:
    """The value of the pixel containing each point, without converting ``maps`` to float.

    Pixel ``(i, j)`` of an ``H x W`` map contains ``(u, v)`` when ``j = floor(u W)`` and
    ``i = floor(v H)`` (clamped to the map), so bool masks at full resolution stay bool.

    Arguments:
        maps: ``[N, H, W]`` of any dtype.
        coords: ``[P, 2]`` points shared by all maps, or ``[N, P, 2]`` points per map.

    Returns:
        ``[N, P]`` with the dtype of ``maps``.
    """
    height, width = maps.shape[-2:]
    cols = (coords[..., 0] * width).floor().long().clamp_(0, width - 1)
    rows = (coords[..., 1] * height).floor().long().clamp_(0, height - 1)
    if coords.ndim == 2:
        return maps[:, rows, cols]
    if coords.ndim != 3 or coords.shape[0] != maps.shape[0]:
        raise ValueError(
            f"sample_pixels expects coords [P, 2] or [N={maps.shape[0]}, P, 2], "
            f"got {tuple(coords.shape)}"
        )
    index = torch.arange(maps.shape[0], device=maps.device)[:, None]
    return maps[index, rows, cols]


def uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of binary mask logits: ``-|logit|`` (highest at the decision boundary)."""
    return -logits.abs()


def uncertainty_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    ignore: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mask2Former importance sampling: most points where the mask is uncertain, the rest uniform.

    ``num_points * oversample_ratio`` uniform candidates are drawn, the
    ``importance_sample_ratio * num_points`` most uncertain (``-|logit|``) are kept and the rest
    is filled with fresh uniform points.

    Arguments:
        logits: ``[N, H, W]`` mask logits (any resolution; not differentiated).
        ignore: optional bool ``[N, H', W']`` (any resolution); candidates that fall on an
            ignored pixel are ranked last, so importance points go to supervised pixels.
        generator: optional RNG for reproducibility.

    Returns:
        ``[N, num_points, 2]`` points ``(x, y)`` in ``[0, 1]``.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"need oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, got "
            f"{oversample_ratio} and {importance_sample_ratio}"
        )
    num = logits.shape[0]
    device = logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_important = int(importance_sample_ratio * num_points)
    num_random = num_points - num_important
    candidates = torch.rand(num, num_sampled, 2, device=device, generator=generator)
    with torch.no_grad():
        score = uncertainty(point_sample(logits.detach().float(), candidates))  # [N, S]
        if ignore is not None:
            ignored = sample_pixels(ignore, candidates)
            score = score.masked_fill(ignored, float("-inf"))
        top = score.topk(num_important, dim=1).indices  # [N, I]
    important = torch.gather(candidates, 1, top.unsqueeze(-1).expand(-1, -1, 2))
    random = torch.rand(num, num_random, 2, device=device, generator=generator)
    return torch.cat([important, random], dim=1)
