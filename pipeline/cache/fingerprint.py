"""Identity of a teacher cache: everything that changes what is stored, and nothing else.

The fingerprint is a JSON-able dict; its sha256 names the cache directory
``cache.root/<teacher>-<split>-<sha256[:12]>``. It covers the teacher (type, ``sam_tiny`` sizes,
checkpoint sha256 or ``"random-init seed 0"``), SAM's preprocessing (input side S, pixel
mean/std, resize and padding), the cached levels, the storage settings that change values
(``channels``, ``dtype``, ``mask_size``, ``pca_samples``, ``max_segments``), the prompt settings
(``points_per_stuff`` and how prompt seeds are derived), ``prototype_scale``, the split's
annotations and :data:`CACHE_SCHEMA_VERSION`. Model, training, evaluation and compression
settings do not enter it.

Annotations are identified by the sha256 of the split's panoptic JSON, except for the two
datasets the workflow generates itself, whose JSON may not exist yet when Snakemake builds its
DAG: ``synthetic`` (identified by the generator parameters, of which the JSON is a pure
function) and ``cityscapes`` (identified as the official release converted by
cityscapesscripts); for those two the configured ``data.root`` (and ``data.cityscapes_root``)
and the split's paths enter the fingerprint, so two dataset folders never share a cache. For
every kind the sha256 of the actual JSON is recorded in the manifest (``annotation_sha256``)
when the cache is created and compared by the builder and the reader
(:func:`check_annotations`): a JSON edited after the cache was built is refused.

The cache of split ``"unlabeled"`` (SAM's automatic segments of the unlabelled images,
:mod:`pipeline.data.unlabeled`) replaces the annotations by the identity of the unlabelled image
list (:func:`unlabeled_identity`): the held-out part of the train split (fraction, seed, the train
annotations' identity), and per ``data.unlabeled`` source its folder and either the sha256 of its
image-list JSON, the sha256 of every image file in the folder (name + content), or for the
synthetic dataset's own ``unlabeled/`` folder the generator parameters. It adds the automatic-mode
settings and the sha256 of the train cache's fingerprint (whose PCA bases and class prototypes it
reuses). With ``data.labeled_fraction < 1`` the train cache's fingerprint records the labelled
subset, whose segments alone make the class prototypes.

Computing the fingerprint builds no model: checkpoint digests come from
:func:`pipeline.teacher.specs.sha256_file`, so Snakemake can call :func:`cache_dir` at DAG
time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import Config, TeacherConfig
from pipeline.teacher.adapted import adapted_dir, effective_teacher
from pipeline.teacher.specs import PIXEL_MEAN, PIXEL_STD, sha256_file, spec_for

__all__ = [
    "CACHE_SCHEMA_VERSION",
    "CONFIDENCE_RULE",
    "UNLABELED_SPLIT",
    "FingerprintMismatchError",
    "TEACHER_INIT_SEED",
    "cache_dir",
    "check_annotations",
    "describe_differences",
    "fingerprint_sha256",
    "resolve_layers",
    "teacher_fingerprint",
    "unlabeled_identity",
]

# 2: annotation paths in the fingerprint, every chunk written (missing chunks are detectable)
CACHE_SCHEMA_VERSION = 2
UNLABELED_SPLIT = "unlabeled"
# How an unlabelled segment's confidence is computed (see pipeline.cache.runner).
CONFIDENCE_RULE = "predicted_iou * stability_score * max softmax(cls_logits)"
# Seed of a randomly initialised teacher (no checkpoint); independent of the training seed.
TEACHER_INIT_SEED = 0
# How the per-image seed of the stuff point prompts is derived (see pipeline.cache.record).
PROMPT_SEEDING = "crc32(image_id)"


class FingerprintMismatchError(ValueError):
    """A cache was built with other settings than the ones asked for; the message lists them."""


def resolve_layers(teacher: TeacherConfig) -> list[int | str]:
    """``teacher.layers``, or the default levels of :func:`pipeline.teacher.sam_builder.default_layers`
    computed from the teacher's sizes (global-attention blocks, the last block via the neck)."""
    if teacher.layers is not None:
        return list(teacher.layers)
    spec = spec_for(teacher.type, teacher.tiny)
    last = spec.depth - 1
    glob = set(spec.global_attn_indexes)
    return [i for i in range(spec.depth) if (spec.window_size == 0 or i in glob) and i != last] + [
        "neck"
    ]


def _annotation_identity(cfg: Config, split: str) -> dict[str, Any]:
    paths = getattr(cfg.data, split)
    where = {
        "root": cfg.data.root,
        "images": paths.images,
        "json": paths.json_file,
        "png_dir": paths.png_dir,
    }
    if cfg.data.dataset == "synthetic":
        from pipeline.data.synthetic import GENERATOR_VERSION

        return {
            "synthetic": {
                # the unlabelled images change no labelled split
                **cfg.data.synthetic.model_dump(mode="json", exclude={"num_unlabeled"}),
                "generator_version": GENERATOR_VERSION,
            },
            **where,
        }
    if cfg.data.dataset == "cityscapes":
        return {
            "cityscapes": {
                "split": split,
                "converter": "cityscapesscripts csCreatePanopticImgs",
                "cityscapes_root": cfg.data.cityscapes_root,
            },
            **where,
        }
    json_path = cfg.split_paths(split)[1]  # type: ignore[arg-type]
    if not json_path.is_file():
        raise FileNotFoundError(
            f"panoptic annotations of split {split!r} not found: {json_path} "
            f"(data.root + data.{split}.json); the cache fingerprint needs "
            "their sha256"
        )
    return {"sha256": sha256_file(json_path)}


def _files_digest(folder: Path) -> str:
    """sha256 over ``name, sha256(content)`` of every image directly in ``folder``, by name."""
    from pipeline.data.unlabeled import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise FileNotFoundError(
            f"unlabelled image folder not found: {folder} (data.unlabeled); the cache "
            "fingerprint needs the content of its images"
        )
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def unlabeled_identity(cfg: Config) -> dict[str, Any]:
    """What identifies the unlabelled image list of ``cfg`` (see the module docstring)."""
    from pipeline.data.synthetic import GENERATOR_VERSION, UNLABELED_DIR

    out: dict[str, Any] = {}
    if cfg.data.labeled_fraction < 1:
        out["train_heldout"] = {
            "labeled_fraction": cfg.data.labeled_fraction,
            "labeled_seed": cfg.data.labeled_seed,
            "train": _annotation_identity(cfg, "train"),
        }
    sources = []
    for src in cfg.data.unlabeled:
        entry: dict[str, Any] = {
            "root": cfg.data.root,
            "images": src.images,
            "image_list": src.image_list,
        }
        if cfg.data.dataset == "synthetic" and src.images == UNLABELED_DIR and not src.image_list:
            entry["synthetic"] = {
                **cfg.data.synthetic.model_dump(mode="json"),
                "generator_version": GENERATOR_VERSION,
            }
        elif src.image_list:
            list_path = Path(cfg.data.root) / src.image_list
            if not list_path.is_file():
                raise FileNotFoundError(
                    f"unlabelled image list not found: {list_path} (data.unlabeled image_list); "
                    "the cache fingerprint needs its sha256"
                )
            entry["list_sha256"] = sha256_file(list_path)
        else:
            entry["files_sha256"] = _files_digest(Path(cfg.data.root) / src.images)
        sources.append(entry)
    out["sources"] = sources
    return out


def teacher_fingerprint(cfg: Config, split: str) -> dict[str, Any]:
    """The fingerprint dict of the cache of ``split`` under ``cfg``."""
    if split == UNLABELED_SPLIT:
        fp = _teacher_fingerprint(cfg, split, annotations=None)
        fp["unlabeled"] = unlabeled_identity(cfg)
        fp["automatic"] = cfg.teacher.automatic.model_dump(mode="json")
        fp["confidence"] = CONFIDENCE_RULE
        fp["train_cache"] = fingerprint_sha256(teacher_fingerprint(cfg, "train"))
        return fp
    fp = _teacher_fingerprint(cfg, split, annotations=_annotation_identity(cfg, split))
    if split == "train" and cfg.data.labeled_fraction < 1:
        # the class prototypes are made from the labelled subset only
        fp["labeled_subset"] = {
            "labeled_fraction": cfg.data.labeled_fraction,
            "labeled_seed": cfg.data.labeled_seed,
        }
    return fp


def _teacher_fingerprint(
    cfg: Config, split: str, annotations: dict[str, Any] | None
) -> dict[str, Any]:
    t, c = effective_teacher(cfg), cfg.cache
    spec = spec_for(t.type, t.tiny)
    weights = (
        f"sha256:{sha256_file(t.checkpoint)}"
        if t.checkpoint
        else f"random-init seed {TEACHER_INIT_SEED}"
    )
    return {
        "schema_version": CACHE_SCHEMA_VERSION,
        "split": split,
        "teacher": {
            "type": t.type,
            "tiny": t.tiny.model_dump(mode="json") if t.type == "sam_tiny" else None,
            "weights": weights,
        },
        "preprocessing": {
            "input_size": spec.img_size,
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "resize": "longest side to input_size (segment_anything ResizeLongestSide)",
            "padding": "image top-left, zeros to input_size x input_size after normalisation",
        },
        "layers": resolve_layers(t),
        "prompts": {
            "points_per_stuff": t.points_per_stuff,
            "seed": PROMPT_SEEDING,
            "things": "box",
            "stuff": "points",
        },
        "channels": c.channels,
        "dtype": c.dtype,
        "mask_size": c.mask_size,
        "pca_samples": c.pca_samples,
        "max_segments": c.max_segments,
        "prototype_scale": c.prototype_scale,
        **({"annotations": annotations} if annotations is not None else {}),
    }


def check_annotations(cache_path: Path, recorded_sha256: str | None, json_path: Path) -> None:
    """Refuse a cache built from another version of the split's panoptic JSON.

    Raises:
      FingerprintMismatchError: ``json_path``'s sha256 differs from ``recorded_sha256`` (the
        manifest's ``annotation_sha256``; None = not recorded, nothing to compare).
    """
    if recorded_sha256 is None:
        return
    actual = sha256_file(json_path)
    if actual != recorded_sha256:
        raise FingerprintMismatchError(
            f"teacher cache {cache_path} was built from other annotations than asked:\n  "
            f"annotation_sha256: cache {recorded_sha256[:12]}, asked {actual[:12]} ({json_path})\n"
            f"The panoptic JSON changed after the cache was built. Move or delete {cache_path} and "
            "run `snakemake cache_teacher` (or `python -m pipeline cache-teacher`) to rebuild it."
        )


def fingerprint_sha256(fingerprint: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of a fingerprint."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_dir(cfg: Config, split: str) -> Path:
    """``cache.root/<teacher>-<split>-<sha256(fingerprint)[:12]>``."""
    digest = fingerprint_sha256(teacher_fingerprint(cfg, split))
    return Path(cfg.cache.root) / f"{cfg.teacher.type}-{split}-{digest[:12]}"


def cache_marker(cfg: Config, split: str) -> Path:
    """The file that says the cache of ``split`` is complete, computable before anything runs.

    Without teacher adaptation it is ``cache_dir(cfg, split)/COMPLETE.json``. With it the cache
    directory depends on the sha256 of weights that do not exist yet when the workflow plans, so
    the marker is ``<adapted_dir>/cache_<split>.json``, written by :func:`build_cache` once the
    cache is complete and naming its directory.
    """
    if cfg.teacher_adapt.enabled:
        return adapted_dir(cfg) / f"cache_{split}.json"
    return cache_dir(cfg, split) / "COMPLETE.json"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def describe_differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per dotted field that differs, e.g. ``"layers: cache [1, 'neck'], asked [3]"``."""
    a, b = _flatten(stored), _flatten(expected)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            lines.append(f"{key}: missing in the cache, asked {b[key]!r}")
        elif key not in b:
            lines.append(f"{key}: cache {a[key]!r}, not part of the asked fingerprint")
        elif json.dumps(a[key], sort_keys=True) != json.dumps(b[key], sort_keys=True):
            lines.append(f"{key}: cache {a[key]!r}, asked {b[key]!r}")
    return lines
