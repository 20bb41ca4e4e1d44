"""From one data sample to what the cache stores for it (shared by the runner and the live teacher).

A sample at original resolution (``PanopticDataset`` with ``transform=None``) gives the teacher
its image and one prompt per non-crowd segment (things by box, stuff by points). The stuff point
prompts are seeded by :func:`prompt_seed` of the image id only, so a rerun, another worker or the
live teacher draws the same points. The teacher's full-width features are projected with the
stored PCA bases.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.cache.pca import PcaBasis, project
from pipeline.cache.store import ImageRecord
from pipeline.teacher.extractor import SegmentPrompt, TeacherExtractor, TeacherOutput

__all__ = ["image_hwc", "prompt_seed", "project_output", "sample_record", "segment_prompts"]


def prompt_seed(image_id: str) -> int:
    """Seed of an image's stuff point prompts: ``crc32(image_id)`` (stable across runs)."""
    return zlib.crc32(str(image_id).encode())


def image_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``[3, H, W]`` tensor (data sample) -> contiguous uint8 ``[H, W, 3]`` numpy."""
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [3, H, W] image, got {arr.dtype} {list(arr.shape)}")
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def segment_prompts(
    masks: torch.Tensor | np.ndarray,
    segment_ids: Sequence[int],
    labels: Sequence[int],
    isthing: Sequence[bool],
) -> list[SegmentPrompt]:
    """One :class:`SegmentPrompt` per segment.

    Arguments:
      masks: bool ``[M, H, W]``.
      segment_ids: ``[M]`` panoptic ids.
      labels: ``[M]`` train ids.
      isthing: per train id, whether the class is a thing.
    """
    masks = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    return [
        SegmentPrompt(int(sid), masks[k], bool(isthing[int(lab)]))
        for k, (sid, lab) in enumerate(zip(segment_ids, labels))
    ]


def project_output(out: TeacherOutput, bases: Sequence[PcaBasis | None]) -> list[np.ndarray]:
    """The teacher's levels as stored: PCA coefficients where a basis exists, else unchanged."""
    if len(bases) != len(out.features):
        raise ValueError(f"{len(bases)} PCA entries for {len(out.features)} feature levels")
    return [
        f.astype(np.float32) if b is None else project(f, b) for f, b in zip(out.features, bases)
    ]


def sample_record(
    extractor: TeacherExtractor,
    sample: dict[str, Any],
    isthing: Sequence[bool],
    bases: Sequence[PcaBasis | None],
) -> tuple[ImageRecord, TeacherOutput]:
    """Run the teacher on an original-resolution sample.

    Returns:
      the float32 :class:`ImageRecord` (features projected) and the raw :class:`TeacherOutput`.
    """
    labels = (
        sample["labels"].numpy()
        if isinstance(sample["labels"], torch.Tensor)
        else np.asarray(sample["labels"])
    )
    seg_ids = (
        sample["segment_ids"].numpy()
        if isinstance(sample["segment_ids"], torch.Tensor)
        else np.asarray(sample["segment_ids"])
    )
    prompts = segment_prompts(sample["masks"], seg_ids, labels, isthing)
    out = extractor.extract(image_hwc(sample["image"]), prompts, prompt_seed(sample["image_id"]))
    record = ImageRecord(
        features=project_output(out, bases),
        mask_logits=out.mask_logits,
        iou=out.iou,
        embeddings=out.embeddings,
        segment_ids=out.segment_ids.astype(np.int64),
        labels=labels.astype(np.int64),
        orig_size=out.orig_size,
    )
    return record, out
