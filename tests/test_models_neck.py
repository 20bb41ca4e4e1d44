"""FPNNeck: level shapes, exact resizing, coordinate channels, learnable / average fusion, the
depthwise-separable option (its MACs by hand, the default's state-dict keys unchanged)."""

from __future__ import annotations

import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

from pipeline.models.neck import (
    FPNNeck,
    LevelFusion,
    SeparableConvNormAct,
    coord_channels,
    resize_to_stride,
)

IN_CHANNELS = [24, 56, 152, 368]
STRIDES = [4, 8, 16, 32]


def _features(batch: int = 2, height: int = 64, width: int = 96) -> list[torch.Tensor]:
    return [torch.randn(batch, c, height // s, width // s) for c, s in zip(IN_CHANNELS, STRIDES)]


@pytest.mark.parametrize("mask_stride", [4, 8])
@pytest.mark.parametrize("use_coord", [True, False])
def test_shapes(mask_stride: int, use_coord: bool) -> None:
    neck = FPNNeck(
        in_channels=IN_CHANNELS,
        strides=STRIDES,
        channels=32,
        mask_stride=mask_stride,
        use_coord=use_coord,
    )
    levels, mask_features = neck(_features())
    assert [tuple(x.shape) for x in levels] == [(2, 32, 64 // s, 96 // s) for s in STRIDES]
    assert tuple(mask_features.shape) == (2, 32, 64 // mask_stride, 96 // mask_stride)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="mask_stride must be 4 or 8"):
        FPNNeck(in_channels=IN_CHANNELS, strides=STRIDES, mask_stride=16)
    neck = FPNNeck(in_channels=IN_CHANNELS, strides=STRIDES, channels=16)
    feats = _features()
    feats[2] = torch.randn(2, 10, 4, 6)
    with pytest.raises(ValueError, match="level 2: expected 152 channels, got 10"):
        neck(feats)
    with pytest.raises(ValueError, match="expects 4 feature maps, got 3"):
        neck(feats[:3])


def test_resize_to_stride_exact() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = resize_to_stride(x, 4, 8)
    # average of each 2x2 block
    assert torch.equal(down, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    # upsampling a stride-8 map to stride 4: the pixel-centre convention (align_corners=False)
    row = torch.tensor([[[[0.0, 4.0]]]])
    up = resize_to_stride(row, 8, 4)
    assert torch.allclose(up[0, 0, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]))
    assert resize_to_stride(x, 4, 4) is x


def test_coord_channels_pixel_centres() -> None:
    coords = coord_channels(torch.zeros(3, 5, 2, 4))
    assert coords.shape == (3, 2, 2, 4)
    assert torch.allclose(coords[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert torch.allclose(coords[0, 1, :, 0], torch.tensor([-0.5, 0.5]))


def test_learnable_fusion_weights_normalised_and_trained() -> None:
    fusion = LevelFusion(num_levels=4, learnable=True)
    with torch.no_grad():
        fusion.raw_weights.copy_(torch.tensor([2.0, -1.0, 1.0, 1.0]))
    w = fusion.weights()
    assert (w >= 0).all()
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(w, torch.tensor([0.5, 0.0, 0.25, 0.25]), atol=1e-4)

    maps = [torch.full((1, 2, 3, 3), float(v)) for v in (1.0, 10.0, 2.0, 4.0)]
    fused = fusion(maps)
    assert torch.allclose(fused, torch.full_like(fused, 0.5 * 1 + 0.25 * 2 + 0.25 * 4), atol=1e-3)


def test_neck_fusion_weights_receive_gradients() -> None:
    neck = FPNNeck(in_channels=IN_CHANNELS, strides=STRIDES, channels=16, use_learnable_fusion=True)
    w = neck.fusion_weights()
    assert w.shape == (4,) and (w >= 0).all()
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-3)
    _, mask_features = neck(_features())
    mask_features.pow(2).mean().backward()
    grad = neck.fusion.raw_weights.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("mask_stride", [4, 8])
def test_plain_average_is_mean_of_resized_levels(mask_stride: int) -> None:
    neck = FPNNeck(
        in_channels=IN_CHANNELS,
        strides=STRIDES,
        channels=16,
        mask_stride=mask_stride,
        use_learnable_fusion=False,
    ).eval()
    assert neck.fusion_weights() is None
    captured = {}

    def hook(module, inputs, output):
        captured["x"] = inputs[0]

    neck.mask_conv.register_forward_hook(hook)
    levels, _ = neck(_features())
    expected = torch.stack(
        [
            torch.nn.functional.interpolate(
                x, size=(64 // mask_stride, 96 // mask_stride), mode="bilinear", align_corners=False
            )
            if s > mask_stride
            else torch.nn.functional.avg_pool2d(x, mask_stride // s)
            if s < mask_stride
            else x
            for x, s in zip(levels, STRIDES)
        ]
    ).mean(0)
    fused = captured["x"][:, :16]
    assert torch.allclose(fused, expected, atol=1e-5)
    # the last two channels are the coordinates
    assert torch.allclose(captured["x"][:, 16:], coord_channels(expected))


# ------------------------------------------------------------------ separable option
def _neck_macs(neck: FPNNeck, features: list[torch.Tensor]) -> int:
    """Multiply-adds of one neck forward (FlopCounterMode counts 2 FLOPs per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        neck.eval()(features)
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2


def test_default_neck_state_dict_keys_and_shapes_unchanged() -> None:
    """separable=False (the default) is the neck every existing checkpoint was saved from."""
    neck = FPNNeck(in_channels=IN_CHANNELS, strides=STRIDES, channels=32)
    assert not neck.separable
    expected = {}
    for i, c in enumerate(IN_CHANNELS):
        expected[f"lateral.{i}.weight"] = (32, c, 1, 1)
        expected[f"lateral.{i}.bias"] = (32,)
    for i in range(4):  # ConvNormAct: 0 = conv (no bias), 1 = GroupNorm
        expected[f"output.{i}.0.weight"] = (32, 32, 3, 3)
        expected[f"output.{i}.1.weight"] = (32,)
        expected[f"output.{i}.1.bias"] = (32,)
    expected["fusion.raw_weights"] = (4,)
    expected["mask_conv.0.weight"] = (32, 34, 3, 3)  # + 2 coordinate channels
    expected["mask_conv.1.weight"] = (32,)
    expected["mask_conv.1.bias"] = (32,)
    expected["mask_proj.weight"] = (32, 32, 1, 1)
    expected["mask_proj.bias"] = (32,)
    got = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order too


def test_separable_neck_blocks_shapes_and_keys() -> None:
    neck = FPNNeck(in_channels=IN_CHANNELS, strides=STRIDES, channels=32, separable=True).eval()
    assert neck.separable
    for block in [*neck.output, neck.mask_conv]:
        assert isinstance(block, SeparableConvNormAct)
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in block.modules())
    dw = neck.mask_conv.depthwise[0]
    assert (dw.in_channels, dw.out_channels, dw.groups, dw.kernel_size) == (34, 34, 34, (3, 3))
    pw = neck.mask_conv.pointwise[0]
    assert (pw.in_channels, pw.out_channels, pw.kernel_size) == (34, 32, (1, 1))
    keys = neck.state_dict().keys()
    assert "output.0.depthwise.0.weight" in keys and "mask_conv.pointwise.1.running_var" in keys
    assert "output.0.0.weight" not in keys  # the dense key: a dense checkpoint will not load
    levels, mask_features = neck(_features())
    assert [tuple(x.shape) for x in levels] == [(2, 32, 64 // s, 96 // s) for s in STRIDES]
    assert tuple(mask_features.shape) == (2, 32, 16, 24)
    dense = FPNNeck(in_channels=IN_CHANNELS, strides=STRIDES, channels=32)
    with pytest.raises(RuntimeError, match="Missing key"):
        neck.load_state_dict(dense.state_dict())


def test_separable_block_is_depthwise_then_pointwise_by_hand() -> None:
    """One channel in, two out, 3x3 depthwise of ones, pointwise [1, -1]; BN at its initial
    eval statistics (mean 0, var 1) only scales by 1 / sqrt(1 + eps)."""
    block = SeparableConvNormAct(in_channels=1, out_channels=2).eval()
    with torch.no_grad():
        block.depthwise[0].weight.fill_(1.0)
        block.pointwise[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
    x = torch.ones(1, 1, 3, 3)
    s = 1 / (1 + 1e-5) ** 0.5
    # zero padding: a corner sees 4 ones, an edge 6, the centre 9
    dw = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]]) * s
    with torch.no_grad():
        y = block(x)
    assert torch.allclose(y[0, 0], dw * s, atol=1e-5)
    assert torch.equal(y[0, 1], torch.zeros(3, 3))  # ReLU of the negative channel


# ``channels`` C at 640x640, mask stride 4, coordinates on. The convs that change:
# output[l]: C -> C at 160^2, 80^2, 40^2, 20^2 (34,000 pixels in all); mask_conv: C + 2 -> C at
# 160^2 (25,600 pixels). Dense 3x3: C_in * C_out * 9 MACs a pixel; separable: C_in * 9
# (depthwise) + C_in * C_out (pointwise).
def _hand_macs(c: int) -> tuple[int, int]:
    out_px, mask_px = 160**2 + 80**2 + 40**2 + 20**2, 160**2
    dense = c * c * 9 * out_px + (c + 2) * c * 9 * mask_px
    separable = (c * 9 + c * c) * out_px + ((c + 2) * 9 + (c + 2) * c) * mask_px
    return dense, separable


def test_hand_counted_macs_of_the_changed_convs() -> None:
    assert sum((640 // s) ** 2 for s in STRIDES) == 34_000
    # COCO student, neck 128: output 147,456 x 34,000 + mask 149,760 x 25,600 (dense);
    # output 17,536 x 34,000 + mask 17,810 x 25,600 (separable)
    assert _hand_macs(128) == (8_847_360_000, 1_052_160_000)
    # default student, neck 64: output 36,864 x 34,000 + mask 38,016 x 25,600 (dense);
    # output 4,672 x 34,000 + mask 4,818 x 25,600 (separable)
    assert _hand_macs(64) == (2_226_585_600, 282_188_800)


@pytest.mark.parametrize(
    "in_channels, channels, saved",
    [
        ([72, 168, 408, 912], 128, 7_795_200_000),  # COCO student (regnetx_016)
        ([24, 56, 152, 368], 64, 1_944_396_800),  # default student (regnetx_002)
    ],
)
def test_separable_neck_saves_the_hand_counted_macs_at_640(
    in_channels: list[int], channels: int, saved: int
) -> None:
    dense_macs, separable_macs = _hand_macs(channels)
    assert dense_macs - separable_macs == saved
    features = [torch.randn(1, c, 640 // s, 640 // s) for c, s in zip(in_channels, STRIDES)]
    kwargs = dict(in_channels=in_channels, strides=STRIDES, channels=channels)
    dense = _neck_macs(FPNNeck(**kwargs), features)
    separable = _neck_macs(FPNNeck(**kwargs, separable=True), features)
    assert dense - separable == saved
    # everything else in the neck (laterals, mask projection) is the same in both
    assert dense - dense_macs == separable - separable_macs
