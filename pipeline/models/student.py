"""The RegSAM student: timm backbone (RegNet by default) -> FPN neck -> kernel head.

Pure convolution. The student carries its input normalisation (the backbone's timm pretrained
mean/std, as non-persistent buffers ``pixel_mean`` / ``pixel_std`` in 0-255 units):
:meth:`RegSAMStudent.normalize` maps uint8 (or float 0-255) RGB to the backbone's input, so
trainer, evaluation and the exported graph share one normalisation.

The distillation modules (``resolution_distill``, ``sam_distill``) are training-only and live
outside the student, so a student state dict is exactly what inference needs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.backbone import TimmBackbone
from pipeline.models.head import KernelHead
from pipeline.models.neck import FPNNeck

__all__ = ["RegSAMStudent", "build_student"]


class RegSAMStudent(nn.Module):
    """Backbone + neck + head with the output contract of ``docs/architecture.md``."""

    def __init__(self, *, backbone: TimmBackbone, neck: FPNNeck, head: KernelHead) -> None:
        super().__init__()
        if list(backbone.out_channels) != list(neck.in_channels):
            raise ValueError(
                f"neck in_channels {neck.in_channels} differ from backbone "
                f"out_channels {backbone.out_channels}"
            )
        if head.dim != neck.channels:
            raise ValueError(f"head dim {head.dim} differs from neck channels {neck.channels}")
        self.backbone = backbone
        self.neck = neck
        self.head = head
        # Same float32 ops as ``data.transforms.normalize_images`` (tuple -> tensor, * 255.0), so
        # an ImageNet-configured backbone sees bit-identical inputs.
        self.register_buffer(
            "pixel_mean",
            torch.tensor(backbone.pixel_mean).view(1, 3, 1, 1) * 255.0,
            persistent=False,
        )
        self.register_buffer(
            "pixel_std", torch.tensor(backbone.pixel_std).view(1, 3, 1, 1) * 255.0, persistent=False
        )

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or float 0-255) RGB ``[B, 3, H, W]`` -> float ``[B, 3, H, W]`` backbone input:
        ``(images - mean) / std`` with the backbone's pretrained mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be RGB [B, 3, H, W], got {tuple(images.shape)}")
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward_pixels(self, images: Tensor) -> dict[str, Any]:
        """:meth:`forward` on uint8 (or float 0-255) RGB ``[B, 3, H, W]``, normalised here."""
        return self(self.normalize(images))

    @property
    def neck_channels(self) -> list[int]:
        """Channels of each ``neck_features`` level, finest (stride 4) first."""
        return [self.neck.channels] * len(self.neck.strides)

    @property
    def mask_channels(self) -> int:
        """Channels of ``mask_features`` (= the kernel dimension of the head)."""
        return self.neck.channels

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def mask_stride(self) -> int:
        return self.neck.mask_stride

    @property
    def strides(self) -> list[int]:
        return list(self.neck.strides)

    def forward_features(self, images: Tensor) -> dict[str, Any]:
        """
        Arguments:
            images: float ``[B, 3, H, W]``, normalised (:meth:`normalize`). H and W should be multiples of
                32 (then every level's grid is exactly aligned; training and inference pad to
                that); other sizes work with ceil-rounded level sizes (the resolution
                distillation's low-resolution path uses that to avoid padding).

        Returns:
            ``neck_features``: list of ``[B, C, H/s, W/s]`` for s = 4, 8, 16, 32;
            ``mask_features``: ``[B, C, H/r, W/r]`` (r = mask stride);
            ``fusion_weights``: normalised ``[L]`` level weights, or None (plain average).
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        levels, mask_features = self.neck(self.backbone(images))
        return {
            "neck_features": levels,
            "mask_features": mask_features,
            "fusion_weights": self.neck.fusion_weights(),
        }

    def forward_head(self, feats: dict[str, Any]) -> dict[str, Any]:
        """``feats`` from :meth:`forward_features` -> ``pred_logits [B, Q, K+1]``,
        ``pred_masks [B, Q, H/r, W/r]``, ``pred_iou [B, Q]``, ``aux_outputs``."""
        return self.head(feats["mask_features"])

    def forward(self, images: Tensor) -> dict[str, Any]:
        """Both of the above merged into one dict."""
        feats = self.forward_features(images)
        return {**feats, **self.forward_head(feats)}

    def export(self) -> "RegSAMStudent":
        """A frozen eval-mode copy for inference (the student holds no training-only modules)."""
        exported = copy.deepcopy(self).eval()
        for param in exported.parameters():
            param.requires_grad_(False)
        return exported


def build_student(model_cfg: Any, num_classes: int) -> RegSAMStudent:
    """Build the student from ``cfg.model`` (any object with the attributes below).

    Reads ``backbone.{name, pretrained_path, freeze_bn}``, ``neck.{channels, mask_stride,
    use_coord, separable}`` (``separable`` absent = false), ``use_learnable_fusion``,
    ``head.{num_queries, num_stages, ffn_dim, num_mask_fcs, kernel_size}``. The kernel dimension
    is the neck width.
    """
    bb, nk, hd = model_cfg.backbone, model_cfg.neck, model_cfg.head
    backbone = TimmBackbone(
        name=bb.name, pretrained_path=bb.pretrained_path, freeze_bn=bb.freeze_bn
    )
    neck = FPNNeck(
        in_channels=backbone.out_channels,
        strides=backbone.strides,
        channels=nk.channels,
        mask_stride=nk.mask_stride,
        use_coord=nk.use_coord,
        use_learnable_fusion=model_cfg.use_learnable_fusion,
        separable=getattr(nk, "separable", False),
    )
    head = KernelHead(
        num_classes=num_classes,
        dim=nk.channels,
        num_queries=hd.num_queries,
        num_stages=hd.num_stages,
        ffn_dim=hd.ffn_dim,
        num_mask_fcs=hd.num_mask_fcs,
        kernel_size=hd.kernel_size,
    )
    return RegSAMStudent(backbone=backbone, neck=neck, head=head)
