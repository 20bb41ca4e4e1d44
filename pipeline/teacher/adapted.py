"""Where the adapted teacher lives, and which checkpoint the teacher is built from.

With ``teacher_adapt.enabled`` the teacher that builds the cache is not ``teacher.checkpoint``
itself but the model fine-tuned from it (stage zero, ``adapt-teacher``). Its folder is a pure
function of everything the adaptation reads from the config, known before the adaptation runs
(the workflow plans with it):

    <cache.root>/adapted/<teacher.type>-<sha256(identity)[:12]>/
        sam_adapted.pth        the adapted weights, official segment-anything layout
        adapt_info.json        identity, train-split digest, timings, final losses
        metrics.jsonl          loss terms per logged iteration
        checkpoints/last.pth   resume state (deleted once sam_adapted.pth is written)

The cache fingerprint then takes the sha256 of ``sam_adapted.pth`` like any checkpoint, so a
new adaptation makes a new cache and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import Config, TeacherConfig

__all__ = [
    "ADAPTED_FILE",
    "adapt_identity",
    "adapted_dir",
    "effective_checkpoint",
    "effective_teacher",
]

ADAPTED_FILE = "sam_adapted.pth"


def adapt_identity(cfg: Config) -> dict[str, Any]:
    """Everything the adaptation depends on (the train split by its paths and data settings;
    a changed annotation file is caught by the workflow's timestamps and by the digest stored
    in ``adapt_info.json`` and the resume state)."""
    adapt = cfg.teacher_adapt.model_dump(mode="json")
    for key in ("enabled", "checkpoint_interval", "log_interval", "num_workers"):
        adapt.pop(key)  # do not change the result
    for key in ("hflip_prob", "vflip_prob"):
        if adapt[key] == 0:  # off draws nothing: adaptations from before these keys stay valid
            adapt.pop(key)
    teacher = cfg.teacher.model_dump(mode="json")
    return {
        "teacher_type": teacher["type"],
        "teacher_checkpoint": teacher["checkpoint"],
        "teacher_tiny": teacher["tiny"] if teacher["type"] == "sam_tiny" else None,
        "teacher_adapt": adapt,
        "data": {
            "dataset": cfg.data.dataset,
            "root": cfg.data.root,
            "train": cfg.data.train.model_dump(mode="json", by_alias=True),
            "synthetic": (
                cfg.data.synthetic.model_dump(mode="json", exclude={"num_unlabeled"})
                if cfg.data.dataset == "synthetic"
                else None
            ),
            # label-scarce: the teacher is adapted on the labelled subset only
            **(
                {"labeled": [cfg.data.labeled_fraction, cfg.data.labeled_seed]}
                if cfg.data.labeled_fraction < 1
                else {}
            ),
        },
    }


def adapted_dir(cfg: Config) -> Path:
    """The folder of the adapted teacher of ``cfg`` (whether or not it exists yet)."""
    digest = hashlib.sha256(json.dumps(adapt_identity(cfg), sort_keys=True).encode()).hexdigest()
    return Path(cfg.cache.root) / "adapted" / f"{cfg.teacher.type}-{digest[:12]}"


def effective_checkpoint(cfg: Config, *, require: bool = True) -> str | None:
    """The checkpoint the teacher is built from: the adapted weights when adaptation is on,
    else ``teacher.checkpoint`` (None = random weights).

    Raises:
      FileNotFoundError: adaptation is on, ``require`` is true and the adapted weights are
        missing (the message says which command makes them).
    """
    if not cfg.teacher_adapt.enabled:
        return cfg.teacher.checkpoint
    path = adapted_dir(cfg) / ADAPTED_FILE
    if require and not path.is_file():
        raise FileNotFoundError(
            f"teacher_adapt.enabled is true but the adapted teacher {path} does not exist; run "
            "`snakemake adapt_teacher` (or `python -m pipeline adapt-teacher --config ...`) first, "
            "or set teacher_adapt.enabled: false to use teacher.checkpoint as it is"
        )
    return str(path)


def effective_teacher(cfg: Config) -> TeacherConfig:
    """``cfg.teacher`` with ``checkpoint`` replaced by :func:`effective_checkpoint`."""
    return cfg.teacher.model_copy(update={"checkpoint": effective_checkpoint(cfg)})
