"""Evaluate or run a trained student from its exported ``final.pth``.

``final.pth`` (written by the trainer) holds the student's state dict, its resolved config and
its categories, so prediction needs nothing but the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline.config import Config, load_config_dict
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.data.transforms import EvalTransform
from pipeline.evaluation.evaluate import evaluate_model
from pipeline.evaluation.predict import predict_folder
from pipeline.models.student import RegSAMStudent, build_student
from pipeline.training.checkpoint import StudentFileError, load_student_weights
from pipeline.training.trainer import resolve_device

log = logging.getLogger(__name__)


def student_from_training_checkpoint(blob: dict[str, Any], path: Path) -> dict[str, Any]:
    """The ``final.pth`` entries (student, config, categories) of a training checkpoint."""
    if "categories" not in blob:
        raise StudentFileError(f"{path} is a training checkpoint without the categories (written "
                               "by an older version); pass the run's final.pth, or resume the run "
                               "once to rewrite its checkpoint")
    prefix = "student."
    student = {k[len(prefix):]: v for k, v in blob["model"].items() if k.startswith(prefix)}
    log.info("using the student of training checkpoint %s (iteration %s)", path,
             blob.get("iteration"))
    return {"student": student, "config": json.dumps(blob["config"]),
            "categories": json.dumps(blob["categories"])}


def load_student(path: Path, device: torch.device | str = "cpu") -> tuple[RegSAMStudent, Config, list]:
    """(student in eval mode, its training config, categories as namespaces) from a run's
    ``final.pth`` or from a training checkpoint (``checkpoints/last.pth``)."""
    blob = load_student_weights(path)
    if "student" not in blob and "model" in blob and "iteration" in blob:
        blob = student_from_training_checkpoint(blob, path)
    for key in ("student", "config", "categories"):
        if key not in blob:
            raise StudentFileError(f"{path} is not an exported RegSAM student (no '{key}' entry); "
                                   "pass the run's final.pth")
    cfg = load_config_dict(json.loads(blob["config"]), source=f"{path} (embedded config)")
    categories = [SimpleNamespace(**c) for c in json.loads(blob["categories"])]
    student = build_student(cfg.model, len(categories))
    student.load_state_dict(blob["student"])
    return student.to(device).eval(), cfg, categories


def evaluate_checkpoint(cfg: Config, checkpoint: Path, out_dir: Path,
                        max_images: int | None = None) -> dict[str, Any]:
    """PQ/SQ/RQ of ``checkpoint`` on ``cfg``'s val split, written to ``out_dir/metrics.json``."""
    device = resolve_device(cfg.training.device)
    student, _, _ = load_student(checkpoint, device)
    image_dir, json_path, png_dir = cfg.split_paths("val")
    dataset = PanopticDataset(image_dir, json_path, png_dir,
                              transform=EvalTransform(cfg.data.test_size, cfg.data.size_divisibility),
                              on_bad_sample=cfg.data.on_bad_sample, seed=cfg.seed,
                              require_segments=False)
    ev = cfg.evaluation
    return evaluate_model(student, dataset, dataset.categories, device, out_dir=out_dir,
                          max_images=max_images or ev.max_images,
                          object_mask_threshold=ev.object_mask_threshold,
                          overlap_threshold=ev.overlap_threshold, write_predictions=True,
                          num_visualize=ev.num_visualize, num_workers=min(2, cfg.data.num_workers))


def predict_checkpoint(checkpoint: Path, image_dir: Path, out_dir: Path, device: str = "auto",
                       test_size: int | None = None):
    """Panoptic PNG + JSON + overlays for every image of ``image_dir``."""
    dev = resolve_device(device)
    student, cfg, categories = load_student(checkpoint, dev)
    ev = cfg.evaluation
    return predict_folder(student, image_dir, out_dir, categories,
                          test_size=test_size or cfg.data.test_size, device=dev,
                          size_divisibility=cfg.data.size_divisibility,
                          object_mask_threshold=ev.object_mask_threshold,
                          overlap_threshold=ev.overlap_threshold)
