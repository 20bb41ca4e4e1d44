"""timm feature extractor (any model with ``features_only``) giving stride 4/8/16/32 maps.

RegNet (``regnetx_002`` ... ``regnetx_016``, ``regnety_*``) is the design's choice and the
default; any timm model whose ``features_only`` variant gives maps at strides 4, 8, 16 and 32
works (ResNet, MobileNetV3, EfficientNet, ConvNeXt, ...). The backbone also carries the input
normalisation of its timm pretrained config (mean/std), which the student applies inside itself.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

__all__ = ["TimmBackbone", "RegNetBackbone", "REQUIRED_STRIDES", "pretrained_mean_std"]

REQUIRED_STRIDES = (4, 8, 16, 32)


def pretrained_mean_std(
    body: nn.Module, name: str
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """RGB ``(mean, std)`` in [0, 1] units from the timm pretrained config of ``body``/``name``.

    Falls back to timm's ImageNet defaults when the model has no pretrained config.
    """
    cfg = getattr(body, "pretrained_cfg", None) or timm.get_pretrained_cfg(name) or {}
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict()
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(
            f"model.backbone.name: timm model {name!r} has a pretrained config with "
            f"mean {mean} and std {std}; the student needs 3-channel RGB values"
        )
    return mean, std  # type: ignore[return-value]


def _check_checkpoint_fits(body: nn.Module, path: Path, name: str) -> None:
    """Raise ValueError unless the checkpoint holds every trunk tensor of ``body`` with its shape.

    timm loads feature backbones non-strictly, so a checkpoint of another RegNet (e.g. regnety
    weights for a regnetx model) would otherwise load partially without an error. Extra keys are
    accepted only under top-level modules the feature model does not keep (the classifier).
    """
    state = timm.models.load_state_dict(str(path), weights_only=True)  # never runs pickled code
    expected = body.state_dict()
    kept = {key.split(".")[0] for key in expected}
    missing = [k for k in expected if k not in state]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    unexpected = [k for k in state if k not in expected and k.split(".")[0] in kept]
    if missing or mismatched or unexpected:
        raise ValueError(
            f"model.backbone.pretrained_path: {path} does not hold weights of the timm model "
            f"{name!r}: {len(missing)} missing (e.g. {missing[:3]}), {len(mismatched)} with another "
            f"shape (e.g. {mismatched[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


class TimmBackbone(nn.Module):
    """A timm model with ``features_only=True`` at strides 4, 8, 16, 32.

    ImageNet weights are read only from a local file in timm's official layout (the state dict
    of the classification model, optionally under a ``state_dict``/``model`` key), through timm's
    own ``pretrained_cfg_overlay=dict(file=...)`` mechanism; nothing is fetched from a hub.

    With ``freeze_bn=True`` every BatchNorm keeps its running statistics and affine parameters:
    the affine parameters get ``requires_grad=False`` and the BatchNorm modules stay in eval mode
    when ``.train()`` is called. The state dict has the same keys either way.

    ``pixel_mean`` / ``pixel_std`` (RGB, [0, 1] units) are the model's timm pretrained config.
    """

    def __init__(
        self,
        *,
        name: str = "regnetx_002",
        pretrained_path: str | Path | None = None,
        freeze_bn: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        """
        Arguments:
            name: timm model name, e.g. ``regnetx_002`` .. ``regnetx_016``, ``regnety_*``,
                ``resnet18``, ``mobilenetv3_large_100``, ``efficientnet_b0``.
            pretrained_path: local checkpoint of the timm classification model ``name``, or None
                for random initialisation.
            freeze_bn: freeze BatchNorm statistics and affine parameters.
            out_indices: timm feature indices; (1, 2, 3, 4) gives strides 4, 8, 16, 32 for
                RegNet, ResNet, MobileNet and EfficientNet.
        """
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(
                f"model.backbone.name: {name!r} is not a timm model (e.g. "
                "regnetx_002, resnet18, mobilenetv3_large_100, efficientnet_b0)"
            )
        kwargs: dict = {}
        if pretrained_path is not None:
            path = Path(pretrained_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"model.backbone.pretrained_path: no checkpoint file at {path}"
                )
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        try:
            self.body = timm.create_model(
                name, features_only=True, out_indices=tuple(out_indices), **kwargs
            )
        except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as exc:
            if pretrained_path is None:
                raise ValueError(
                    f"model.backbone.name: timm cannot build {name!r} with "
                    f"features_only=True, out_indices={tuple(out_indices)}: "
                    f"{exc}"
                ) from exc
            raise ValueError(
                f"model.backbone.pretrained_path: {pretrained_path} does not hold weights of the "
                f"timm model {name!r} (wrong architecture or not a state dict): {exc}"
            ) from exc
        strides = list(self.body.feature_info.reduction())
        if tuple(strides) != REQUIRED_STRIDES:
            raise ValueError(
                f"model.backbone.name: timm model {name!r} gives features at strides "
                f"{strides}; the student needs {list(REQUIRED_STRIDES)} (a "
                "convolutional backbone such as regnetx_002, resnet18, "
                "mobilenetv3_large_100, efficientnet_b0)"
            )
        if pretrained_path is not None:
            _check_checkpoint_fits(self.body, Path(pretrained_path), name)
        self.name = name
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.strides: list[int] = strides
        self.pixel_mean, self.pixel_std = pretrained_mean_std(self.body, name)
        self.freeze_bn = freeze_bn
        if freeze_bn:
            for module in self._batch_norms():
                for param in module.parameters():
                    param.requires_grad_(False)
                module.eval()

    def _batch_norms(self) -> list[nn.modules.batchnorm._BatchNorm]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> "TimmBackbone":
        super().train(mode)
        if self.freeze_bn:
            for module in self._batch_norms():
                module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """
        Arguments:
            images: float ``[B, 3, H, W]``, normalised with ``pixel_mean`` / ``pixel_std``.

        Returns:
            one ``[B, out_channels[i], H / strides[i], W / strides[i]]`` map per out index.
        """
        return self.body(images)


RegNetBackbone = TimmBackbone  # the design's name; any timm features_only model is accepted
