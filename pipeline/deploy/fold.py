"""The student's inference form: exact rewrites applied to a copy of the model before export.

Each function changes how the eval-mode model computes, never what it computes (up to float
rounding; ``tests/test_deploy_fold.py`` checks every one against the unchanged model):

* :func:`fold_batchnorm`: an eval-mode BatchNorm that directly follows a convolution becomes
  part of that convolution's weight and bias;
* :func:`fold_fusion_weights`: the neck's level-fusion weights ``w_l >= 0`` move into the affine
  parameters of each level's last normalisation (``w * relu(norm(x)) = relu(w * norm(x))``, and
  resizing is linear), so the fusion becomes a plain sum of the resized levels;
* :func:`split_coord_conv`: the mask conv over ``[features, x, y]`` (``C + 2`` channels) becomes
  a conv over the ``C`` feature channels plus a conv over the two coordinate channels, so the
  large conv keeps a channel count that onnxruntime's blocked (NCHWc) kernels accept and the
  ``C + 2``-channel concatenation is never materialised.

With the head's einsums written as matmuls, the last two made the exported default student
1.19x faster in onnxruntime at 640x640 on 2 threads, the COCO student 1.09x
(``benchmarks/bench_onnx.py``; README, Benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.neck import (
    ConvNormAct,
    CoordChannels,
    FPNNeck,
    SeparableConvNormAct,
    coord_channels,
)

__all__ = [
    "fold_batchnorm",
    "fold_fusion_weights",
    "split_coord_conv",
    "inference_form",
    "SumFusion",
    "CoordSplitConv2d",
]


def _conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) pairs where the BatchNorm's input is the conv's output tensor,
    found by running ``model`` once on ``example`` with forward hooks."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    keep_alive: list[Tensor] = []  # holds outputs so their ids stay unique during the pass
    pairs: list[tuple[str, str]] = []

    def conv_hook(module, _inputs, output):
        keep_alive.append(output)
        produced[id(output)] = names[module]

    def bn_hook(module, inputs, _output):
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs.append((conv, names[module]))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_hook(bn_hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(pairs))


def _bn_activation(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a BatchNorm once folded: timm's ``BatchNormAct2d`` keeps its drop + act."""
    parts = [
        getattr(bn, attr)
        for attr in ("drop", "act")
        if isinstance(getattr(bn, attr, None), nn.Module)
    ]
    parts = [p for p in parts if not isinstance(p, nn.Identity)]
    return nn.Sequential(*parts) if parts else nn.Identity()


def fold_batchnorm(model: nn.Module, example: Tensor) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into that conv, in place.

    ``conv' = conv * g / sqrt(var + eps)``, ``bias' = (bias - mean) * g / sqrt(var + eps) + b``;
    the BatchNorm module is replaced by its activation (timm ``BatchNormAct2d``) or an identity.
    A conv whose output feeds something besides its BatchNorm is never folded (its pairs are
    found by tensor identity on a forward pass of ``example``).

    Returns:
        the number of BatchNorms folded.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (running statistics)")
    pairs = _conv_bn_pairs(model, example)
    uses: dict[str, int] = {}
    for conv_name, _ in pairs:
        uses[conv_name] = uses.get(conv_name, 0) + 1
    folded = 0
    for conv_name, bn_name in pairs:
        if uses[conv_name] != 1:
            continue
        conv: nn.Conv2d = model.get_submodule(conv_name)
        bn: nn.BatchNorm2d = model.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_var is None:
            continue
        with torch.no_grad():
            scale = (
                bn.weight / torch.sqrt(bn.running_var + bn.eps)
                if bn.affine
                else 1.0 / torch.sqrt(bn.running_var + bn.eps)
            )
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            new_bias = (bias - bn.running_mean) * scale + shift
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias, requires_grad=False)
            else:
                conv.bias.copy_(new_bias)
        parent_name, _, attr = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _bn_activation(bn))
        folded += 1
    return folded


class SumFusion(nn.Module):
    """Plain sum of same-size maps (the fusion once its weights are folded into the levels)."""

    def __init__(self, *, num_levels: int) -> None:
        super().__init__()
        self.num_levels = num_levels

    def forward(self, maps: list[Tensor]) -> Tensor:
        """``maps``: L tensors ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        if len(maps) != self.num_levels:
            raise ValueError(f"SumFusion expects {self.num_levels} maps, got {len(maps)}")
        out = maps[0]
        for m in maps[1:]:
            out = out + m
        return out

    def weights(self) -> None:
        """The folded fusion has no weights of its own (see :func:`fold_fusion_weights`)."""
        return None


def _last_affine_norm(block: nn.Module) -> nn.Module | None:
    """The normalisation whose output, through ReLU/identity only, is ``block``'s output."""
    if isinstance(block, ConvNormAct):
        layers = list(block)
    elif isinstance(block, SeparableConvNormAct):
        layers = list(block.pointwise)
    else:
        return None
    norms = [i for i, m in enumerate(layers) if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    if not norms:
        return None
    norm = layers[norms[-1]]
    after = layers[norms[-1] + 1 :]
    if not all(isinstance(m, (nn.ReLU, nn.Identity)) for m in after):
        return None  # only positively homogeneous tails commute with a scale w >= 0
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
        return None
    return norm


def fold_fusion_weights(neck: FPNNeck) -> int:
    """Fold the neck's fusion weights into its level blocks, in place; returns the levels folded.

    Level ``l``'s output block ends in a normalisation and a ReLU; scaling that normalisation's
    weight and bias by ``w_l >= 0`` (the normalised learnable weight, or ``1 / L`` for the plain
    average) scales the level by ``w_l``, and bilinear resizing commutes with the scale, so the
    fusion becomes :class:`SumFusion`. The neck's ``levels`` output changes by those factors:
    only for an inference copy whose sole output is the mask features (:class:`DeployStudent`).
    Returns 0 and changes nothing when a block does not end that way.
    """
    if isinstance(neck.fusion, SumFusion):
        return 0
    num = neck.fusion.num_levels
    w = neck.fusion.weights()
    weights = [1.0 / num] * num if w is None else [float(v) for v in w.detach()]
    norms = [_last_affine_norm(block) for block in neck.output]
    if len(norms) != num or any(n is None for n in norms):
        return 0
    with torch.no_grad():
        for norm, scale in zip(norms, weights):
            norm.weight.mul_(scale)
            norm.bias.mul_(scale)
    neck.fusion = SumFusion(num_levels=num)
    return num


class CoordSplitConv2d(nn.Module):
    """A conv over ``cat([x, coord_channels(x)])`` computed as two convs that are summed.

    ``conv(cat([x, c]), W) = conv(x, W[:, :C]) + conv(c, W[:, C:])``: the big conv runs on the
    ``C`` feature channels alone; the coordinate term is a ``2 -> out`` conv of the (x, y) map.
    ``[B, C, H, W] -> [B, out, H, W]`` (no concatenation of ``C + 2`` channels).
    """

    def __init__(self, *, conv: nn.Conv2d, coord_channels: int = 2) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError("CoordSplitConv2d needs a dense conv (groups=1)")
        if not isinstance(conv.padding, tuple) or conv.padding_mode != "zeros":
            raise ValueError("CoordSplitConv2d needs explicit zero padding")
        c = conv.in_channels - coord_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach()[:, :c].clone(), requires_grad=False)
        self.coord_weight = nn.Parameter(conv.weight.detach()[:, c:].clone(), requires_grad=False)
        self.bias = (
            None
            if conv.bias is None
            else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``[B, C, H, W]`` features (without coordinates) -> ``[B, out, H, W]``."""
        features = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        coords = F.conv2d(
            coord_channels(x), self.coord_weight, None, self.stride, self.padding, self.dilation
        )
        return features + coords


def split_coord_conv(neck: FPNNeck) -> int:
    """Replace the neck's coordinate concat + dense mask conv by :class:`CoordSplitConv2d`,
    in place; returns 1 when done, 0 when there is nothing to split (no coordinates, or the
    separable mask conv, whose depthwise first layer is already per channel)."""
    if not isinstance(neck.coords, CoordChannels) or not isinstance(neck.mask_conv, ConvNormAct):
        return 0
    neck.mask_conv[0] = CoordSplitConv2d(conv=neck.mask_conv[0])
    neck.coords = nn.Identity()
    return 1


def inference_form(student: nn.Module, example: Tensor) -> dict[str, int]:
    """Apply every rewrite above to ``student`` (eval mode, modified in place).

    Arguments:
        student: a :class:`~pipeline.models.student.RegSAMStudent` (its ``neck`` is rewritten
            first, then every BatchNorm is folded).
        example: a normalised ``[1, 3, H, W]`` input (for the BatchNorm pairing pass).

    Returns:
        how many rewrites of each kind were made.
    """
    if student.training:
        raise ValueError("inference_form needs an eval-mode model")
    done = {
        "fusion_levels_folded": fold_fusion_weights(student.neck),
        "coord_convs_split": split_coord_conv(student.neck),
    }
    done["batchnorms_folded"] = fold_batchnorm(student, example)
    return done
