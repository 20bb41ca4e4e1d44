"""The student's inference form (``pipeline.deploy.fold``): each rewrite against the unchanged
model and against hand-computed values, and the head's matmuls against the einsums they
replaced (bit for bit on CPU, so training is unchanged)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.deploy.fold import (
    CoordSplitConv2d,
    SumFusion,
    fold_fusion_weights,
    inference_form,
    split_coord_conv,
)
from pipeline.models.head import kernel_masks, mask_pool
from pipeline.models.neck import FPNNeck, coord_channels


def _neck(*, separable: bool = False, learnable: bool = True, use_coord: bool = True) -> FPNNeck:
    torch.manual_seed(0)
    neck = FPNNeck(
        in_channels=[8, 16, 24, 32],
        channels=16,
        use_coord=use_coord,
        use_learnable_fusion=learnable,
        separable=separable,
    )
    g = torch.Generator().manual_seed(1)
    for m in neck.modules():  # trained-looking affine parameters and statistics
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d)):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return neck.eval()


def _features(batch: int = 2, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [
        torch.randn(batch, c, size // s, size // s, generator=g)
        for c, s in zip([8, 16, 24, 32], [4, 8, 16, 32])
    ]


def test_head_matmuls_equal_the_einsums_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    kernels = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    features = torch.randn(2, 8, 12, 10, generator=g, requires_grad=True)
    logits = torch.randn(2, 5, 12, 10, generator=g, requires_grad=True)

    masks = kernel_masks(kernels, features)
    ref = torch.einsum("bqc,bchw->bqhw", kernels, features)
    assert masks.shape == (2, 5, 12, 10)
    assert torch.equal(masks, ref)
    got = torch.autograd.grad(masks.square().sum(), (kernels, features))
    want = torch.autograd.grad(ref.square().sum(), (kernels, features))
    assert all(torch.equal(a, b) for a, b in zip(got, want))

    pooled = mask_pool(logits, features)
    w = logits.sigmoid()
    ref = torch.einsum("bqhw,bchw->bqc", w, features) / (w.sum(dim=(2, 3))[..., None] + 1e-6)
    assert torch.equal(pooled, ref)
    got = torch.autograd.grad(pooled.sum(), (logits, features))
    want = torch.autograd.grad(ref.sum(), (logits, features))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # one value by hand: query 1 of image 0 against pixel (3, 4)
    assert masks[0, 1, 3, 4].item() == pytest.approx(
        float((kernels[0, 1] * features[0, :, 3, 4]).sum().detach()), abs=1e-5
    )


@pytest.mark.parametrize("learnable", [True, False])
def test_fold_fusion_weights_by_hand_and_against_the_neck(learnable):
    neck = _neck(learnable=learnable)
    if learnable:
        neck.fusion.raw_weights.data.copy_(torch.tensor([2.0, 0.0, 1.0, -1.0]))
        expected = [2 / (3 + 1e-4), 0.0, 1 / (3 + 1e-4), 0.0]  # relu(v) / (sum + eps)
    else:
        expected = [0.25] * 4  # the plain average
    gammas = [block[1].weight.detach().clone() for block in neck.output]
    betas = [block[1].bias.detach().clone() for block in neck.output]
    feats = _features()
    with torch.no_grad():
        _, ref = neck(feats)
        assert fold_fusion_weights(neck) == 4
        _, got = neck(feats)
    assert isinstance(neck.fusion, SumFusion) and neck.fusion_weights() is None
    for block, gamma, beta, w in zip(neck.output, gammas, betas, expected):
        assert torch.allclose(block[1].weight, gamma * w, atol=1e-7)
        assert torch.allclose(block[1].bias, beta * w, atol=1e-7)
    assert torch.allclose(got, ref, atol=1e-5), float((got - ref).abs().max())
    assert fold_fusion_weights(neck) == 0  # already folded


def test_fold_fusion_weights_on_the_separable_neck_scales_the_pointwise_batchnorm():
    neck = _neck(separable=True)
    neck.fusion.raw_weights.data.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    bn = neck.output[2].pointwise[1]
    gamma = bn.weight.detach().clone()
    feats = _features()
    with torch.no_grad():
        _, ref = neck(feats)
        assert fold_fusion_weights(neck) == 4
        _, got = neck(feats)
    assert torch.allclose(bn.weight, gamma * 1.5 / (5 + 1e-4), atol=1e-7)
    assert torch.allclose(got, ref, atol=1e-5)
    assert split_coord_conv(neck) == 0  # the depthwise first layer is left as it is


def test_fold_fusion_weights_leaves_a_block_without_a_relu_tail_alone():
    neck = _neck()
    neck.output[1].append(torch.nn.Sigmoid())  # sigmoid(w x) != w sigmoid(x)
    before = copy.deepcopy(neck.state_dict())
    assert fold_fusion_weights(neck) == 0
    assert not isinstance(neck.fusion, SumFusion)
    assert all(torch.equal(before[k], v) for k, v in neck.state_dict().items())


def test_coord_split_conv_by_hand():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1, bias=True)
    x = torch.randn(1, 1, 4, 5)
    split = CoordSplitConv2d(conv=conv)
    assert split.weight.shape == (2, 1, 3, 3) and split.coord_weight.shape == (2, 2, 3, 3)
    with torch.no_grad():
        got = split(x)
        want = conv(torch.cat([x, coord_channels(x)], dim=1))
        # output channel 0 at pixel (0, 0), by hand over the 2x2 window inside the image
        c = coord_channels(x)[0]
        w, b = conv.weight[0], conv.bias[0]
        by_hand = b + sum(
            w[0, 1 + dy, 1 + dx] * x[0, 0, dy, dx]
            + w[1, 1 + dy, 1 + dx] * c[0, dy, dx]
            + w[2, 1 + dy, 1 + dx] * c[1, dy, dx]
            for dy in (0, 1)
            for dx in (0, 1)
        )
    assert torch.allclose(got, want, atol=1e-6)
    assert got[0, 0, 0, 0].item() == pytest.approx(float(by_hand), abs=1e-5)


def test_split_coord_conv_keeps_the_neck_output_and_drops_the_concat():
    neck = _neck()
    feats = _features()
    with torch.no_grad():
        _, ref = neck(feats)
        assert split_coord_conv(neck) == 1
        _, got = neck(feats)
    assert isinstance(neck.mask_conv[0], CoordSplitConv2d)
    assert isinstance(neck.coords, torch.nn.Identity)
    assert neck.mask_conv[0].weight.shape[1] == 16  # the large conv sees the 16 feature channels
    assert torch.allclose(got, ref, atol=1e-5)
    assert split_coord_conv(neck) == 0
    assert split_coord_conv(_neck(use_coord=False)) == 0


def test_inference_form_keeps_the_student_outputs_and_the_onnx_graph_has_no_einsum(tmp_path):
    onnx = pytest.importorskip("onnx")
    from pipeline.config import load_config
    from pipeline.deploy.export import export_onnx
    from pipeline.models.student import build_student

    cfg = load_config(
        "configs/reg_sam/regnet_distill.yaml",
        ["model.neck.channels=16", "model.head.num_queries=6", "model.head.ffn_dim=32"],
    )
    assert cfg.model.use_learnable_fusion and cfg.model.neck.use_coord
    torch.manual_seed(0)
    student = build_student(cfg.model, 4)
    student.neck.fusion.raw_weights.data.copy_(torch.tensor([0.3, 1.2, 0.7, 2.0]))
    student.eval()
    images = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    rewritten = copy.deepcopy(student)
    with torch.no_grad():
        ref = student.forward_pixels(images)
        with pytest.raises(ValueError, match="eval-mode"):
            inference_form(copy.deepcopy(student).train(), student.normalize(images))
        done = inference_form(rewritten, student.normalize(images))
        got = rewritten.forward_pixels(images)
    assert done["fusion_levels_folded"] == 4 and done["coord_convs_split"] == 1
    assert done["batchnorms_folded"] > 10
    for key in ("pred_logits", "pred_masks", "pred_iou"):
        assert torch.allclose(got[key], ref[key], atol=1e-4), key

    path = export_onnx(student, tmp_path / "s.onnx", (64, 96), dynamic=True)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "Einsum" not in ops and "MatMul" in ops
    assert "BatchNormalization" not in ops
    widths = {
        tuple(init.dims)[1]
        for init in graph.initializer
        if len(init.dims) == 4 and tuple(init.dims)[2:] == (3, 3) and init.dims[0] == 16
    }
    assert 18 not in widths  # no 3x3 conv over features + 2 coordinate channels is left
    assert 16 in widths and 2 in widths


def test_sum_fusion_counts_its_maps():
    fusion = SumFusion(num_levels=2)
    a, b = torch.ones(1, 2, 3, 3), torch.full((1, 2, 3, 3), 2.0)
    assert torch.equal(fusion([a, b]), torch.full((1, 2, 3, 3), 3.0))
    with pytest.raises(ValueError, match="expects 2 maps, got 1"):
        fusion([a])
