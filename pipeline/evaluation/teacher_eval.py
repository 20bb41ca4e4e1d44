"""How good is the teacher at the prompts the cache gives it?

``evaluate-teacher`` prompts a SAM teacher exactly as stage one does (things by their box, stuff
by ``teacher.points_per_stuff`` interior points seeded by the image id, single-mask output),
upsamples each low-resolution mask to the original image with SAM's own ``postprocess_masks``
and compares ``logits > 0`` with the ground-truth segment over the pixels that are not void or
crowd. It reports:

* ``miou``: the mean IoU over all prompted segments (``miou_things``, ``miou_stuff`` by kind),
  and ``miou_class_mean``: the mean over classes of the per-class mean;
* ``iou_pearson``: the Pearson correlation between the IoU head's prediction (unclamped) and
  the true IoU (None when either is constant, e.g. a random teacher whose head predicts the
  same value everywhere);
* ``segments``: one row per segment (image id, segment id, train id, thing, true and predicted
  IoU), from which every figure above can be recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache.fingerprint import TEACHER_INIT_SEED, resolve_layers
from pipeline.cache.record import image_hwc, prompt_seed
from pipeline.config import Config
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.teacher.extractor import (
    TeacherExtractor,
    box_prompts,
    frame_scale,
    sample_stuff_points,
)
from pipeline.teacher.sam_builder import build_teacher, sha256_file

__all__ = ["evaluate_teacher", "segment_iou", "summarize_teacher_eval"]

log = logging.getLogger(__name__)


def segment_iou(pred: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
    """IoU per segment over the pixels not ignored.

    Arguments:
      pred, target: bool ``[K, H, W]``.
      ignore: bool ``[H, W]`` (void and crowd).

    Returns:
      float64 ``[K]``; 1 where prediction and target are both empty on the counted pixels.
    """
    keep = ~ignore
    inter = (pred & target & keep).flatten(1).sum(1).double()
    union = ((pred | target) & keep).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def summarize_teacher_eval(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-segment rows (``iou``, ``pred_iou``, ``isthing``, ``train_id``).

    Returns:
      ``num_segments``, ``miou``, ``miou_things``, ``miou_stuff``, ``miou_class_mean``,
      ``iou_pearson`` (None where undefined) and ``miou_per_class`` (train id -> mean).
    """

    def mean(vals: list[float]) -> float | None:
        return float(np.mean(vals)) if vals else None

    ious = [r["iou"] for r in rows]
    per_class: dict[int, list[float]] = {}
    for r in rows:
        per_class.setdefault(int(r["train_id"]), []).append(r["iou"])
    class_means = {k: float(np.mean(v)) for k, v in sorted(per_class.items())}
    return {
        "num_segments": len(rows),
        "miou": mean(ious),
        "miou_things": mean([r["iou"] for r in rows if r["isthing"]]),
        "miou_stuff": mean([r["iou"] for r in rows if not r["isthing"]]),
        "miou_class_mean": mean(list(class_means.values())),
        "miou_per_class": {str(k): v for k, v in class_means.items()},
        "iou_pearson": _pearson([r["pred_iou"] for r in rows], ious),
    }


@torch.no_grad()
def evaluate_teacher(
    cfg: Config,
    checkpoint: str | None,
    out_path: str | Path | None = None,
    *,
    split: str = "val",
    max_images: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prompted-mask quality of a teacher on ``split`` (see the module docstring).

    Arguments:
      cfg: the experiment config (``teacher`` sizes and prompts, ``data`` paths).
      checkpoint: teacher weights (official layout), or None for the random initialisation the
        cache would use.
      out_path: JSON file to write (None = do not write).
      split: ``"val"``, ``"tune"`` or ``"train"``.
      max_images: evaluate only the first N images.
    """
    started = time.perf_counter()
    t = cfg.teacher
    sam = build_teacher(t.type, checkpoint, t.tiny, seed=TEACHER_INIT_SEED)
    ext = TeacherExtractor(
        sam, resolve_layers(t), points_per_stuff=t.points_per_stuff, device=t.device
    )
    image_dir, json_path, png_dir = cfg.split_paths(split)  # type: ignore[arg-type]
    data = PanopticDataset(
        image_dir,
        json_path,
        png_dir,
        transform=None,
        on_bad_sample=cfg.data.on_bad_sample,
        require_segments=False,
    )
    isthing = [c.isthing for c in data.categories]
    n = len(data) if max_images is None else min(len(data), max_images)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    S = ext.input_size
    for i in tqdm(range(n), desc=f"evaluate_teacher {split}", disable=not progress):
        sample = data[i]
        if "skip_reason" in sample:
            skipped[sample["skip_reason"]] = skipped.get(sample["skip_reason"], 0) + 1
            continue
        masks = sample["masks"]
        if masks.shape[0] == 0:
            continue
        image = image_hwc(sample["image"])
        H0, W0 = image.shape[:2]
        scale = frame_scale((H0, W0), S)
        resized = ext.transform.get_preprocess_shape(H0, W0, S)
        _, embedding = ext.encode(ext.preprocess(image))
        labels = sample["labels"].tolist()
        kinds = [bool(isthing[c]) for c in labels]
        things = [k for k, th in enumerate(kinds) if th]
        stuff = [k for k, th in enumerate(kinds) if not th]
        low = torch.zeros(len(labels), 1, 4 * ext.grid_size, 4 * ext.grid_size, device=ext.device)
        pred_iou = torch.zeros(len(labels), device=ext.device)
        dev_masks = masks.to(ext.device)
        if things:
            lg, iou = ext.decode(embedding, boxes=box_prompts(dev_masks[things], scale))
            low[things, 0], pred_iou[things] = lg.float(), iou.float()
        if stuff:
            seed = prompt_seed(sample["image_id"])
            pts = np.stack(
                [
                    sample_stuff_points(
                        masks[k].numpy(), t.points_per_stuff, seed, int(sample["segment_ids"][k])
                    )
                    for k in stuff
                ]
            )
            lg, iou = ext.decode(
                embedding,
                points=torch.as_tensor(pts * scale, dtype=torch.float32, device=ext.device),
            )
            low[stuff, 0], pred_iou[stuff] = lg.float(), iou.float()
        full = sam.postprocess_masks(low, resized, (H0, W0))[:, 0] > 0
        ious = segment_iou(full.cpu(), masks, sample["ignore"])
        for k in range(len(labels)):
            rows.append(
                {
                    "image_id": sample["image_id"],
                    "segment_id": int(sample["segment_ids"][k]),
                    "train_id": int(labels[k]),
                    "isthing": kinds[k],
                    "iou": round(float(ious[k]), 6),
                    "pred_iou": round(float(pred_iou[k]), 6),
                }
            )
    result = {
        "split": split,
        "json": str(json_path),
        "teacher_type": t.type,
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "weights": "checkpoint" if checkpoint else f"random init (seed {TEACHER_INIT_SEED})",
        "prompts": {
            "things": "tight box",
            "stuff": f"{t.points_per_stuff} interior points",
            "output": "single mask, logits > 0 at the original resolution",
        },
        "num_images": n,
        "skipped": skipped,
        **summarize_teacher_eval(rows),
        "seconds": round(time.perf_counter() - started, 1),
        "segments": rows,
    }
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
    log.info(
        "teacher %s on %s: mIoU %.4f (things %s, stuff %s) over %d segments, IoU-head "
        "correlation %s",
        checkpoint or "random init",
        split,
        result["miou"] or math.nan,
        result["miou_things"],
        result["miou_stuff"],
        result["num_segments"],
        result["iou_pearson"],
    )
    return result
