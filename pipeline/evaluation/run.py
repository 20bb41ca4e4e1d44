"""Evaluate or run a trained student from its exported ``final.pth`` (or ``best.pth``).

The exported file holds the student's state dict, its resolved config and its categories
(:mod:`pipeline.export`), so prediction needs nothing but the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.data.transforms import EvalTransform
from pipeline.device import resolve_device
from pipeline.evaluation.evaluate import evaluate_model
from pipeline.evaluation.predict import predict_folder
from pipeline.export import load_exported_student
from pipeline.models.student import RegSAMStudent

log = logging.getLogger(__name__)


def load_student(
    path: Path, device: torch.device | str = "cpu"
) -> tuple[RegSAMStudent, Config, list]:
    """(student in eval mode, its training config, categories as namespaces) from ``final.pth``."""
    exported = load_exported_student(path, device)
    return exported.student, exported.config, exported.categories


def val_dataset(cfg: Config) -> PanopticDataset:
    """``cfg``'s val split as the evaluation sees it (eval resize + pad, no augmentation)."""
    image_dir, json_path, png_dir = cfg.split_paths("val")
    return PanopticDataset(
        image_dir,
        json_path,
        png_dir,
        transform=EvalTransform(cfg.data.test_size, cfg.data.size_divisibility),
        on_bad_sample=cfg.data.on_bad_sample,
        seed=cfg.seed,
        require_segments=False,
    )


def evaluate_checkpoint(
    cfg: Config, checkpoint: Path, out_dir: Path, max_images: int | None = None
) -> dict[str, Any]:
    """PQ/SQ/RQ, AP and mIoU of ``checkpoint`` on ``cfg``'s val split, written to
    ``out_dir/metrics.json`` (whose ``settings.checkpoint`` names the file evaluated)."""
    device = resolve_device(cfg.training.device)
    student, _, _ = load_student(checkpoint, device)
    dataset = val_dataset(cfg)
    ev = cfg.evaluation
    return evaluate_model(
        student,
        dataset,
        dataset.categories,
        device,
        out_dir=out_dir,
        max_images=max_images or ev.max_images,
        object_mask_threshold=ev.object_mask_threshold,
        overlap_threshold=ev.overlap_threshold,
        write_predictions=True,
        num_visualize=ev.num_visualize,
        num_workers=min(2, cfg.data.num_workers),
        instance_topk=ev.instance_topk,
        extra_settings={"checkpoint": str(checkpoint)},
    )


def predict_checkpoint(
    checkpoint: Path,
    image_dir: Path,
    out_dir: Path,
    device: str = "auto",
    test_size: int | None = None,
):
    """Panoptic PNG + JSON + overlays for every image of ``image_dir``."""
    dev = resolve_device(device)
    student, cfg, categories = load_student(checkpoint, dev)
    ev = cfg.evaluation
    return predict_folder(
        student,
        image_dir,
        out_dir,
        categories,
        test_size=test_size or cfg.data.test_size,
        device=dev,
        size_divisibility=cfg.data.size_divisibility,
        object_mask_threshold=ev.object_mask_threshold,
        overlap_threshold=ev.overlap_threshold,
    )
