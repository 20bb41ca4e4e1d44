"""Exact axis-aligned resampling under the project's pixel-centre convention.

Pixel ``(row i, col j)`` covers the continuous square ``[j, j + 1) x [i, i + 1)``; its centre is
``(x, y) = (j + 0.5, i + 0.5)``. A 3x3 float64 matrix ``A`` maps source continuous coordinates to
destination continuous coordinates: ``p_dst = A @ (x, y, 1)``.

:func:`warp_affine` samples the source at the inverse image of every destination pixel centre.
Nearest mode picks the source pixel that *covers* that point (``floor``), computed in float64 and
gathered, so integer label maps come out exact; for axis-aligned matrices the inverse is evaluated
as ``(p - t) / s``, the same arithmetic that a resize by ``s`` followed by an integer crop or flip
produces, which makes a composed transform reproduce a stepwise augmentation bit for bit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["warp_affine", "scale_matrix", "translate_matrix", "hflip_matrix", "identity_matrix"]


def identity_matrix() -> np.ndarray:
    """The 3x3 float64 identity."""
    return np.eye(3, dtype=np.float64)


def scale_matrix(sx: float, sy: float) -> np.ndarray:
    """``(x, y) -> (sx * x, sy * y)`` as a 3x3 float64 matrix."""
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]], dtype=np.float64)


def translate_matrix(tx: float, ty: float) -> np.ndarray:
    """``(x, y) -> (x + tx, y + ty)`` as a 3x3 float64 matrix."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]], dtype=np.float64)


def hflip_matrix(width: float) -> np.ndarray:
    """Horizontal flip of an image ``width`` pixels wide: ``x -> width - x`` (column j -> width-1-j)."""
    return np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float64)


def _as_matrices(matrix: Tensor | np.ndarray, batch: int | None) -> Tensor:
    """Any 3x3 / Bx3x3 matrix -> float64 CPU tensor [B', 3, 3] (B' = batch or 1)."""
    m = torch.as_tensor(
        np.asarray(
            matrix.detach().cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.float64
        )
    )
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[-2:] != (3, 3):
        raise ValueError(f"matrix must be [3, 3] or [B, 3, 3], got {tuple(m.shape)}")
    if batch is None and m.shape[0] != 1:
        raise ValueError(
            f"an unbatched src [C, h, w] takes one [3, 3] matrix, got {tuple(m.shape)}"
        )
    if batch is not None and m.shape[0] not in (1, batch):
        raise ValueError(f"matrix batch {m.shape[0]} does not match src batch {batch}")
    if not torch.all(m[:, 2] == torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)):
        raise ValueError("matrix must be affine: its last row must be [0, 0, 1]")
    return m


def _is_axis_aligned(m: Tensor) -> bool:
    return bool(torch.all(m[:, 0, 1] == 0) and torch.all(m[:, 1, 0] == 0))


def _axis_source_coords(m: Tensor, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Source coordinates of destination pixel centres under axis-aligned matrices.

    Evaluated as ``(p - t) / s``: the same arithmetic as "resize by ``s``, then crop or flip by
    integers", so a composed matrix reproduces such a stepwise augmentation bit for bit.

    Arguments:
        m: float64 ``[B, 3, 3]`` source -> destination matrices with zero off-diagonals.
        out_size: destination ``(H, W)``.

    Returns:
        ``(xs [B, W], ys [B, H])`` float64: every column's and every row's source coordinate.
    """
    H, W = out_size
    kw = dict(dtype=torch.float64, device=m.device)
    sx, tx, sy, ty = m[:, 0, 0:1], m[:, 0, 2:3], m[:, 1, 1:2], m[:, 1, 2:3]
    if torch.any(sx == 0) or torch.any(sy == 0):
        raise ValueError("matrix is singular and cannot be inverted")
    xs = ((torch.arange(W, **kw) + 0.5)[None] - tx) / sx
    ys = ((torch.arange(H, **kw) + 0.5)[None] - ty) / sy
    return xs, ys


def _source_coords(m: Tensor, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Source continuous coordinates of every destination pixel centre.

    Arguments:
        m: float64 ``[B, 3, 3]`` source -> destination matrices.
        out_size: destination ``(H, W)``.

    Returns:
        ``(xs, ys)``, each float64 ``[B, H, W]``.
    """
    H, W = out_size
    B = m.shape[0]
    if _is_axis_aligned(m):
        xs, ys = _axis_source_coords(m, out_size)
        return xs[:, None, :].expand(B, H, W), ys[:, :, None].expand(B, H, W)
    kw = dict(dtype=torch.float64, device=m.device)
    xd = (torch.arange(W, **kw) + 0.5).view(1, 1, W).expand(B, H, W)
    yd = (torch.arange(H, **kw) + 0.5).view(1, H, 1).expand(B, H, W)
    a, b, tx = (m[:, 0, k].view(-1, 1, 1) for k in range(3))
    c, d, ty = (m[:, 1, k].view(-1, 1, 1) for k in range(3))
    u, v = xd - tx, yd - ty
    det = a * d - b * c
    if torch.any(det == 0):
        raise ValueError("matrix is singular and cannot be inverted")
    return (d * u - b * v) / det, (a * v - c * u) / det


def warp_affine(
    src: Tensor,
    matrix: Tensor | np.ndarray,
    out_size: tuple[int, int],
    mode: Literal["bilinear", "nearest"] = "bilinear",
    fill: float | None = 0,
) -> tuple[Tensor, Tensor]:
    """Resample ``src`` into a destination grid through an affine map.

    Arguments:
        src: ``[C, h, w]`` or ``[B, C, h, w]`` map. Any dtype in ``"nearest"`` mode (bool and integer
            label maps come out exact); floating point in ``"bilinear"`` mode.
        matrix: ``[3, 3]`` or ``[B, 3, 3]`` (tensor or array) mapping *src* continuous coordinates
            to *dst* continuous coordinates. One matrix is shared by a whole batch.
        out_size: destination ``(H, W)``.
        mode: ``"nearest"`` takes the source pixel covering the pre-image of each destination
            pixel centre; ``"bilinear"`` interpolates between source pixel centres (edge pixels
            extend to the border of the extent).
        fill: value written where the destination pixel is not valid; None leaves the
            resampled values there (the caller masks them with ``valid``; saves a pass).

    Returns:
        ``(dst, valid)``: ``dst`` is ``[C, H, W]`` (or ``[B, C, H, W]``) with the dtype of ``src``;
        ``valid`` is bool ``[H, W]`` (or ``[B, H, W]``), true where the destination pixel centre
        falls inside the source extent ``[0, w) x [0, h)``.
    """
    if src.ndim not in (3, 4):
        raise ValueError(f"src must be [C, h, w] or [B, C, h, w], got {tuple(src.shape)}")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    batched = src.ndim == 4
    x = src if batched else src[None]
    B, C, h, w = x.shape
    H, W = (int(s) for s in out_size)
    if H <= 0 or W <= 0:
        raise ValueError(f"out_size must be positive, got {out_size}")
    # float64 coordinates on the src device (MPS has no float64: fall back to the CPU).
    coord_device = src.device if src.device.type != "mps" else torch.device("cpu")
    m = _as_matrices(matrix, B if batched else None).expand(B, 3, 3).to(coord_device)

    if mode == "nearest" and _is_axis_aligned(m):
        # Separable gather: rows then columns (much faster than a 2-D gather of many channels).
        xs, ys = _axis_source_coords(m, (H, W))
        vx, vy = (xs >= 0) & (xs < w), (ys >= 0) & (ys < h)
        valid = (vy[:, :, None] & vx[:, None, :]).to(src.device)
        col = torch.floor(xs).clamp_(0, w - 1).long().to(src.device)
        row = torch.floor(ys).clamp_(0, h - 1).long().to(src.device)
        out = torch.stack([x[i].index_select(1, row[i]).index_select(2, col[i]) for i in range(B)])
    elif mode == "nearest":
        xs, ys = _source_coords(m, (H, W))
        valid = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)).to(src.device)
        col = torch.floor(xs).clamp_(0, w - 1).long()
        row = torch.floor(ys).clamp_(0, h - 1).long()
        flat = (row * w + col).view(B, H * W).to(src.device)
        out = torch.stack([x[i].reshape(C, h * w).index_select(1, flat[i]) for i in range(B)])
        out = out.view(B, C, H, W)
    else:
        if not torch.is_floating_point(src):
            raise ValueError(
                f"bilinear mode needs a floating point src, got {src.dtype}; "
                "use mode='nearest' for label maps"
            )
        xs, ys = _source_coords(m, (H, W))
        valid = ((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)).to(src.device)
        gdtype = src.dtype if src.dtype in (torch.float32, torch.float64) else torch.float32
        grid = torch.stack((2.0 * xs / w - 1.0, 2.0 * ys / h - 1.0), dim=-1)
        out = F.grid_sample(
            x.to(gdtype),
            grid.to(device=src.device, dtype=gdtype),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        out = out.to(src.dtype)
    if fill is not None and not bool(valid.all()):
        out = torch.where(
            valid[:, None], out, torch.as_tensor(fill, dtype=out.dtype, device=out.device)
        )
    if not batched:
        return out[0], valid[0]
    return out, valid
