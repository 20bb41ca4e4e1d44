"""Read-only access to a finished teacher cache (``TeacherCache``), safe in DataLoader workers.

``TeacherCache(path).get(image_id)`` returns the dict of ``docs/architecture.md`` (dequantised
float32 torch tensors; every map covers SAM's padded ``S x S`` input frame):

=============== ===================== ====================================================
key             type                  meaning
=============== ===================== ====================================================
features        list of ``[C_l,h,w]`` stored levels (PCA coefficients for reduced levels)
level_names     list of str           ``"block{i}"`` / ``"neck"``
segment_ids     int64 ``[M]``         panoptic segment ids
labels          int64 ``[M]``         train ids of the segments (pseudo-classes if unlabelled)
mask_logits     ``[M, m, m]``         SAM's mask logits per segment
iou             ``[M]``               SAM's predicted IoU
embeddings      ``[M, 256]``          mask-pooled SAM image embedding
cls_logits      ``[M, K]``            ``prototype_scale * cos(embedding, prototype_k)``
stability       ``[M]``               unlabelled caches only: SAM's stability score
confidence      ``[M]``               unlabelled caches only: iou * stability * max class prob
scale           float                 s = S / max(H0, W0)
input_size      int                   S
orig_size       (int, int)            (H0, W0)
=============== ===================== ====================================================

Only the path (and the expected fingerprint) is pickled; the Zarr group is opened lazily in each
process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.cache.prototypes import class_logits
from pipeline.cache.store import (
    COMPLETE_FILE,
    STATUS_DONE,
    STATUS_NAMES,
    STATUS_SKIPPED,
    CacheStore,
)
from pipeline.config import Config

__all__ = ["CacheNotFoundError", "TeacherCache"]


class CacheNotFoundError(FileNotFoundError):
    """No finished cache exists for a config; the message says how to build it."""


class TeacherCache:
    """A finished teacher cache.

    Arguments:
      path: the cache directory (``cache.root/<teacher>-<split>-<hash>``).
      expected_fingerprint: if given, the stored fingerprint must equal it
        (:class:`pipeline.cache.fingerprint.FingerprintMismatchError` lists the differing fields).
    """

    def __init__(
        self, path: str | Path, expected_fingerprint: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self._expected = expected_fingerprint
        if not (self.path / COMPLETE_FILE).is_file():
            raise CacheNotFoundError(
                f"teacher cache {self.path} is missing or unfinished (no {COMPLETE_FILE}); run "
                "`snakemake cache_teacher` (or `python -m pipeline cache-teacher --config ...`) "
                "to build or resume it"
            )
        self._store = CacheStore.open(self.path)
        if expected_fingerprint is not None:
            self._store.check_fingerprint(expected_fingerprint)
        summary = self._store.complete or {}
        layout = self._store.layout
        self._index = {image_id: i for i, image_id in enumerate(layout.image_ids)}
        self._skipped = set(summary.get("skipped_indices", []))
        self._prototypes: torch.Tensor | None = None
        self.prototype_scale = float(self._store.fingerprint["prototype_scale"])

    @classmethod
    def for_config(cls, cfg: Config, split: str = "train") -> "TeacherCache":
        """The cache of ``split`` under ``cfg``; refuses a missing or unfinished one, one of other
        settings and one built from another version of the split's panoptic JSON."""
        from pipeline.cache.fingerprint import (
            UNLABELED_SPLIT,
            cache_dir,
            check_annotations,
            teacher_fingerprint,
        )

        fingerprint = teacher_fingerprint(cfg, split)
        path = cache_dir(cfg, split)
        if not (path / COMPLETE_FILE).is_file():
            state = "unfinished" if path.is_dir() else "missing"
            raise CacheNotFoundError(
                f"the teacher cache of split {split!r} for this config is {state}: {path}; run "
                "`snakemake cache_teacher` (or `python -m pipeline cache-teacher --config <this "
                f"config> --split {split}`) first"
            )
        cache = cls(path, expected_fingerprint=fingerprint)
        if split == UNLABELED_SPLIT:  # no annotations: the image list is in the fingerprint
            return cache
        check_annotations(
            path, cache._store.manifest.get("annotation_sha256"), cfg.split_paths(split)[1]
        )  # type: ignore[arg-type]
        return cache

    # ------------------------------------------------------------------ metadata
    @property
    def fingerprint(self) -> dict[str, Any]:
        return self._store.fingerprint

    @property
    def fingerprint_sha256(self) -> str:
        return self._store.fingerprint_sha256

    @property
    def level_names(self) -> list[str]:
        return list(self._store.layout.level_names)

    @property
    def level_channels(self) -> list[int]:
        """Stored channels per level (what a student distills to)."""
        return list(self._store.layout.level_channels)

    @property
    def num_classes(self) -> int:
        return self._store.layout.num_classes

    @property
    def input_size(self) -> int:
        return self._store.layout.input_size

    @property
    def image_ids(self) -> list[str]:
        return list(self._store.layout.image_ids)

    def __len__(self) -> int:
        return len(self._index)

    def _lookup(self, image_id: Any) -> int:
        try:
            return self._index[str(image_id)]
        except KeyError:
            raise KeyError(
                f"image_id {image_id!r} is not part of the teacher cache {self.path}"
            ) from None

    def status(self, image_id: Any) -> str:
        """``"done"`` or ``"skipped"`` (a finished cache has no ``"todo"`` image)."""
        index = self._lookup(image_id)
        return STATUS_NAMES[STATUS_SKIPPED if index in self._skipped else STATUS_DONE]

    def __contains__(self, image_id: Any) -> bool:
        index = self._index.get(str(image_id))
        return index is not None and index not in self._skipped

    # ------------------------------------------------------------------ reading
    @property
    def prototypes(self) -> torch.Tensor:
        """float32 ``[K, 256]`` unit class prototypes."""
        if self._prototypes is None:
            self._prototypes = torch.from_numpy(self._store.read_prototypes())
        return self._prototypes

    def get(self, image_id: Any, keep_float16: bool = False) -> dict[str, Any]:
        """The cached teacher targets of one image (see the module docstring).

        ``keep_float16=True`` leaves ``features`` and ``mask_logits`` of a float16 cache in
        float16 (as stored; half the memory, e.g. in DataLoader queues); otherwise, and for int8
        caches, they are float32.
        """
        index = self._lookup(image_id)
        if index in self._skipped:
            info = self._store.skip_info(index) or {}
            raise KeyError(
                f"image_id {image_id!r} was skipped when the teacher cache was built "
                f"({info.get('reason', 'unknown reason')}: {info.get('message', '')})"
            )
        raw = self._store.read_image(index, keep_float16)
        embeddings = torch.from_numpy(raw["embeddings"])
        h0, w0 = raw["orig_size"]
        size = self._store.layout.input_size
        return {
            "features": [torch.from_numpy(f) for f in raw["features"]],
            "level_names": self.level_names,
            "segment_ids": torch.from_numpy(raw["segment_ids"]),
            "labels": torch.from_numpy(raw["labels"]),
            "mask_logits": torch.from_numpy(raw["mask_logits"]),
            "iou": torch.from_numpy(raw["iou"]),
            "embeddings": embeddings,
            "cls_logits": class_logits(embeddings, self.prototypes, self.prototype_scale),
            "scale": size / max(h0, w0),
            "input_size": size,
            "orig_size": (h0, w0),
            # unlabelled caches: SAM's stability score and the segment's confidence
            **{k: torch.from_numpy(raw[k]) for k in ("stability", "confidence") if k in raw},
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # only the path travels to DataLoader / dask workers; each process reopens the store
        return (type(self), (str(self.path), self._expected))

    def __repr__(self) -> str:
        return (
            f"TeacherCache({str(self.path)!r}, images={len(self)}, levels={self.level_names}, "
            f"channels={self.level_channels})"
        )
