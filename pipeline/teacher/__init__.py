"""The SAM teacher: build and load it (sam_builder), run it once per image (extractor)."""

from pipeline.teacher.extractor import SegmentPrompt, TeacherExtractor, TeacherOutput
from pipeline.teacher.sam_builder import (
    TEACHER_SPECS,
    CheckpointError,
    TeacherSpec,
    build_teacher,
    default_layers,
    identify_checkpoint,
    sha256_file,
)

__all__ = [
    "CheckpointError",
    "SegmentPrompt",
    "TEACHER_SPECS",
    "TeacherExtractor",
    "TeacherOutput",
    "TeacherSpec",
    "build_teacher",
    "default_layers",
    "identify_checkpoint",
    "sha256_file",
]
