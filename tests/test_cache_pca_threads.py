"""The PCA basis does not depend on the caller's BLAS/LAPACK thread count."""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.cache.pca import basis_sha256, feature_moments, fit_pca, merge_moments, tree_reduce


def _basis_digest(threads: int) -> str:
    rng = np.random.default_rng(0)
    leaves = []
    for _ in range(4):  # a neck-like level: 256 channels, varied scales
        f = rng.standard_normal((256, 48, 48)) * rng.random((256, 1, 1)) * 3
        leaves.append(feature_moments(f.astype(np.float32)))
    with threadpool_limits(limits=threads, user_api="blas"):
        moments = tree_reduce(leaves, merge_moments)
        return basis_sha256([fit_pca(moments, 64)])


def test_basis_is_bit_identical_for_one_and_several_blas_threads():
    """Issue 11 item 5: one and two (and four) BLAS threads give the same basis bit for bit;
    unpinned, OpenBLAS's eigh differed in the last bits (2.7e-15 in ``components``)."""
    one = _basis_digest(1)
    assert _basis_digest(2) == one
    assert _basis_digest(4) == one


def test_moments_are_bit_identical_for_any_thread_count():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((256, 40, 40)).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        a = feature_moments(f)
    with threadpool_limits(limits=4, user_api="blas"):
        b = feature_moments(f)
    assert a.outer.tobytes() == b.outer.tobytes() and a.total.tobytes() == b.total.tobytes()
