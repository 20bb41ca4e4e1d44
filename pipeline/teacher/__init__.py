"""The SAM teacher: sizes and digests (specs), build and load it (sam_builder), run it once per
image (extractor).

The names below are imported on first use (PEP 562), so that ``pipeline.teacher.specs`` and
``pipeline.teacher.adapted``, which Snakemake imports at DAG time, do not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "SegmentPrompt": "extractor",
    "TeacherExtractor": "extractor",
    "TeacherOutput": "extractor",
    "CheckpointError": "sam_builder",
    "build_teacher": "sam_builder",
    "default_layers": "sam_builder",
    "identify_checkpoint": "sam_builder",
    "TEACHER_SPECS": "specs",
    "TeacherSpec": "specs",
    "sha256_file": "specs",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
