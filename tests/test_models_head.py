"""Kernel head: mask pooling, dynamic separable convolution, stage outputs."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.head import DynamicSeparableConv, KernelHead, KernelUpdateStage, mask_pool


def test_mask_pool_hand_computed() -> None:
    # two pixels; query 0 is "on" (p = sigmoid(ln 3) = 0.75) at pixel 0 and "off" (0.25) at pixel 1
    logits = torch.log(torch.tensor([3.0, 1 / 3])).reshape(1, 1, 1, 2)
    features = torch.tensor([[2.0, 6.0], [1.0, -1.0]]).reshape(1, 2, 1, 2)
    pooled = mask_pool(logits, features, eps=0.0)
    expected = torch.tensor([(0.75 * 2 + 0.25 * 6) / 1.0, (0.75 * 1 - 0.25 * 1) / 1.0])
    assert torch.allclose(pooled[0, 0], expected)


def test_dynamic_separable_conv_matches_explicit_loops() -> None:
    torch.manual_seed(0)
    batch, queries, dim, k = 2, 3, 5, 3
    conv = DynamicSeparableConv(dim=dim, num_queries=queries, kernel_size=k)
    query, value = torch.randn(batch, queries, dim), torch.randn(batch, queries, dim)
    out = conv(query, value)

    weights = conv.weight_generator(query)
    expected = torch.zeros(batch, queries, dim)
    for b in range(batch):
        depth = torch.zeros(queries, dim)
        for q in range(queries):
            kernel = weights[b, q, queries:]
            padded = torch.nn.functional.pad(value[b, q], (1, 1))
            for c in range(dim):
                depth[q, c] = (padded[c : c + k] * kernel).sum()  # cross-correlation
        depth = depth.relu()
        point = weights[b, :, :queries] / queries**0.5
        expected[b] = (point @ depth).relu()
    expected = conv.norm(expected)
    assert torch.allclose(out, expected, atol=1e-5)


def test_dynamic_separable_conv_query_count_checked() -> None:
    conv = DynamicSeparableConv(dim=8, num_queries=4)
    with pytest.raises(ValueError, match="built for 4 queries, got 5"):
        conv(torch.randn(1, 5, 8), torch.randn(1, 5, 8))


def test_stage_masks_are_kernel_dot_features() -> None:
    torch.manual_seed(0)
    stage = KernelUpdateStage(dim=8, num_queries=4, num_classes=3, ffn_dim=16)
    features = torch.randn(2, 8, 6, 5)
    kernels, pred = stage(torch.randn(2, 4, 8), torch.randn(2, 4, 6, 5), features)
    mask_kernels = stage.mask_embed(kernels)
    b, q, i, j = 1, 2, 3, 4
    assert torch.allclose(
        pred["pred_masks"][b, q, i, j], mask_kernels[b, q] @ features[b, :, i, j], atol=1e-5
    )
    assert pred["pred_logits"].shape == (2, 4, 4)


@pytest.mark.parametrize("num_stages", [1, 3])
def test_head_outputs_and_deep_supervision(num_stages: int) -> None:
    head = KernelHead(num_classes=5, dim=16, num_queries=7, num_stages=num_stages, ffn_dim=32)
    out = head(torch.randn(2, 16, 12, 10))
    assert out["pred_logits"].shape == (2, 7, 6)
    assert out["pred_masks"].shape == (2, 7, 12, 10)
    assert out["pred_iou"].shape == (2, 7)
    assert ((out["pred_iou"] > 0) & (out["pred_iou"] < 1)).all()
    assert len(out["aux_outputs"]) == num_stages  # stage 0 (proposals) .. S-1
    for aux in out["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_masks", "pred_iou"}
        assert aux["pred_masks"].shape == (2, 7, 12, 10)
    # stage 0 masks are the learned kernels dotted with the features
    feats = torch.randn(1, 16, 4, 4)
    first = head(feats)["aux_outputs"][0]["pred_masks"]
    assert torch.allclose(
        first, torch.einsum("qc,bchw->bqhw", head.kernels.weight, feats), atol=1e-5
    )


def test_every_stage_trains_every_head_parameter() -> None:
    head = KernelHead(num_classes=3, dim=8, num_queries=4, num_stages=2, ffn_dim=16)
    out = head(torch.randn(1, 8, 6, 6))
    total = sum(
        o["pred_logits"].sum() + o["pred_masks"].sum() + o["pred_iou"].sum()
        for o in [out] + out["aux_outputs"]
    )
    total.backward()
    unused = [n for n, p in head.named_parameters() if p.grad is None]
    assert not unused


def test_wrong_feature_width_is_named() -> None:
    head = KernelHead(num_classes=3, dim=8, num_queries=4, num_stages=1, ffn_dim=16)
    with pytest.raises(ValueError, match=r"mask features \[B, 8, H, W\]"):
        head(torch.randn(1, 6, 4, 4))
