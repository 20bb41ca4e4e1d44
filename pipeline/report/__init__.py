"""Ablation report: results and provenance tables, figures, qualitative panels."""

from pipeline.report.figures import moving_average
from pipeline.report.report import (
    MeasureFn,
    ReportError,
    RunRecord,
    ablation_table,
    build_report,
    ensure_complexity,
    load_run,
    provenance_table,
    read_json,
    read_jsonl,
    student_complexity,
)

__all__ = [
    "MeasureFn",
    "ReportError",
    "RunRecord",
    "ablation_table",
    "build_report",
    "ensure_complexity",
    "load_run",
    "moving_average",
    "provenance_table",
    "read_json",
    "read_jsonl",
    "student_complexity",
]
