"""Feature-affinity (FA) loss of DSRL ("Dual Super-Resolution Learning for Semantic Segmentation").

The affinity of a feature map is the cosine similarity between every pair of its pixels after
average pooling: a ``[N, N]`` matrix per sample, ``N`` = number of pooled pixels. The FA loss is
the mean absolute difference between the affinity matrices of two feature maps. It is computed
per sample, so its value for a batch is exactly the mean of the per-sample values (every sample
has the same ``N``). Reductions that sum the L1 norm over the batch (``||A_s - A_t||_1 / N^2``
over a ``[B, N, N]`` tensor) or that reshape the batch into one pixel set
(``[B * N, C]`` -> ``[B * N, B * N]``) do not have that property; ``tests/test_distill_fa_loss.py``
shows both differing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["pool_factor", "affinity_matrix", "fa_loss"]


def pool_factor(subscale: float) -> int:
    """Pooling kernel and stride ``round(1 / subscale)`` for a subscale ``1 / n``.

    Raises:
        ValueError: ``subscale`` is not in ``(0, 1]``.
    """
    if not 0 < subscale <= 1:
        raise ValueError(f"fa_subscale must be in (0, 1], got {subscale}")
    return max(1, round(1.0 / subscale))


def affinity_matrix(feat: Tensor, subscale: float) -> Tensor:
    """Cosine affinity between all pixel pairs of an average-pooled feature map.

    Arguments:
        feat: ``[B, C, H, W]`` features.
        subscale: pooling ratio ``1 / k``; the map is average-pooled with kernel = stride = ``k``
            (a remainder of fewer than ``k`` rows / columns at the bottom / right is dropped).

    Returns:
        ``[B, N, N]`` float32 affinities in ``[-1, 1]``, ``N = (H // k) * (W // k)``; entry
        ``(b, p, q)`` is the cosine of pooled pixels ``p`` and ``q`` (row-major) of sample ``b``.
        A zero pooled feature vector has zero affinity with everything.
    """
    if feat.ndim != 4:
        raise ValueError(f"feat must be [B, C, H, W], got {tuple(feat.shape)}")
    k = pool_factor(subscale)
    height, width = feat.shape[-2:]
    if height < k or width < k:
        raise ValueError(
            f"fa_subscale={subscale} pools by {k}, but the feature map is only "
            f"{height}x{width}; use a larger fa_subscale or larger images"
        )
    feat = feat.float()
    if k > 1:
        feat = F.avg_pool2d(feat, kernel_size=k, stride=k)
    unit = F.normalize(feat.flatten(2), p=2, dim=1, eps=1e-12)  # [B, C, N], per pixel
    return unit.transpose(1, 2) @ unit


def fa_loss(student_feat: Tensor, teacher_feat: Tensor, subscale: float) -> Tensor:
    """Mean L1 distance between the affinity matrices of two feature maps.

    Arguments:
        student_feat: ``[B, C, H, W]``; receives the gradient.
        teacher_feat: ``[B, C', H, W]`` (same batch and spatial size; any channel count). It is
            used as given: detach it when it is a target.
        subscale: pooling ratio ``1 / k`` (see :func:`affinity_matrix`).

    Returns:
        Scalar float32 ``mean_{b, p, q} |A_s[b, p, q] - A_t[b, p, q]|``, equal to the mean over
        samples of the per-sample loss for any batch size.
    """
    if student_feat.ndim != 4 or teacher_feat.ndim != 4:
        raise ValueError(
            f"fa_loss expects [B, C, H, W] maps, got {tuple(student_feat.shape)} "
            f"and {tuple(teacher_feat.shape)}"
        )
    if (
        student_feat.shape[0] != teacher_feat.shape[0]
        or student_feat.shape[-2:] != teacher_feat.shape[-2:]
    ):
        raise ValueError(
            f"fa_loss needs the same batch and spatial size, got "
            f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}"
        )
    diff = affinity_matrix(student_feat, subscale) - affinity_matrix(teacher_feat, subscale)
    return diff.abs().mean()
