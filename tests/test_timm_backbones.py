"""Any timm backbone with features_only at strides 4-32: a short train + evaluate with ResNet and
MobileNetV3 (random weights), and the student's own normalisation, bit-identical to
``normalize_images`` for the default RegNet config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.transforms import normalize_images
from pipeline.evaluation.run import evaluate_checkpoint, load_student
from pipeline.models.student import build_student
from pipeline.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_normalisation_is_bit_identical_to_normalize_images():
    cfg = load_config(ROOT / "configs/reg_sam/regnet_distill.yaml")
    assert cfg.model.backbone.name.startswith("regnet")
    student = build_student(cfg.model, num_classes=5)
    images = torch.randint(
        0, 256, (2, 3, 33, 47), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(student.normalize(images), normalize_images(images))
    assert torch.equal(student.normalize(images.float()), normalize_images(images.float()))
    # buffers are derived, not stored: final.pth files keep their keys
    assert not any(k.startswith("pixel_") for k in student.state_dict())


def test_mean_std_follow_the_backbone_pretrained_config():
    cfg = load_config(
        ROOT / "configs/reg_sam/baseline.yaml",
        ["model.backbone.name=inception_v3", "model.neck.channels=16"],
    )
    student = build_student(cfg.model, num_classes=3)
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    # timm's inception_v3 config: mean = std = 0.5 -> 255 maps to (1 - 0.5) / 0.5 = 1
    assert torch.allclose(student.normalize(white), torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_050"])
def test_non_regnet_backbone_trains_and_evaluates(tmp_path, data_root, backbone):
    overrides = {
        "model.backbone.name": backbone,
        "data.root": str(data_root),
        "data.crop_size": "[64, 64]",
        "data.test_size": 64,
        "data.num_workers": 0,
        "model.neck.channels": 16,
        "model.head.num_queries": 4,
        "model.head.num_stages": 1,
        "model.head.ffn_dim": 32,
        "model.loss.num_points": 128,
        "training.batch_size": 2,
        "training.max_iters": 3,
        "training.warmup_iters": 1,
        "training.checkpoint_interval": 3,
        "training.log_interval": 1,
        "training.num_threads": 1,
    }
    cfg = load_config(
        ROOT / "configs/reg_sam/baseline.yaml", [f"{k}={v}" for k, v in overrides.items()]
    )
    work = tmp_path / backbone
    Trainer(cfg, work, progress=False).train()
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    student, saved_cfg, _ = load_student(work / "final.pth")
    assert saved_cfg.model.backbone.name == backbone
    assert type(student.backbone.body).__module__.startswith("timm")
    metrics = evaluate_checkpoint(cfg, work / "final.pth", tmp_path / "eval")
    assert {"All", "Things", "Stuff"} <= set(metrics)
    assert 0.0 <= metrics["All"]["pq"] <= 100.0
