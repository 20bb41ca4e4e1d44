"""Where a training sample's SAM targets come from: the stage-one cache, or (for comparison
benchmarks only) the teacher run inline.

Lookups happen in the DataLoader workers and return the raw cached dicts of
:meth:`pipeline.cache.reader.TeacherCache.get`; the workers' collate stacks them per level
(:func:`pipeline.training.teacher_targets.stack_teacher_items`) and the training step warps them
onto the augmented views on the device
(:func:`pipeline.training.teacher_targets.batch_warp_teacher_targets`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.cache.reader import TeacherCache
from pipeline.config import Config

log = logging.getLogger(__name__)


class TeacherSource:
    """Teacher targets per training sample.

    Arguments:
        cache: the stage-one cache of the train split (fingerprint already checked).
        live: a :class:`pipeline.cache.live.LiveTeacher` when ``teacher_mode: live``; the cache
            then only supplies the PCA bases and class prototypes.
        keep_float16: hand out a float16 cache's maps in float16 (for training on a GPU: half
            the worker-to-step traffic and pinned memory, and the GPU converts them for free
            inside the warp). On a CPU the float16 -> float32 conversion in the step costs more
            than it saves (measured: warp 10 ms -> 15 ms per batch of 8), so the default is
            float32 maps.
    """

    def __init__(self, cache: TeacherCache, live: Any | None = None, keep_float16: bool = False):
        self.cache = cache
        self.live = live
        self.keep_float16 = keep_float16

    @classmethod
    def from_config(cls, cfg: Config, keep_float16: bool = False) -> "TeacherSource":
        """Open the cache of ``cfg``'s teacher; a missing or stale cache stops with an error that
        says to run ``snakemake cache_teacher``."""
        cache = TeacherCache.for_config(cfg, "train")
        live = None
        if cfg.model.sam_distill.teacher_mode == "live":
            from pipeline.cache.live import LiveTeacher

            log.warning(
                "model.sam_distill.teacher_mode=live runs SAM inside the data loader: "
                "for comparison benchmarks only"
            )
            live = LiveTeacher(cfg, cache.path, device="cpu")
        return cls(cache, live, keep_float16)

    @property
    def path(self) -> Path:
        return Path(self.cache.path)

    @property
    def fingerprint(self) -> str:
        return self.cache.fingerprint_sha256

    @property
    def level_channels(self) -> list[int]:
        return self.cache.level_channels

    def lookup(self, dataset: Any, index: int, sample: dict) -> dict | None:
        """Raw teacher targets of ``dataset[index]`` (None when the cache skipped that image)."""
        if self.live is not None:
            return self.live(dataset.load_original(index))
        image_id = sample["image_id"]
        if image_id not in self.cache:
            return None
        return self.cache.get(image_id, keep_float16=self.keep_float16)


class UnlabeledTeacherSource:
    """Teacher targets of unlabelled samples: the unlabelled cache's entries, with the segments
    below ``model.sam_distill.unlabeled_min_confidence`` removed
    (:func:`pipeline.losses.pseudo_label.confident_segments`).

    Arguments:
        cache: the cache of split ``"unlabeled"`` (fingerprint already checked).
        min_confidence: the threshold.
        keep_float16: as :class:`TeacherSource`.
    """

    def __init__(self, cache: TeacherCache, min_confidence: float, keep_float16: bool = False):
        self.cache = cache
        self.min_confidence = float(min_confidence)
        self.keep_float16 = keep_float16

    @classmethod
    def from_config(cls, cfg: Config, keep_float16: bool = False) -> "UnlabeledTeacherSource":
        """Open ``cfg``'s unlabelled cache; a missing one stops with an error that says to run
        ``snakemake cache_teacher_unlabeled``."""
        cache = TeacherCache.for_config(cfg, "unlabeled")
        return cls(cache, cfg.model.sam_distill.unlabeled_min_confidence, keep_float16)

    @property
    def path(self) -> Path:
        return Path(self.cache.path)

    @property
    def fingerprint(self) -> str:
        return self.cache.fingerprint_sha256

    def lookup(self, dataset: Any, index: int, sample: dict) -> dict | None:
        """Confident teacher segments of ``dataset[index]`` (None when the cache skipped it)."""
        from pipeline.losses.pseudo_label import confident_segments

        image_id = sample["image_id"]
        if image_id not in self.cache:
            return None
        entry = self.cache.get(image_id, keep_float16=self.keep_float16)
        return confident_segments(entry, self.min_confidence)
