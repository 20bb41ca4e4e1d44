"""Storage dtypes of the teacher cache: float16, or int8 with a per-channel affine map.

Pure functions on numpy arrays. The first axis is the "channel" axis: a feature map
``[C, h, w]`` is quantised per channel, a stack of mask logits ``[M, m, m]`` per segment.

int8 (asymmetric, 256 levels): for a channel with minimum ``lo`` and maximum ``hi``,

    scale  = (hi - lo) / 255
    q      = round((x - lo) / scale) - 128            in [-128, 127]
    offset = lo + 128 * scale
    x'     = q * scale + offset                       (dequantised)

so ``|x - x'| <= scale / 2`` (plus float32 rounding). A constant channel gets ``scale = 0``,
``q = 0`` and ``offset = lo``, and is restored exactly.

float16: a plain cast; values outside float16's finite range (|x| > 65504) are refused rather
than turned into inf.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "FLOAT16_MAX",
    "StorageDtype",
    "dequantize_int8",
    "quantize_int8",
    "to_float16",
]

StorageDtype = Literal["float16", "int8"]
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_LEVELS = 255.0


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel affine int8 quantisation.

    Arguments:
      x: float ``[C, ...]``, finite.

    Returns:
      ``(q, scale, offset)``: int8 ``[C, ...]``, float32 ``[C]``, float32 ``[C]`` with
      ``x ~= q * scale[:, None, ...] + offset[:, None, ...]``.
    """
    x = np.asarray(x)
    if x.ndim < 1:
        raise ValueError("quantize_int8 needs an array with a channel axis, got a scalar")
    if not np.isfinite(x).all():
        raise ValueError("quantize_int8: input holds NaN or inf")
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    if flat.shape[1] == 0:
        zeros = np.zeros(x.shape[0], np.float32)
        return np.zeros(x.shape, np.int8), zeros, zeros.copy()
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    scale = (hi - lo) / _LEVELS
    safe = np.where(scale > 0, scale, 1.0)
    q = np.rint((flat - lo[:, None]) / safe[:, None]) - 128.0
    q = np.where(scale[:, None] > 0, q, 0.0)
    q = np.clip(q, -128, 127).astype(np.int8).reshape(x.shape)
    offset = np.where(scale > 0, lo + 128.0 * scale, lo)
    return q, scale.astype(np.float32), offset.astype(np.float32)


def dequantize_int8(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8`.

    Arguments:
      q: int8 ``[C, ...]``; scale, offset: float32 ``[C]``.

    Returns:
      float32 ``[C, ...]`` = ``q * scale + offset`` per channel.
    """
    q = np.asarray(q)
    shape = (q.shape[0],) + (1,) * (q.ndim - 1)
    scale = np.asarray(scale, np.float32).reshape(shape)
    offset = np.asarray(offset, np.float32).reshape(shape)
    return q.astype(np.float32) * scale + offset


def to_float16(x: np.ndarray, what: str = "array") -> np.ndarray:
    """Cast to float16, refusing NaN/inf and values beyond float16's range.

    Arguments:
      x: float array.
      what: names the data in the error message (e.g. ``"image 42, level block7"``).
    """
    x = np.asarray(x)
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: holds NaN or inf")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > FLOAT16_MAX:
        raise ValueError(
            f"{what}: |value| reaches {peak:.4g}, beyond float16's range "
            f"({FLOAT16_MAX:g}); set cache.dtype: int8"
        )
    return x.astype(np.float16)
