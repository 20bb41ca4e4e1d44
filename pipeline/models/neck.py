"""Light FPN neck and the multi-level fusion into one mask-feature map.

Pixel ``(i, j)`` of a stride-``s`` map covers ``[s j, s (j + 1)) x [s i, s (i + 1))`` of the input,
so resizing between strides uses bilinear interpolation with ``align_corners=False`` (upsampling)
and average pooling (downsampling), both exact under that convention.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvNormAct",
    "SeparableConvNormAct",
    "LevelFusion",
    "FPNNeck",
    "resize_to_stride",
    "coord_channels",
    "CoordChannels",
]


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> GroupNorm -> optional ReLU."""

    def __init__(
        self, *, in_channels: int, out_channels: int, kernel_size: int = 3, activation: bool = True
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(math.gcd(32, out_channels), out_channels),
        ]
        if activation:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SeparableConvNormAct(nn.Sequential):
    """Depthwise-separable replacement of a dense ``k x k`` :class:`ConvNormAct`.

    ``depthwise``: ``k x k`` conv with one filter per input channel (``groups = in_channels``,
    no bias) -> BatchNorm -> ReLU; ``pointwise``: 1x1 conv ``in_channels -> out_channels``
    (no bias) -> BatchNorm -> ReLU. ``[B, in_channels, H, W] -> [B, out_channels, H, W]``.

    Multiply-adds per output pixel: ``in_channels * k * k + in_channels * out_channels``
    instead of the dense conv's ``in_channels * out_channels * k * k``. BatchNorm (not the dense
    block's GroupNorm) so that export folds both normalisations into their convolutions
    (:func:`pipeline.deploy.fold.fold_batchnorm`).
    """

    def __init__(self, *, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        depthwise = nn.Sequential(
            nn.Conv2d(
                in_channels,
                in_channels,
                kernel_size,
                padding=kernel_size // 2,
                groups=in_channels,
                bias=False,
            ),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
        )
        pointwise = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        super().__init__(OrderedDict(depthwise=depthwise, pointwise=pointwise))


def resize_to_stride(
    x: Tensor, from_stride: int, to_stride: int, size: tuple[int, int] | None = None
) -> Tensor:
    """Resample ``[B, C, h, w]`` at ``from_stride`` to ``to_stride`` (strides are powers of 2).

    Returns ``[B, C, h * from_stride / to_stride, w * from_stride / to_stride]``, or exactly
    ``size`` when given (inputs whose sides are not multiples of 32 give ceil-rounded level sizes,
    e.g. 80 px -> 20, 10, 5, 3, which plain factors would not bring back to 20).
    """
    if from_stride == to_stride:
        return x
    if from_stride > to_stride:
        if size is not None:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        factor = from_stride // to_stride
        return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    factor = to_stride // from_stride
    return F.avg_pool2d(x, kernel_size=factor, stride=factor, ceil_mode=size is not None)


def coord_channels(x: Tensor) -> Tensor:
    """``[B, 2, H, W]`` pixel-centre coordinates (x, y) of ``x [B, C, H, W]`` in [-1, 1]."""
    batch, _, height, width = x.shape
    ys = (torch.arange(height, device=x.device, dtype=x.dtype) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=x.device, dtype=x.dtype) + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0).expand(batch, -1, -1, -1)


class CoordChannels(nn.Module):
    """Appends :func:`coord_channels`: ``[B, C, H, W] -> [B, C + 2, H, W]`` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, coord_channels(x)], dim=1)


class LevelFusion(nn.Module):
    """Weighted sum of same-size maps.

    ``learnable=True``: fast normalised fusion, ``w_l = relu(v_l) / (sum_k relu(v_k) + eps)``
    with ``v`` initialised to ones. ``learnable=False``: the plain average (RAP-SAM).
    """

    def __init__(self, *, num_levels: int, learnable: bool = True, eps: float = 1e-4) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.learnable = learnable
        self.eps = eps
        self.raw_weights = nn.Parameter(torch.ones(num_levels)) if learnable else None

    def weights(self) -> Tensor | None:
        """Normalised ``[L]`` non-negative weights summing to one (up to eps), or None."""
        if self.raw_weights is None:
            return None
        w = F.relu(self.raw_weights)
        return w / (w.sum() + self.eps)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """``maps``: L tensors ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        if len(maps) != self.num_levels:
            raise ValueError(f"LevelFusion expects {self.num_levels} maps, got {len(maps)}")
        stacked = torch.stack(list(maps))  # [L, B, C, H, W]
        w = self.weights()
        if w is None:
            return stacked.mean(0)
        return torch.einsum("l,lbchw->bchw", w.to(stacked.dtype), stacked)


class FPNNeck(nn.Module):
    """FPN over backbone strides 4..32 plus the mask-feature aggregation of RAP-SAM/YOSO.

    lateral 1x1 convs -> top-down nearest-upsample-and-add -> 3x3 output convs give P2..P5
    (``channels`` each). Every level is resized to ``mask_stride`` and fused
    (:class:`LevelFusion`); with ``use_coord`` the (x, y) coordinate channels are concatenated and
    a 3x3 conv + 1x1 projection give the mask features.

    ``separable=True`` builds the 3x3 output convs and the 3x3 mask conv as
    :class:`SeparableConvNormAct` (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU) instead
    of dense :class:`ConvNormAct`; shapes and outputs' meaning are unchanged, the state-dict keys
    of ``output.*`` and ``mask_conv.*`` differ. At 640x640 with 128 channels this takes the neck
    from 9.78 to 1.99 GMACs (``tests/test_models_neck.py`` checks the difference by hand).
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int] = (4, 8, 16, 32),
        channels: int = 128,
        mask_stride: int = 4,
        use_coord: bool = True,
        use_learnable_fusion: bool = True,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(
                f"in_channels {list(in_channels)} and strides {list(strides)} "
                "must have the same length"
            )
        if mask_stride not in (4, 8):
            raise ValueError(f"model.neck.mask_stride must be 4 or 8, got {mask_stride}")
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"backbone strides must double level to level, got {list(strides)}")
        self.in_channels = list(in_channels)
        self.strides = list(strides)
        self.channels = channels
        self.mask_stride = mask_stride
        self.use_coord = use_coord
        self.separable = separable
        block = SeparableConvNormAct if separable else ConvNormAct
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in in_channels)
        self.output = nn.ModuleList(
            block(in_channels=channels, out_channels=channels, kernel_size=3) for _ in in_channels
        )
        self.fusion = LevelFusion(num_levels=len(in_channels), learnable=use_learnable_fusion)
        self.coords = CoordChannels() if use_coord else nn.Identity()
        self.mask_conv = block(
            in_channels=channels + (2 if use_coord else 0), out_channels=channels, kernel_size=3
        )
        self.mask_proj = nn.Conv2d(channels, channels, kernel_size=1)

    def fusion_weights(self) -> Tensor | None:
        """Normalised ``[L]`` level weights (learnable fusion) or None (plain average)."""
        return self.fusion.weights()

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """
        Arguments:
            features: backbone maps ``[B, in_channels[l], H / strides[l], W / strides[l]]``.

        Returns:
            ``levels``: ``[B, channels, H / strides[l], W / strides[l]]`` for each level (P2..P5);
            ``mask_features``: ``[B, channels, H / mask_stride, W / mask_stride]``.
        """
        if len(features) != len(self.lateral):
            raise ValueError(
                f"FPNNeck expects {len(self.lateral)} feature maps, got {len(features)}"
            )
        for level, (x, c) in enumerate(zip(features, self.in_channels)):
            if x.shape[1] != c:
                raise ValueError(f"FPNNeck level {level}: expected {c} channels, got {x.shape[1]}")
        laterals = [conv(x) for conv, x in zip(self.lateral, features)]
        for level in range(len(laterals) - 2, -1, -1):
            laterals[level] = laterals[level] + F.interpolate(
                laterals[level + 1], size=laterals[level].shape[-2:], mode="nearest"
            )
        levels = [conv(x) for conv, x in zip(self.output, laterals)]

        target = levels[self.strides.index(self.mask_stride)].shape[-2:]
        resized = [
            resize_to_stride(x, s, self.mask_stride, size=target)
            for x, s in zip(levels, self.strides)
        ]
        fused = self.fusion(resized)
        mask_features = self.mask_proj(self.mask_conv(self.coords(fused)))
        return levels, mask_features
