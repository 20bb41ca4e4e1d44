"""PCA of wide teacher levels and class prototypes (pipeline.cache.pca, pipeline.cache.prototypes)."""

import numpy as np
import pytest
import torch

from pipeline.cache.pca import (
    Moments,
    basis_sha256,
    feature_moments,
    fit_pca,
    merge_moments,
    project,
    tree_reduce,
    valid_cells,
)
from pipeline.cache.prototypes import (
    class_logits,
    class_sums,
    merge_class_sums,
    fit_prototype_scale,
    prototypes_from_sums,
)


def _correlated(rng, n, c):
    mixing = rng.normal(size=(c, c)) * (0.7 ** np.arange(c))[None, :]
    return rng.normal(size=(n, c)) @ mixing.T + rng.normal(size=c)


def test_basis_matches_numpy_eigh_on_the_same_data():
    rng = np.random.default_rng(1)
    maps = [_correlated(rng, 48, 12).T.reshape(12, 6, 8) for _ in range(5)]
    moments = tree_reduce([feature_moments(m) for m in maps], merge_moments)
    basis = fit_pca(moments, 4)

    x = np.concatenate([m.reshape(12, -1).T for m in maps])  # [240, 12]
    eigval, eigvec = np.linalg.eigh(np.cov(x, rowvar=False))
    top = np.argsort(eigval)[::-1][:4]
    np.testing.assert_allclose(basis.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(basis.explained_variance, eigval[top], rtol=1e-9)
    for k in range(4):  # same axes up to sign
        assert abs(abs(basis.components[:, k] @ eigvec[:, top[k]]) - 1) < 1e-9
    assert basis.total_variance == pytest.approx(eigval.sum(), rel=1e-9)
    assert basis.explained_variance_ratio == pytest.approx(
        eigval[top].sum() / eigval.sum(), rel=1e-9
    )
    # deterministic sign: every column's largest-magnitude entry is positive
    peak = np.abs(basis.components).argmax(axis=0)
    assert (basis.components[peak, np.arange(4)] > 0).all()

    coeff = project(maps[0], basis)
    assert coeff.shape == (4, 6, 8) and coeff.dtype == np.float32
    expected = (maps[0].reshape(12, -1).T - x.mean(axis=0)) @ basis.components
    np.testing.assert_allclose(coeff.reshape(4, -1).T, expected, rtol=1e-5, atol=1e-5)


def test_masked_moments_use_only_valid_cells():
    f = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    mask = np.array([[True, False, True], [False, False, True]])
    m = feature_moments(f, mask)
    vecs = np.array([[0, 6], [2, 8], [5, 11]], np.float64)
    assert m.count == 3
    np.testing.assert_array_equal(m.total, vecs.sum(axis=0))
    np.testing.assert_array_equal(m.outer, vecs.T @ vecs)


def test_tree_reduce_shape_is_fixed():
    assert tree_reduce(list("abcde"), lambda a, b: f"({a}{b})") == "(((ab)(cd))e)"
    assert tree_reduce(["x"], lambda a, b: a + b) == "x"
    with pytest.raises(ValueError):
        tree_reduce([], lambda a, b: a)


def test_tree_fixes_the_float_sum_whatever_the_arrival_order():
    # float64 addition is not associative: 1e16 + 1 == 1e16. The tree pairs (a + b) + (c + d),
    # giving 0 here, where a running sum in list order would give 1.
    vals = [1e16, 1.0, -1e16, 1.0]
    parts = [Moments(np.array([v]), np.zeros((1, 1)), 1) for v in vals]
    assert ((vals[0] + vals[1]) + vals[2]) + vals[3] == 1.0
    total = tree_reduce(parts, merge_moments)
    assert total.total[0] == (vals[0] + vals[1]) + (vals[2] + vals[3]) == 0.0
    assert total.count == 4


def test_valid_cells_of_a_landscape_image():
    # 96 x 128 image, S = 256 -> s = 2: the image covers rows [0, 192) of the frame;
    # on a 16 x 16 grid (16 px cells) row centres 8, 24, ..., 184 (< 192) are valid: 12 rows
    v = valid_cells((96, 128), 256, (16, 16))
    assert v.shape == (16, 16)
    assert v[:12].all() and not v[12:].any()


def test_fit_needs_samples_and_valid_k():
    m = feature_moments(np.ones((3, 1, 1), np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        fit_pca(m, 2)
    with pytest.raises(ValueError, match="0 < k <= 3"):
        fit_pca(m, 4)


def test_basis_digest_changes_with_the_basis():
    rng = np.random.default_rng(0)
    b = fit_pca(feature_moments(rng.normal(size=(6, 4, 4))), 2)
    assert basis_sha256([None, b]) == basis_sha256([None, b])
    assert basis_sha256([None, b]) != basis_sha256([b, None])


# ------------------------------------------------------------------------ prototypes
def test_prototypes_are_normalised_means_of_unit_embeddings():
    emb_a = np.array([[3.0, 0.0], [0.0, 2.0]])  # class 0 twice -> mean of units (0.5, 0.5)
    emb_b = np.array([[0.0, -5.0]])  # class 2 -> (0, -1); class 1 absent
    sums = merge_class_sums(
        class_sums(emb_a, np.array([0, 0]), 3), class_sums(emb_b, np.array([2]), 3)
    )
    np.testing.assert_array_equal(sums.count, [2, 0, 1])
    protos = prototypes_from_sums(sums)
    np.testing.assert_allclose(protos, [[2**-0.5, 2**-0.5], [0, 0], [0, -1]], atol=1e-7)

    logits = class_logits(torch.tensor([[1.0, 1.0], [0.0, 4.0]]), torch.from_numpy(protos), 10.0)
    np.testing.assert_allclose(
        logits.numpy(), [[10.0, 0.0, -10 * 2**-0.5], [10 * 2**-0.5, 0.0, -10.0]], atol=1e-5
    )


def test_class_sums_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_sums(np.ones((1, 3)), np.array([2]), 2)


def test_fitted_prototype_scale_matches_the_closed_form():
    # 80 % of the segments sit 0.5 closer (in cosine) to their own class, 20 % 0.5 closer to the
    # other one: the NLL of sigmoid(s * 0.5) is least where it equals 0.8, s = ln(4) / 0.5
    cos = np.array([[0.9, 0.4]] * 8 + [[0.4, 0.9]] * 2)
    labels = np.zeros(10, np.int64)
    scale, nll = fit_prototype_scale(cos, labels)
    assert scale == pytest.approx(np.log(4.0) / 0.5, rel=1e-3)
    assert nll == pytest.approx(-(0.8 * np.log(0.8) + 0.2 * np.log(0.2)), rel=1e-6)
    # always right with a margin: the NLL falls all the way to the upper bound of the search
    assert fit_prototype_scale(cos[:8], labels[:8], bounds=(1.0, 50.0))[0] == pytest.approx(
        50.0, rel=1e-3
    )
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_prototype_scale(cos, np.full(10, 2))
    with pytest.raises(ValueError, match="need cosines"):
        fit_prototype_scale(cos[:0], labels[:0])
