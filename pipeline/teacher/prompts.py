"""Prompts drawn from ground-truth segments, as in SAM's training recipe (SAM paper, appendix).

All coordinates are in the teacher frame (the image resized so its longest side is S, top-left
in an S x S square), in SAM's convention: a point ``(x, y)`` names the pixel of column x and
row y, a box is ``(x_min, y_min, x_max, y_max)`` over pixel indices. Every draw takes an explicit
``torch.Generator``, so a prompt is a pure function of the seed the caller derives.
"""

from __future__ import annotations

import torch

__all__ = ["corrective_points", "mask_boxes", "noisy_boxes", "sample_points"]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of non-empty masks.

    Arguments:
      masks: bool ``[K, H, W]``, none empty.

    Returns:
      float32 ``[K, 4]`` boxes ``(x_min, y_min, x_max, y_max)``.
    """
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    if not bool(rows.any(dim=1).all()):
        raise ValueError("mask_boxes: every mask needs at least one pixel")
    H, W = masks.shape[-2:]
    r = torch.arange(H, device=masks.device)
    c = torch.arange(W, device=masks.device)
    big = max(H, W) + 1
    y0 = torch.where(rows, r, big).amin(dim=1)
    y1 = torch.where(rows, r, -1).amax(dim=1)
    x0 = torch.where(cols, c, big).amin(dim=1)
    x1 = torch.where(cols, c, -1).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).float()


def noisy_boxes(
    boxes: torch.Tensor,
    noise: float,
    noise_max: float,
    size: tuple[int, int],
    generator: torch.Generator,
) -> torch.Tensor:
    """Boxes with Gaussian noise on each corner coordinate (SAM: std 10 % of the side, at most
    20 pixels), clipped to the frame and kept ordered.

    Arguments:
      boxes: float ``[K, 4]``.
      noise: std as a fraction of the box's width (x) or height (y).
      noise_max: cap of the std, in pixels.
      size: (H, W) of the region the box must stay in.
      generator: the random source.

    Returns:
      float32 ``[K, 4]``.
    """
    w = (boxes[:, 2] - boxes[:, 0] + 1).clamp(min=1)
    h = (boxes[:, 3] - boxes[:, 1] + 1).clamp(min=1)
    std = torch.stack([w, h, w, h], dim=1) * noise
    std = std.clamp(max=noise_max)
    eps = torch.randn(boxes.shape, generator=generator, dtype=torch.float32)
    out = boxes + eps.to(boxes.device) * std
    H, W = size
    x = out[:, 0::2].clamp(0, W - 1)
    y = out[:, 1::2].clamp(0, H - 1)
    x0, x1 = torch.minimum(x[:, 0], x[:, 1]), torch.maximum(x[:, 0], x[:, 1])
    y0, y1 = torch.minimum(y[:, 0], y[:, 1]), torch.maximum(y[:, 0], y[:, 1])
    return torch.stack([x0, y0, x1, y1], dim=1)


def sample_points(
    masks: torch.Tensor, counts: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive points drawn uniformly from each mask, padded to the largest count.

    Arguments:
      masks: bool ``[K, H, W]``, none empty.
      counts: int ``[K]``, points per mask (>= 1).
      generator: the random source.

    Returns:
      points float32 ``[K, N, 2]`` as ``(x, y)`` and labels int64 ``[K, N]``: 1 for a point,
      -1 for padding (SAM's "not a point").
    """
    K = masks.shape[0]
    N = int(counts.max()) if K else 0
    points = torch.zeros(K, N, 2)
    labels = torch.full((K, N), -1, dtype=torch.int64)
    W = masks.shape[-1]
    for k in range(K):
        flat = torch.nonzero(masks[k].reshape(-1).cpu(), as_tuple=False)[:, 0]
        if flat.numel() == 0:
            raise ValueError(f"sample_points: mask {k} is empty")
        n = int(counts[k])
        pick = flat[torch.randint(flat.numel(), (n,), generator=generator)]
        points[k, :n, 0] = (pick % W).float()
        points[k, :n, 1] = torch.div(pick, W, rounding_mode="floor").float()
        labels[k, :n] = 1
    return points, labels


def corrective_points(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per mask in the error region of a prediction, as SAM's iterative training does.

    A false-negative pixel gives a positive point (label 1), a false-positive pixel a negative
    one (label 0); the pixel is drawn uniformly from the union of both errors. A prediction with
    no error gets a padding point (label -1).

    Arguments:
      pred: bool ``[K, H, W]`` predicted masks.
      target: bool ``[K, H, W]`` ground truth.
      valid: bool ``[K, H, W]`` or ``[H, W]`` pixels that count (not void, crowd or padding).
      generator: the random source.

    Returns:
      points float32 ``[K, 1, 2]`` and labels int64 ``[K, 1]``.
    """
    error = (pred != target) & valid
    K, _, W = error.shape
    points = torch.zeros(K, 1, 2)
    labels = torch.full((K, 1), -1, dtype=torch.int64)
    for k in range(K):
        flat = torch.nonzero(error[k].reshape(-1).cpu(), as_tuple=False)[:, 0]
        if flat.numel() == 0:
            continue
        p = int(flat[int(torch.randint(flat.numel(), (1,), generator=generator))])
        y, x = divmod(p, W)
        points[k, 0] = torch.tensor([float(x), float(y)])
        labels[k, 0] = 1 if bool(target[k, y, x]) else 0
    return points, labels
