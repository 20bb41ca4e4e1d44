"""Panoptic predictions for a folder of images (no annotations needed).

Output layout under ``out_dir``::

    panoptic/<stem>.png     COCO panoptic PNG (id = R + 256 G + 256^2 B)
    overlays/<stem>.jpg     coloured overlay on the original image
    predictions.json        {"annotations": [...], "images": [...], "categories": [...],
                             "skipped": [{"file_name", "reason"}]}

Files that cannot be decoded as images, and a second file with an already used stem, are
skipped, counted and named in the returned :class:`PredictionSummary` and in ``predictions.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import OBJECT_MASK_THRESHOLD, OVERLAP_THRESHOLD
from pipeline.data.coco_panoptic import DataError, load_image_rgb
from pipeline.data.transforms import EvalTransform
from pipeline.evaluation.inference import run_panoptic_inference, to_coco_panoptic
from pipeline.evaluation.pq import CategoryLike
from pipeline.evaluation.visualize import overlay_panoptic, save_image

__all__ = [
    "IMAGE_SUFFIXES",
    "PredictionSummary",
    "bare_sample",
    "predict_folder",
    "categories_to_json",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class PredictionSummary:
    """What :func:`predict_folder` did: images found, predictions written, files skipped."""

    num_images: int
    num_predicted: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def __str__(self) -> str:
        text = f"{self.num_predicted}/{self.num_images} images predicted"
        if self.skipped:
            names = ", ".join(name for name, _ in self.skipped)
            text += f"; {len(self.skipped)} skipped: {names}"
        return text


def bare_sample(image: np.ndarray, file_name: str) -> dict[str, Any]:
    """A data sample without annotations, ready for :class:`EvalTransform`."""
    height, width = image.shape[:2]
    return {
        "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
        "masks": torch.zeros((0, height, width), dtype=torch.bool),
        "labels": torch.zeros(0, dtype=torch.int64),
        "segment_ids": torch.zeros(0, dtype=torch.int64),
        "ignore": torch.zeros((height, width), dtype=torch.bool),
        "valid": torch.ones((height, width), dtype=torch.bool),
        "transform": np.eye(3, dtype=np.float64),
        "image_id": Path(file_name).stem,
        "orig_size": (height, width),
        "file_name": file_name,
    }


def categories_to_json(categories: Sequence[CategoryLike]) -> list[dict[str, Any]]:
    """COCO panoptic ``categories`` entries (``id``, ``name``, ``isthing``, ``color``)."""
    out = []
    for c in categories:
        entry = {"id": int(c.id), "name": str(getattr(c, "name", c.id)), "isthing": int(c.isthing)}
        color = getattr(c, "color", None)
        if color is not None:
            entry["color"] = [int(v) for v in color]
        out.append(entry)
    return out


def predict_folder(
    model: torch.nn.Module,
    image_dir: str | Path,
    out_dir: str | Path,
    categories: Sequence[CategoryLike],
    test_size: int | None,
    device: torch.device | str,
    size_divisibility: int = 32,
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
    iou_score_weight: float = 0.0,
    write_overlays: bool = True,
    progress: bool = True,
) -> PredictionSummary:
    """Predict every ``.jpg`` / ``.jpeg`` / ``.png`` in ``image_dir`` (not recursive).

    Arguments:
        model: the student, or an exported one (:class:`pipeline.deploy.runner.ExportedStudent`),
            called through :func:`~pipeline.evaluation.inference.forward_pixels` (uint8 RGB in,
            ``pred_logits``, ``pred_masks``, ``pred_iou`` out); it is put in eval mode.
        categories: dataset categories ordered by train id (output uses their ``id``).
        test_size: longest side of the network input (``None``: original size), as in
            :class:`~pipeline.data.transforms.EvalTransform`.
        device: where the model runs (the model is moved there).

    Returns:
        A :class:`PredictionSummary`; the files are written under ``out_dir`` (module docstring).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    files = sorted(
        p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    png_dir, overlay_dir = out_dir / "panoptic", out_dir / "overlays"
    png_dir.mkdir(parents=True, exist_ok=True)
    if write_overlays:
        overlay_dir.mkdir(parents=True, exist_ok=True)

    transform = EvalTransform(test_size, size_divisibility)
    isthing = [bool(c.isthing) for c in categories]
    model.to(device).eval()
    summary = PredictionSummary(num_images=len(files), num_predicted=0)
    annotations, images, stems = [], [], set()
    for path in tqdm(files, desc="predict", disable=not progress):
        if path.stem in stems:
            summary.skipped.append((path.name, f"another image already has the stem {path.stem!r}"))
            continue
        try:
            image = load_image_rgb(path)
        except DataError as exc:
            summary.skipped.append((path.name, str(exc)))
            log.warning("skipping %s", exc)
            continue
        stems.add(path.stem)
        sample = transform(bare_sample(image, path.name))
        [(id_map, segments)] = run_panoptic_inference(
            model,
            [sample],
            isthing,
            device,
            object_mask_threshold=object_mask_threshold,
            overlap_threshold=overlap_threshold,
            iou_score_weight=iou_score_weight,
        )
        rgb, coco_segments = to_coco_panoptic(id_map, segments, categories)
        save_image(rgb, png_dir / f"{path.stem}.png")
        if write_overlays:
            ids = id_map.cpu().numpy()
            save_image(
                overlay_panoptic(image, ids, coco_segments, categories),
                overlay_dir / f"{path.stem}.jpg",
            )
        annotations.append(
            {"image_id": path.stem, "file_name": f"{path.stem}.png", "segments_info": coco_segments}
        )
        images.append(
            {
                "id": path.stem,
                "file_name": path.name,
                "height": int(image.shape[0]),
                "width": int(image.shape[1]),
            }
        )
        summary.num_predicted += 1

    result = {
        "annotations": annotations,
        "images": images,
        "categories": categories_to_json(categories),
        "skipped": [{"file_name": n, "reason": r} for n, r in summary.skipped],
    }
    (out_dir / "predictions.json").write_text(json.dumps(result, indent=1))
    log.info("%s", summary)
    return summary
