"""RAP-SAM-style mask head: learnable kernels refined by pooling-based dynamic convolution.

No attention anywhere: queries read the image through mask pooling (a sigmoid-mask weighted
average of the mask features) and talk to each other through a dynamic separable convolution
whose weights are generated per query (a depthwise conv along the channel axis followed by a
pointwise mix across queries), as in YOSO / RAP-SAM.

Stage 0 is the proposal stage: the learned kernels give the first masks directly. Each of the
``num_stages`` refinement stages then pools, mixes and updates the kernels and predicts class
logits, masks and a mask-IoU score. All ``num_stages + 1`` predictions are supervised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "mask_pool",
    "kernel_masks",
    "DynamicSeparableConv",
    "FFN",
    "MaskEmbedding",
    "ClassIoUPredictor",
    "KernelUpdateStage",
    "KernelHead",
]


def mask_pool(mask_logits: Tensor, features: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft masked average pooling.

    Arguments:
        mask_logits: ``[B, Q, H, W]``.
        features: ``[B, C, H, W]``.

    Returns:
        ``[B, Q, C]``: ``sum_hw sigmoid(m) * f / (sum_hw sigmoid(m) + eps)``.
    """
    weights = mask_logits.sigmoid()
    # einsum("bqhw,bchw->bqc") written as one batched matmul over flattened pixels: the same
    # bmm on CPU (bit-identical values and gradients, tests/test_deploy_fold.py), and a plain
    # MatMul in the exported graph (onnxruntime's Einsum is several times slower)
    pooled = torch.matmul(weights.flatten(2), features.flatten(2).transpose(1, 2))
    return pooled / (weights.sum(dim=(2, 3)).unsqueeze(-1) + eps)


def kernel_masks(kernels: Tensor, features: Tensor) -> Tensor:
    """Mask logits as the dot product of each kernel with every pixel's feature.

    Arguments:
        kernels: ``[B, Q, C]``.
        features: ``[B, C, H, W]``.

    Returns:
        ``[B, Q, H, W]`` (``einsum("bqc,bchw->bqhw")`` as one batched matmul, see
        :func:`mask_pool`).
    """
    return torch.matmul(kernels, features.flatten(2)).unflatten(2, features.shape[-2:])


class DynamicSeparableConv(nn.Module):
    """Pooling-based dynamic separable convolution across queries (YOSO's replacement for
    attention).

    From each ``query`` token a linear layer generates a 1-D depthwise kernel of size
    ``kernel_size`` (slid over the channel axis of that query's ``value``) and one row of a
    ``[Q, Q]`` pointwise matrix that mixes the queries (scaled by ``Q ** -0.5`` so its output does
    not grow with the number of queries). Cost is linear in the channel count and there is no
    softmax: nothing normalises over tokens.
    """

    def __init__(self, *, dim: int, num_queries: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.num_queries = num_queries
        self.kernel_size = kernel_size
        self.weight_generator = nn.Linear(dim, num_queries + kernel_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, value: Tensor) -> Tensor:
        """
        Arguments:
            query: ``[B, Q, C]`` tokens that generate the weights.
            value: ``[B, Q, C]`` tokens that are convolved.

        Returns:
            ``[B, Q, C]``.
        """
        batch, num_queries, dim = value.shape
        if num_queries != self.num_queries:
            raise ValueError(
                f"DynamicSeparableConv built for {self.num_queries} queries, got {num_queries}"
            )
        weights = self.weight_generator(query)
        pointwise = weights[..., :num_queries] * num_queries**-0.5  # [B, Q, Q]
        depthwise = weights[..., num_queries:]  # [B, Q, k]
        out = F.conv1d(
            value.reshape(1, batch * num_queries, dim),
            depthwise.reshape(batch * num_queries, 1, self.kernel_size),
            padding=self.kernel_size // 2,
            groups=batch * num_queries,
        )
        out = F.relu(out.reshape(batch, num_queries, dim))
        out = F.relu(torch.bmm(pointwise, out))
        return self.norm(out)


class FFN(nn.Module):
    """Two-layer MLP ``dim -> hidden_dim -> dim`` with ReLU."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[..., dim]`` -> ``[..., dim]``."""
        return self.layers(x)


class MaskEmbedding(nn.Module):
    """Kernel -> mask kernel: ``num_layers`` (Linear, LayerNorm, ReLU) blocks then a Linear."""

    def __init__(self, *, dim: int, num_layers: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(dim, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, kernels: Tensor) -> Tensor:
        """``[B, Q, C]`` -> ``[B, Q, C]``."""
        return self.layers(kernels)


class ClassIoUPredictor(nn.Module):
    """Kernel -> class logits ``[B, Q, K + 1]`` (last = no object) and IoU score ``[B, Q]``
    in (0, 1)."""

    def __init__(self, *, dim: int, num_classes: int) -> None:
        super().__init__()
        self.cls_branch = nn.Sequential(
            nn.Linear(dim, dim, bias=False),
            nn.LayerNorm(dim),
            nn.ReLU(inplace=True),
            nn.Linear(dim, num_classes + 1),
        )
        self.iou_branch = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1)
        )

    def forward(self, kernels: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_branch(kernels), self.iou_branch(kernels).squeeze(-1).sigmoid()


class KernelUpdateStage(nn.Module):
    """One refinement stage.

    ``pooled = mask_pool(masks, features)``; kernels read the pooled features through a dynamic
    separable conv generated by the kernels, then mix among themselves through a second one, then
    an FFN; each step is residual with a LayerNorm. The new kernels predict classes, IoU and a
    mask kernel, whose dot product with the features gives the new mask logits.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_queries: int,
        num_classes: int,
        ffn_dim: int,
        num_mask_fcs: int = 1,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.pool_norm = nn.LayerNorm(dim)
        self.feature_conv = DynamicSeparableConv(
            dim=dim, num_queries=num_queries, kernel_size=kernel_size
        )
        self.norm1 = nn.LayerNorm(dim)
        self.query_conv = DynamicSeparableConv(
            dim=dim, num_queries=num_queries, kernel_size=kernel_size
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FFN(dim=dim, hidden_dim=ffn_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.predictor = ClassIoUPredictor(dim=dim, num_classes=num_classes)
        self.mask_embed = MaskEmbedding(dim=dim, num_layers=num_mask_fcs)

    def forward(
        self, kernels: Tensor, mask_logits: Tensor, features: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """
        Arguments:
            kernels: ``[B, Q, C]``; mask_logits: ``[B, Q, H, W]``; features: ``[B, C, H, W]``.

        Returns:
            updated kernels ``[B, Q, C]`` and the stage prediction dict (``pred_logits``
            ``[B, Q, K + 1]``, ``pred_masks`` ``[B, Q, H, W]``, ``pred_iou`` ``[B, Q]``).
        """
        pooled = self.pool_norm(mask_pool(mask_logits, features))
        kernels = self.norm1(kernels + self.feature_conv(kernels, pooled))
        kernels = self.norm2(kernels + self.query_conv(kernels, kernels))
        kernels = self.norm3(kernels + self.ffn(kernels))
        logits, iou = self.predictor(kernels)
        masks = kernel_masks(self.mask_embed(kernels), features)
        return kernels, {"pred_logits": logits, "pred_masks": masks, "pred_iou": iou}


class KernelHead(nn.Module):
    """``num_queries`` learnable kernels refined over ``num_stages`` stages.

    Stage 0: ``masks = kernels . features``; class and IoU come from
    ``LayerNorm(kernels + mask_pool(masks, features))``, which also seeds stage 1.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        dim: int = 128,
        num_queries: int = 100,
        num_stages: int = 3,
        ffn_dim: int = 512,
        num_mask_fcs: int = 1,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_queries < 1 or num_stages < 1:
            raise ValueError(
                f"num_classes ({num_classes}), num_queries ({num_queries}) and "
                f"num_stages ({num_stages}) must be >= 1"
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_stages = num_stages
        self.dim = dim
        self.kernels = nn.Embedding(num_queries, dim)
        self.proposal_norm = nn.LayerNorm(dim)
        self.proposal_predictor = ClassIoUPredictor(dim=dim, num_classes=num_classes)
        self.stages = nn.ModuleList(
            KernelUpdateStage(
                dim=dim,
                num_queries=num_queries,
                num_classes=num_classes,
                ffn_dim=ffn_dim,
                num_mask_fcs=num_mask_fcs,
                kernel_size=kernel_size,
            )
            for _ in range(num_stages)
        )
        nn.init.normal_(self.kernels.weight, std=dim**-0.5)

    def forward(self, mask_features: Tensor) -> dict[str, Any]:
        """
        Arguments:
            mask_features: ``[B, C, H, W]`` with ``C == dim``.

        Returns:
            ``pred_logits [B, Q, K + 1]``, ``pred_masks [B, Q, H, W]``, ``pred_iou [B, Q]`` of
            the last stage and ``aux_outputs``: the same three keys for stages 0..S-1.
        """
        if mask_features.ndim != 4 or mask_features.shape[1] != self.dim:
            raise ValueError(
                f"KernelHead expects mask features [B, {self.dim}, H, W], "
                f"got {tuple(mask_features.shape)}"
            )
        batch = mask_features.shape[0]
        kernels = self.kernels.weight.unsqueeze(0).expand(batch, -1, -1)
        masks = kernel_masks(kernels, mask_features)
        kernels = self.proposal_norm(kernels + mask_pool(masks, mask_features))
        logits, iou = self.proposal_predictor(kernels)
        predictions = [{"pred_logits": logits, "pred_masks": masks, "pred_iou": iou}]
        for stage in self.stages:
            kernels, prediction = stage(kernels, predictions[-1]["pred_masks"], mask_features)
            predictions.append(prediction)
        return {**predictions[-1], "aux_outputs": predictions[:-1]}
