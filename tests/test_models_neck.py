"""FPNNeck: level shapes, exact resizing, coordinate channels, learnable / average fusion."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.neck import FPNNeck, LevelFusion, coord_channels, resize_to_stride

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
