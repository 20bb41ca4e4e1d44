"""One function turns a device setting into a device; one loads an exported student."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", 0) == torch.device("cuda:0")
    else:
        assert resolve_device("auto", 3) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        resolve_device("gpu0")


def test_evaluation_and_report_do_not_import_training():
    code = (
        "import sys, pipeline.evaluation.run, pipeline.report.report; "
        "print([m for m in sys.modules if m.startswith('pipeline.training')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_exported_student_round_trip_and_errors(tmp_path):
    from pipeline.config import load_config
    from pipeline.export import ExportError, export_blob, load_exported_student
    from pipeline.models.student import build_student
    from pipeline.training.checkpoint import save_atomic

    cfg = load_config(
        ROOT / "configs/base.yaml", ["model.neck.channels=16", "model.head.ffn_dim=32"]
    )
    cats = [{"id": 1, "name": "a", "isthing": 1, "color": [1, 2, 3], "train_id": 0}]
    student = build_student(cfg.model, 1)
    path = tmp_path / "final.pth"
    save_atomic(export_blob(student, cfg, [SimpleNamespace(**c) for c in cats]), path)
    loaded = load_exported_student(path)
    assert loaded.config == cfg and vars(loaded.categories[0]) == cats[0]
    assert not loaded.student.training
    state = student.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.student.state_dict().items())
    torch.save({"student": state, "config": "{}"}, tmp_path / "bad.pth")
    with pytest.raises(ExportError, match=r"bad\.pth: missing key 'categories'"):
        load_exported_student(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_exported_student(tmp_path / "nope.pth")
