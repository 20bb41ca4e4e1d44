"""The exported student (``final.pth``, ``best.pth``): its format, written and read in one place.

An exported student holds no distillation module and no optimizer state::

    {"student": state dict of RegSAMStudent,
     "config": the resolved training config (JSON string),
     "categories": the categories in train-id order (JSON string)}

so prediction, evaluation and the report need nothing but the file. Files are read with
``torch.load(weights_only=True)``: tensors and plain data only, no pickled code is executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from pipeline.config import Config, ConfigError, load_config_dict
from pipeline.device import resolve_device
from pipeline.models.student import RegSAMStudent, build_student
from pipeline.safe_load import CheckpointReadError, UntrustedCheckpointError, safe_torch_load

__all__ = [
    "EXPORT_KEYS",
    "ExportedStudent",
    "ExportError",
    "StudentFileError",
    "export_blob",
    "load_exported_student",
    "load_student_weights",
    "student_from_training_checkpoint",
]

EXPORT_KEYS = ("student", "config", "categories")


class ExportError(CheckpointReadError, ValueError):
    """A file is not a readable exported student; the message names the file."""


StudentFileError = ExportError  # the name the training and evaluation APIs use


@dataclass
class ExportedStudent:
    """A student loaded from an exported file, in eval mode on ``device``."""

    student: RegSAMStudent
    config: Config
    categories: list[Any]  # namespaces with id, name, isthing, color, train_id
    path: Path


def export_blob(student: torch.nn.Module, cfg: Config, categories: Sequence[Any]) -> dict[str, Any]:
    """The dict that :func:`~pipeline.training.checkpoint.save_atomic` writes as ``final.pth``."""
    return {
        "student": student.state_dict(),
        "config": json.dumps(cfg.to_dict()),
        "categories": json.dumps([dict(vars(c)) for c in categories]),
    }


def load_student_weights(path: str | Path) -> dict[str, Any]:
    """The raw dict of an exported student or a training checkpoint (weights_only).

    Raises:
      FileNotFoundError: no such file.
      UntrustedCheckpointError: the file holds pickled objects other than plain data.
      ExportError: unreadable (truncated, corrupt, not a torch file).
    """
    try:
        return safe_torch_load(path, "model file")
    except UntrustedCheckpointError:
        raise
    except CheckpointReadError as exc:
        raise ExportError(f"{exc}; pass a run's final.pth (or its checkpoints/last.pth)") from exc


def student_from_training_checkpoint(blob: dict[str, Any], path: Path) -> dict[str, Any]:
    """The exported entries (student, config, categories) of a training checkpoint
    (``checkpoints/last.pth``: ``model`` holds the student under ``student.``)."""
    if "categories" not in blob:
        raise ExportError(
            f"{path} is a training checkpoint without the categories (written "
            "by an older version); pass the run's final.pth, or resume the run "
            "once to rewrite its checkpoint"
        )
    prefix = "student."
    student = {k[len(prefix) :]: v for k, v in blob["model"].items() if k.startswith(prefix)}
    return {
        "student": student,
        "config": json.dumps(blob["config"]),
        "categories": json.dumps(blob["categories"]),
    }


def load_exported_student(path: str | Path, device: str | torch.device = "cpu") -> ExportedStudent:
    """Build the student of an exported file with its own config and load its weights.

    Arguments:
        path: ``final.pth`` / ``best.pth`` of a run, or a training checkpoint
            (``checkpoints/last.pth``, its student part).
        device: where the student goes (``"auto"`` = CUDA when available).

    Raises:
        FileNotFoundError: no such file.
        ExportError: unreadable file, a missing key, a config or categories entry that is not
            JSON or not a valid config, or weights that do not fit the config's student.
    """
    path = Path(path)
    blob = load_student_weights(path)
    if not isinstance(blob, dict):
        raise ExportError(f"{path}: not an exported RegSAM student (a {type(blob).__name__})")
    if "student" not in blob and "model" in blob and "iteration" in blob:
        blob = student_from_training_checkpoint(blob, path)
    for key in EXPORT_KEYS:
        if key not in blob:
            raise ExportError(
                f"{path}: missing key '{key}': not an exported RegSAM student "
                "(pass the run's final.pth)"
            )
    try:
        raw_cfg = json.loads(blob["config"])
        categories = [SimpleNamespace(**c) for c in json.loads(blob["categories"])]
    except (TypeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: 'config'/'categories' are not JSON strings: {exc}") from None
    try:
        cfg = load_config_dict(raw_cfg, source=f"{path} (key 'config')")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    model_cfg = cfg.model.model_copy(deep=True)
    model_cfg.backbone.pretrained_path = None  # the state dict below holds every weight
    student = build_student(model_cfg, len(categories))
    try:
        student.load_state_dict(blob["student"])
    except RuntimeError as exc:
        raise ExportError(
            f"{path}: weights do not fit the student of its config: {str(exc)[:600]}"
        ) from None
    return ExportedStudent(student.to(resolve_device(device)).eval(), cfg, categories, path)
