"""Per-level PCA that narrows wide teacher features to ``cache.channels`` channels.

The basis of a level is fitted from float64 moments (``sum x``, ``sum x x^T``, count) of its
feature vectors over the valid cells of ``cache.pca_samples`` images. Moments are summed along a
fixed binary tree (:func:`tree_reduce`) whose shape depends only on the number of leaves, so the
sum, and hence the basis, is bit-identical however many dask workers computed the leaves.

BLAS and LAPACK give results that depend on their thread count in the last bits (measured:
``eigh`` of a 256x256 covariance differs between 1 and 2 OpenBLAS threads), so
:func:`feature_moments` and :func:`fit_pca` run their BLAS/LAPACK calls on one thread
(``threadpoolctl``), whatever the caller's ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` or
Snakemake's ``threads``: a basis built through Snakemake equals one built from the CLI bit for bit.

A stored level holds the PCA coefficients ``components^T (x - mean)``, i.e. centred and
rotated features; levels no wider than ``cache.channels`` are stored unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = [
    "Moments",
    "PcaBasis",
    "basis_sha256",
    "feature_moments",
    "fit_pca",
    "merge_moments",
    "project",
    "tree_reduce",
    "valid_cells",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of a set of C-dimensional vectors.

    Attributes:
      total: float64 ``[C]``, sum of the vectors.
      outer: float64 ``[C, C]``, sum of their outer products.
      count: number of vectors.
    """

    total: np.ndarray
    outer: np.ndarray
    count: int

    @staticmethod
    def zeros(channels: int) -> "Moments":
        return Moments(np.zeros(channels), np.zeros((channels, channels)), 0)


@dataclass(frozen=True)
class PcaBasis:
    """A fitted projection ``[C] -> [k]``.

    Attributes:
      mean: float64 ``[C]``.
      components: float64 ``[C, k]``, orthonormal columns by decreasing variance; each column's
        largest-magnitude entry is positive (a deterministic sign).
      explained_variance: float64 ``[k]``, eigenvalues of the covariance.
      total_variance: float64, trace of the covariance.
      num_samples: vectors the basis was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    total_variance: float
    num_samples: int

    @property
    def explained_variance_ratio(self) -> float:
        """Share of the total variance kept by the k components."""
        return (
            float(self.explained_variance.sum() / self.total_variance)
            if self.total_variance > 0
            else 1.0
        )


def valid_cells(
    orig_size: tuple[int, int], input_size: int, grid_size: tuple[int, int]
) -> np.ndarray:
    """Cells of a map over the padded ``S x S`` frame whose centre lies on the image.

    The image covers ``[0, W0 s) x [0, H0 s)`` of the frame (``s = S / max(H0, W0)``); cell
    ``(a, b)`` of an ``h x w`` grid has its centre at ``((b + 0.5) S / w, (a + 0.5) S / h)``.

    Returns:
      bool ``[h, w]``.
    """
    h0, w0 = orig_size
    h, w = grid_size
    s = input_size / max(h0, w0)
    rows = (np.arange(h) + 0.5) * input_size / h < h0 * s
    cols = (np.arange(w) + 0.5) * input_size / w < w0 * s
    return rows[:, None] & cols[None, :]


def feature_moments(features: np.ndarray, mask: np.ndarray | None = None) -> Moments:
    """Moments of the feature vectors of a map.

    Arguments:
      features: ``[C, h, w]``.
      mask: bool ``[h, w]`` of the cells to use (None = all).
    """
    c = features.shape[0]
    x = features.reshape(c, -1).T.astype(np.float64)
    if mask is not None:
        x = x[mask.reshape(-1)]
    with threadpool_limits(limits=1, user_api="blas"):  # thread-count-independent bits
        outer = x.T @ x
    return Moments(x.sum(axis=0), outer, int(x.shape[0]))


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Sum of two :class:`Moments` (the combine step of the reduction)."""
    return Moments(a.total + b.total, a.outer + b.outer, a.count + b.count)


def tree_reduce(items: Sequence[T], combine: Callable[[T, T], T]) -> T:
    """Reduce ``items`` along a fixed binary tree: neighbours are paired level by level.

    ``[a, b, c, d, e] -> [ab, cd, e] -> [abcd, e] -> abcde``. The tree depends only on
    ``len(items)``; ``combine`` may return a value or a dask future, so the same function
    builds the reduction on a cluster and locally.
    """
    level = list(items)
    if not level:
        raise ValueError("tree_reduce needs at least one item")
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def fit_pca(moments: Moments, k: int) -> PcaBasis:
    """The top-``k`` principal axes of the vectors summarised by ``moments``.

    The covariance ``(sum x x^T - n mean mean^T) / (n - 1)`` is decomposed with
    :func:`numpy.linalg.eigh` on one BLAS/LAPACK thread (its bits depend on the thread count).
    """
    c = moments.total.shape[0]
    if not 0 < k <= c:
        raise ValueError(f"PCA to {k} components needs 0 < k <= {c} channels")
    n = moments.count
    if n < 2:
        raise ValueError(
            f"PCA needs at least 2 feature vectors, got {n} (are all PCA sample "
            "images skipped? raise cache.pca_samples)"
        )
    mean = moments.total / n
    cov = (moments.outer - n * np.outer(mean, mean)) / (n - 1)
    cov = (cov + cov.T) / 2
    with threadpool_limits(limits=1, user_api="blas"):
        eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(-eigval, kind="stable")[:k]
    eigval, eigvec = eigval[order], eigvec[:, order]
    peak = np.argmax(np.abs(eigvec), axis=0)
    signs = np.sign(eigvec[peak, np.arange(k)])
    signs[signs == 0] = 1.0
    return PcaBasis(
        mean=mean,
        components=eigvec * signs,
        explained_variance=np.maximum(eigval, 0.0),
        total_variance=float(max(np.trace(cov), 0.0)),
        num_samples=n,
    )


def project(features: np.ndarray, basis: PcaBasis) -> np.ndarray:
    """PCA coefficients of a feature map.

    Arguments:
      features: ``[C, h, w]``.

    Returns:
      float32 ``[k, h, w]`` = ``components^T (x - mean)`` per cell (computed in float64).
    """
    c, h, w = features.shape
    x = features.reshape(c, -1).astype(np.float64) - basis.mean[:, None]
    return (basis.components.T @ x).astype(np.float32).reshape(-1, h, w)


def basis_sha256(bases: Sequence[PcaBasis | None]) -> str:
    """sha256 over the float64 bytes of every level's mean and components (None = no PCA)."""
    digest = hashlib.sha256()
    for b in bases:
        if b is None:
            digest.update(b"none")
        else:
            digest.update(np.ascontiguousarray(b.mean, np.float64).tobytes())
            digest.update(np.ascontiguousarray(b.components, np.float64).tobytes())
    return digest.hexdigest()
