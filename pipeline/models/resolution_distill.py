"""DSRL-style resolution distillation (training only).

After "Dual Super-Resolution Learning for Semantic Segmentation" (Wang et al., CVPR 2020): the
student also sees a down-scaled copy of each image (the low-resolution path). A light
super-resolution decoder reconstructs the full-resolution normalised image from the
low-resolution path's mask features (``loss_sr``), and the feature-affinity loss pulls the
pixel-to-pixel structure of those features towards that of the full-resolution path
(``loss_fa``). Only the student's backbone and neck run on the low-resolution image; in train
mode that pass also updates the student's BatchNorm running statistics, as in DSRL, where both
resolutions share one network.

The decoder belongs to :class:`ResolutionDistiller`, never to the student: the student is an
argument of :meth:`ResolutionDistiller.forward`, not a submodule, so neither its state dict nor
its forward changes when this distillation is enabled.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.fa_loss import fa_loss

__all__ = ["SRDecoder", "ResolutionDistiller"]


class SRDecoder(nn.Module):
    """Light super-resolution decoder: features -> an image ``upscale`` times larger.

    ``conv3x3-BN-ReLU (in -> feat)``, ``conv3x3-BN-ReLU (feat -> feat)``,
    ``conv1x1 (feat -> 3 * upscale^2)`` and a pixel shuffle by ``upscale`` (ESPCN's sub-pixel
    layer). The projection is 1x1 because it is the widest layer (``3 * 8^2 = 192`` outputs for
    the default ``mask_stride / lr_scale = 8``): a 3x3 projection would cost 2.6x the rest of the
    decoder together (measured: 22 ms against 13 ms fwd + bwd, batch 8 x 64 x 20 x 20, 2 CPU
    cores) while the two 3x3 layers before it already give each output pixel a 5x5-cell context.
    """

    def __init__(self, *, in_channels: int, feat_channels: int, upscale: int) -> None:
        """
        Arguments:
            in_channels: channels of the input features.
            feat_channels: width of the two hidden convolutions.
            upscale: integer output / input size ratio (>= 1).
        """
        super().__init__()
        if in_channels < 1 or feat_channels < 1 or upscale < 1:
            raise ValueError(
                f"SRDecoder needs positive sizes, got in_channels={in_channels}, "
                f"feat_channels={feat_channels}, upscale={upscale}"
            )
        self.upscale = upscale
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, feat_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(feat_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(feat_channels, feat_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(feat_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(feat_channels, 3 * upscale * upscale, 1),
        )
        self.shuffle = nn.PixelShuffle(upscale)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_channels, h, w]`` -> ``[B, 3, h * upscale, w * upscale]``."""
        return self.shuffle(self.body(x))


class ResolutionDistiller(nn.Module):
    """Super-resolution and feature-affinity losses between a low- and the full-resolution path.

    Logged terms: ``loss_sr`` and ``loss_fa`` are the raw (unweighted) losses; the weighted sum
    ``loss_resolution_distill = sr_loss_weight * loss_sr + fa_loss_weight * loss_fa`` is the one
    term that enters the total loss.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        feat_channels: int,
        sr_loss_weight: float,
        fa_loss_weight: float,
        fa_subscale: float,
        lr_scale: float = 0.5,
        mask_stride: int = 4,
        size_divisibility: int = 1,
    ) -> None:
        """
        Arguments:
            in_channels: channels of the student's mask features.
            feat_channels: hidden width of the :class:`SRDecoder`.
            sr_loss_weight: weight of ``loss_sr`` in the total.
            fa_loss_weight: weight of ``loss_fa`` in the total.
            fa_subscale: pooling ratio ``1 / k`` of the affinity matrices.
            lr_scale: size ratio of the low-resolution image, in ``(0, 1)``.
            mask_stride: stride of the student's mask features.
            size_divisibility: the low-resolution image is zero-padded (bottom / right) to a
                multiple of this; 1 (default) = no padding, the student takes any size and
                padding to 32 would waste up to 44% of the path's compute (80 -> 96 px).
        """
        super().__init__()
        if not 0 < lr_scale < 1:
            raise ValueError(f"lr_scale must be in (0, 1), got {lr_scale}")
        if sr_loss_weight < 0 or fa_loss_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got sr_loss_weight={sr_loss_weight}, "
                f"fa_loss_weight={fa_loss_weight}"
            )
        self.sr_loss_weight = float(sr_loss_weight)
        self.fa_loss_weight = float(fa_loss_weight)
        self.fa_subscale = float(fa_subscale)
        self.lr_scale = float(lr_scale)
        self.mask_stride = int(mask_stride)
        self.size_divisibility = int(size_divisibility)
        # low-resolution mask grid -> full-resolution image
        self.sr_decoder = SRDecoder(
            in_channels=in_channels,
            feat_channels=feat_channels,
            upscale=max(1, round(mask_stride / lr_scale)),
        )

    def low_resolution(self, images_hr: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Down-scale by ``lr_scale`` (bilinear, antialiased) and zero-pad for the student.

        Returns:
            ``(images_lr [B, 3, H', W'], (h, w))``: the padded batch and the size of its content,
            ``h = round(H * lr_scale)``, ``w = round(W * lr_scale)``.
        """
        height, width = images_hr.shape[-2:]
        h, w = max(1, round(height * self.lr_scale)), max(1, round(width * self.lr_scale))
        small = F.interpolate(
            images_hr, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
        d = self.size_divisibility
        pad_h, pad_w = -h % d, -w % d
        if pad_h or pad_w:
            small = F.pad(small, (0, pad_w, 0, pad_h))
        return small, (h, w)

    def forward(
        self, student: nn.Module, images_hr: Tensor, feats_hr: dict[str, Any]
    ) -> dict[str, Tensor]:
        """
        Arguments:
            student: any module with ``forward_features(images) -> {"mask_features": ...}``.
            images_hr: float ``[B, 3, H, W]`` normalised images (the full-resolution path input).
            feats_hr: ``student.forward_features(images_hr)``; its ``mask_features``
                ``[B, C, H / r, W / r]`` is the (detached) target of the affinity loss.

        Returns:
            ``loss_sr`` (MSE of the reconstruction against ``images_hr``), ``loss_fa`` (FA loss of
            the low-resolution mask features, bilinearly upsampled to the full-resolution feature
            size, against the full-resolution ones) and the weighted ``loss_resolution_distill``.
        """
        if images_hr.ndim != 4 or images_hr.shape[1] != 3:
            raise ValueError(f"images_hr must be [B, 3, H, W], got {tuple(images_hr.shape)}")
        target_feat = feats_hr["mask_features"].detach()
        images_lr, (h, w) = self.low_resolution(images_hr)
        feat_lr = student.forward_features(images_lr)["mask_features"]
        # keep the cells that cover the image content, not the padding
        feat_lr = feat_lr[..., : math.ceil(h / self.mask_stride), : math.ceil(w / self.mask_stride)]

        recon = self.sr_decoder(feat_lr)
        if recon.shape[-2:] != images_hr.shape[-2:]:
            recon = F.interpolate(
                recon, size=images_hr.shape[-2:], mode="bilinear", align_corners=False
            )
        loss_sr = F.mse_loss(recon.float(), images_hr.float())

        feat_up = F.interpolate(
            feat_lr, size=target_feat.shape[-2:], mode="bilinear", align_corners=False
        )
        loss_fa = fa_loss(feat_up, target_feat, self.fa_subscale)
        total = self.sr_loss_weight * loss_sr + self.fa_loss_weight * loss_fa
        return {"loss_sr": loss_sr, "loss_fa": loss_fa, "loss_resolution_distill": total}
