"""RegSAMStudent: output contract of docs/architecture.md, build from config, no attention."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pipeline.models.student import RegSAMStudent, build_student


def tiny_cfg(
    name: str = "regnetx_002",
    mask_stride: int = 4,
    learnable: bool = True,
    channels: int = 32,
    queries: int = 6,
    stages: int = 2,
) -> SimpleNamespace:
    return SimpleNamespace(
        backbone=SimpleNamespace(name=name, pretrained_path=None, freeze_bn=False),
        neck=SimpleNamespace(channels=channels, mask_stride=mask_stride, use_coord=True),
        use_learnable_fusion=learnable,
        head=SimpleNamespace(
            num_queries=queries, num_stages=stages, ffn_dim=64, num_mask_fcs=1, kernel_size=3
        ),
    )


@pytest.mark.parametrize("name", ["regnetx_002", "regnety_002"])
@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
@pytest.mark.parametrize("mask_stride", [4, 8])
def test_output_contract(name: str, size: tuple[int, int], mask_stride: int) -> None:
    student = build_student(tiny_cfg(name, mask_stride), num_classes=5).eval()
    height, width = size
    with torch.no_grad():
        out = student(torch.randn(2, 3, height, width))
    assert [tuple(f.shape) for f in out["neck_features"]] == [
        (2, 32, height // s, width // s) for s in (4, 8, 16, 32)
    ]
    r = mask_stride
    assert out["mask_features"].shape == (2, 32, height // r, width // r)
    assert out["fusion_weights"].shape == (4,)
    assert out["pred_logits"].shape == (2, 6, 6)
    assert out["pred_masks"].shape == (2, 6, height // r, width // r)
    assert out["pred_iou"].shape == (2, 6)
    assert len(out["aux_outputs"]) == 2
    assert set(out) == {
        "neck_features",
        "mask_features",
        "fusion_weights",
        "pred_logits",
        "pred_masks",
        "pred_iou",
        "aux_outputs",
    }


def test_forward_equals_features_then_head() -> None:
    student = build_student(tiny_cfg(), num_classes=3).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        merged = student(images)
        head = student.forward_head(student.forward_features(images))
    for key in ("pred_logits", "pred_masks", "pred_iou"):
        assert torch.equal(merged[key], head[key])


def test_plain_average_reports_no_weights() -> None:
    student = build_student(tiny_cfg(learnable=False), num_classes=3).eval()
    with torch.no_grad():
        assert student.forward_features(torch.randn(1, 3, 64, 64))["fusion_weights"] is None


def test_bad_images_are_rejected() -> None:
    student = build_student(tiny_cfg(), num_classes=3)
    with pytest.raises(ValueError, match=r"float \[B, 3, H, W\]"):
        student(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_sizes_not_divisible_by_32_give_ceil_rounded_levels() -> None:
    """80x112 (the low-resolution path of a 160x224 crop) needs no padding."""
    student = build_student(tiny_cfg(), num_classes=3).eval()
    with torch.no_grad():
        feats = student.forward_features(torch.randn(1, 3, 80, 112))
    assert [tuple(f.shape[-2:]) for f in feats["neck_features"]] == [
        (20, 28),
        (10, 14),
        (5, 7),
        (3, 4),
    ]
    assert tuple(feats["mask_features"].shape[-2:]) == (20, 28)


def test_builds_from_the_pydantic_config() -> None:
    from pipeline.config import ModelConfig

    cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": "regnety_002"},
            "neck": {"channels": 16, "mask_stride": 8},
            "head": {"num_queries": 5, "num_stages": 1, "ffn_dim": 32},
            "use_learnable_fusion": False,
        }
    )
    student = build_student(cfg, num_classes=4)
    assert student.backbone.name == "regnety_002"
    assert student.neck_channels == [16, 16, 16, 16] and student.mask_channels == 16
    assert student.mask_stride == 8 and student.strides == [4, 8, 16, 32]
    assert student.neck.fusion_weights() is None
    assert student.head.num_queries == 5 and len(student.head.stages) == 1
    assert student.num_classes == 4


def test_export_holds_only_the_inference_modules() -> None:
    student = build_student(tiny_cfg(), num_classes=3)
    exported = student.export()
    assert isinstance(exported, RegSAMStudent)
    assert [name for name, _ in exported.named_children()] == ["backbone", "neck", "head"]
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    assert all(k.split(".")[0] in {"backbone", "neck", "head"} for k in exported.state_dict())
    assert student.training  # the original is untouched
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(exported(images)["pred_masks"], student.eval()(images)["pred_masks"])


class _RecordCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["regnetx_002", "regnety_002"])
def test_no_attention_anywhere(name: str) -> None:
    student = build_student(tiny_cfg(name), num_classes=3).eval()
    for module_name, module in student.named_modules():
        kind = type(module).__name__.lower()
        assert not isinstance(
            module, (torch.nn.MultiheadAttention, torch.nn.Softmax, torch.nn.Transformer)
        ), module_name
        assert "attention" not in kind and "attn" not in kind, module_name
    recorder = _RecordCalls()
    with torch.no_grad(), recorder:
        student(torch.randn(1, 3, 64, 64))
    assert "einsum" in recorder.names  # the recorder does see the head's calls
    forbidden = {
        "softmax",
        "log_softmax",
        "scaled_dot_product_attention",
        "multi_head_attention_forward",
        "_softmax",
    }
    assert not forbidden & recorder.names


def test_pydantic_neck_separable_reaches_the_neck() -> None:
    from pipeline.config import ModelConfig

    cfg = ModelConfig.model_validate({"neck": {"channels": 16}})
    assert cfg.neck.separable is False  # the default: existing checkpoints load
    assert not build_student(cfg, num_classes=2).neck.separable
    cfg = ModelConfig.model_validate({"neck": {"channels": 16, "separable": True}})
    assert build_student(cfg, num_classes=2).neck.separable
    with pytest.raises(ValueError, match="separable"):
        ModelConfig.model_validate({"neck": {"separable": "maybe"}})


@pytest.mark.parametrize(
    "dense_config, separable_config, saved",
    [
        # COCO student: neck 128 -> the hand count of tests/test_models_neck.py
        (
            "configs/coco/regnet_distill.yaml",
            "configs/coco/regnet_distill_fast.yaml",
            7_795_200_000,
        ),
        # default student: neck 64
        ("configs/reg_sam/regnet_distill.yaml", None, 1_944_396_800),
    ],
)
def test_separable_student_macs_at_640_differ_by_the_neck_only(
    dense_config: str, separable_config: str | None, saved: int
) -> None:
    """The whole student at 640x640: separable saves exactly the hand-counted MACs of the
    changed neck convs (backbone and head untouched), and the fast COCO config differs from
    the COCO recipe in nothing but the neck (and its experiment name)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import load_config

    root = Path(__file__).resolve().parents[1]
    no_weights = ["model.backbone.pretrained_path=null"]
    dense_cfg = load_config(root / dense_config, no_weights)
    if separable_config is None:
        sep_cfg = load_config(root / dense_config, no_weights + ["model.neck.separable=true"])
    else:
        sep_cfg = load_config(root / separable_config, no_weights)
        a, b = dense_cfg.to_dict(), sep_cfg.to_dict()
        assert b["model"]["neck"] == {**a["model"]["neck"], "separable": True}
        b["model"]["neck"]["separable"] = False
        b["experiment"] = a["experiment"]
        assert a == b

    def macs(cfg) -> int:
        torch.manual_seed(0)
        student = build_student(cfg.model, num_classes=133).eval()
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            student(torch.randn(1, 3, 640, 640))
        return counter.get_total_flops() // 2

    assert not dense_cfg.model.neck.separable and sep_cfg.model.neck.separable
    assert macs(dense_cfg) - macs(sep_cfg) == saved
