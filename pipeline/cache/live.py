"""The teacher run inline, answering like :meth:`TeacherCache.get` (for the cache-vs-live benchmark).

``LiveTeacher`` runs the same :class:`pipeline.teacher.extractor.TeacherExtractor` the cache
runner uses, with the same prompts and prompt seeds, projects the features with the PCA bases
stored in the cache and computes ``cls_logits`` against the stored prototypes. Nothing is
quantised, so the result is the cached one up to float16/int8 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.fingerprint import TEACHER_INIT_SEED, resolve_layers, teacher_fingerprint
from pipeline.cache.prototypes import class_logits
from pipeline.cache.record import sample_record
from pipeline.cache.store import CacheStore
from pipeline.config import Config
from pipeline.teacher.adapted import effective_teacher

__all__ = ["LiveTeacher"]


class LiveTeacher:
    """Run the teacher of ``cfg`` on original-resolution samples.

    Arguments:
      cfg: the config the cache was built with (its fingerprint must match the cache's).
      cache_path: a cache directory holding the PCA bases and class prototypes.
      device: torch device (default ``cfg.teacher.device``; ``"auto"`` = CUDA when available).
    """

    def __init__(self, cfg: Config, cache_path: str | Path, device: str | None = None) -> None:
        from pipeline.teacher.extractor import TeacherExtractor
        from pipeline.teacher.sam_builder import build_teacher

        store = CacheStore.open(cache_path)
        store.check_fingerprint(teacher_fingerprint(cfg, store.fingerprint["split"]))
        self.bases = store.read_pca()
        self.prototypes = torch.from_numpy(store.read_prototypes())
        self.prototype_scale = cfg.cache.prototype_scale
        self.isthing = [bool(c["isthing"]) for c in store.layout.categories]
        t = effective_teacher(cfg)
        sam = build_teacher(t.type, t.checkpoint, t.tiny, seed=TEACHER_INIT_SEED)
        self.extractor = TeacherExtractor(
            sam,
            resolve_layers(t),
            mask_size=cfg.cache.mask_size,
            points_per_stuff=t.points_per_stuff,
            device=device or t.device,
        )

    @property
    def level_names(self) -> list[str]:
        return self.extractor.level_names

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Teacher targets of an original-resolution data sample (``image [3, H, W]`` uint8,
        ``masks``, ``segment_ids``, ``labels``, ``image_id``), as :meth:`TeacherCache.get`."""
        record, out = sample_record(self.extractor, sample, self.isthing, self.bases)
        embeddings = torch.from_numpy(np.ascontiguousarray(record.embeddings))
        return {
            "features": [torch.from_numpy(np.ascontiguousarray(f)) for f in record.features],
            "level_names": list(out.level_names),
            "segment_ids": torch.from_numpy(record.segment_ids),
            "labels": torch.from_numpy(record.labels),
            "mask_logits": torch.from_numpy(record.mask_logits),
            "iou": torch.from_numpy(record.iou),
            "embeddings": embeddings,
            "cls_logits": class_logits(embeddings, self.prototypes, self.prototype_scale),
            "scale": float(out.scale),
            "input_size": int(out.input_size),
            "orig_size": tuple(out.orig_size),
        }
