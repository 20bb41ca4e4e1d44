"""Class prototypes of the teacher's segment embeddings and the class logits derived from them.

After the cache pass, every cached segment's 256-d embedding (SAM's image embedding averaged under
the segment) is L2-normalised and averaged per ground-truth class; the mean is normalised again
to give one unit prototype per class. Per-image sums are combined along the fixed tree of
:func:`pipeline.cache.pca.tree_reduce`, so the prototypes do not depend on the number of workers.
A class without any cached segment gets a zero prototype (cosine 0 to everything).

At read time ``cls_logits = prototype_scale * cos(embedding, prototype_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ClassSums",
    "class_logits",
    "class_sums",
    "fit_prototype_scale",
    "merge_class_sums",
    "prototype_nll",
    "prototypes_from_sums",
]

_EPS = 1e-12


@dataclass(frozen=True)
class ClassSums:
    """Per-class sums of unit embeddings.

    Attributes:
      total: float64 ``[K, D]``.
      count: int64 ``[K]``, segments per class.
    """

    total: np.ndarray
    count: np.ndarray

    @staticmethod
    def zeros(num_classes: int, dim: int) -> "ClassSums":
        return ClassSums(np.zeros((num_classes, dim)), np.zeros(num_classes, np.int64))


def class_sums(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassSums:
    """Sums of the L2-normalised embeddings of one image's segments, per class.

    Arguments:
      embeddings: ``[M, D]``.
      labels: int ``[M]`` train ids in ``[0, K)``.
      num_classes: K.
    """
    labels = np.asarray(labels, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    emb = np.asarray(embeddings, np.float64)
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), _EPS)
    total = np.zeros((num_classes, emb.shape[1]))
    for m in range(labels.size):  # sequential, fixed order: bit-stable sums
        total[labels[m]] += unit[m]
    return ClassSums(total, np.bincount(labels, minlength=num_classes).astype(np.int64))


def merge_class_sums(a: ClassSums, b: ClassSums) -> ClassSums:
    """Sum of two :class:`ClassSums`."""
    return ClassSums(a.total + b.total, a.count + b.count)


def prototypes_from_sums(sums: ClassSums) -> np.ndarray:
    """Unit mean embedding per class; float32 ``[K, D]`` (zero rows for empty classes)."""
    mean = sums.total / np.maximum(sums.count, 1)[:, None]
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return np.where(norm > _EPS, mean / np.maximum(norm, _EPS), 0.0).astype(np.float32)


def class_logits(embeddings: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled cosine similarity of segment embeddings to class prototypes.

    Arguments:
      embeddings: ``[M, D]``.
      prototypes: ``[K, D]`` unit (or zero) rows.
      scale: ``cache.prototype_scale``.

    Returns:
      float32 ``[M, K]``.
    """
    unit = F.normalize(embeddings.float(), dim=1, eps=_EPS)
    return scale * unit @ prototypes.float().T


def fit_prototype_scale(
    cosines: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.1, 1000.0)
) -> tuple[float, float]:
    """Temperature scaling of the prototype classifier (Guo et al., 2017).

    The scale ``s`` that minimises the mean negative log-likelihood of the true classes,
    ``mean_m [logsumexp_k(s * cos_mk) - s * cos_m,y_m]``, which is convex in ``s``; found by
    scipy's bounded scalar search on ``log s``. It makes ``softmax(s * cos)`` calibrated on the
    given segments, so the soft labels distilled from the cache are as confident as the
    prototypes are right, not as flat as an arbitrary scale makes them.

    Arguments:
      cosines: ``[M, K]`` cosines of segment embeddings to the class prototypes
        (``class_logits(..., scale=1)``).
      labels: int ``[M]`` true train ids.
      bounds: search interval of ``s``.

    Returns:
      ``(scale, nll)``: the fitted scale and its mean NLL (nats).
    """
    from scipy.optimize import minimize_scalar

    cos = np.asarray(cosines, np.float64)
    labels = np.asarray(labels, np.int64)
    if cos.ndim != 2 or labels.shape != cos.shape[:1] or cos.shape[0] == 0:
        raise ValueError(
            f"need cosines [M, K] and labels [M] with M >= 1, got {cos.shape} and {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= cos.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {cos.shape[1]}), got {labels.min()}..{labels.max()}"
        )
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize_scalar(
        lambda log_s: prototype_nll(cos, labels, float(np.exp(log_s))),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(res.x)), float(res.fun)


def prototype_nll(cosines: np.ndarray, labels: np.ndarray, scale: float) -> float:
    """Mean NLL (nats) of the true classes under ``softmax(scale * cosines)``;
    ``cosines [M, K]``, ``labels [M]``."""
    from scipy.special import logsumexp

    cos = np.asarray(cosines, np.float64)
    true = cos[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(np.mean(logsumexp(scale * cos, axis=1) - scale * true))
