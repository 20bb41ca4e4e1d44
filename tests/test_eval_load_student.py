"""`load_student` reads a run's final.pth and its training checkpoint (last.pth), both with
torch.load(weights_only=True); anything else stops with a message naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.evaluation.run import load_student
from pipeline.models.student import build_student
from pipeline.training.checkpoint import (
    StudentFileError,
    UntrustedCheckpointError,
    rng_state,
    save_atomic,
)
from pipeline.training.trainer import progress_line

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = [
    {"id": 3, "name": "a", "isthing": 1, "color": [1, 2, 3], "train_id": 0},
    {"id": 7, "name": "b", "isthing": 0, "color": [4, 5, 6], "train_id": 1},
]


def training_checkpoint(path: Path, with_categories: bool = True):
    """What Trainer._state writes: TrainStep weights (student.*, criterion.*), optimizer,
    numpy/python/torch RNG states, config and categories."""
    cfg = load_config(ROOT / "configs/reg_sam/baseline.yaml")
    torch.manual_seed(1)
    student = build_student(cfg.model, len(CATEGORIES))
    model = {f"student.{k}": v for k, v in student.state_dict().items()}
    model["criterion.empty_weight"] = torch.ones(3)
    opt = torch.optim.AdamW(student.parameters())
    state = {
        "iteration": 7,
        "model": model,
        "optimizer": opt.state_dict(),
        "scheduler": {},
        "scaler": {},
        "rng": rng_state(),
        "skips": {},
        "config": cfg.to_dict(),
    }
    if with_categories:
        state["categories"] = CATEGORIES
    save_atomic(state, path)
    return student


def test_training_checkpoint_loads_the_student(tmp_path):
    student = training_checkpoint(tmp_path / "last.pth")
    loaded, cfg, cats = load_student(tmp_path / "last.pth")
    assert [c.name for c in cats] == ["a", "b"] and cfg.experiment == "baseline"
    for (k, a), (_, b) in zip(student.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_old_training_checkpoint_asks_for_final_pth(tmp_path):
    training_checkpoint(tmp_path / "last.pth", with_categories=False)
    with pytest.raises(StudentFileError, match=r"last.pth is a training checkpoint .*final.pth"):
        load_student(tmp_path / "last.pth")


def test_other_files_name_the_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(StudentFileError, match=r"cannot read model file .*junk.pth"):
        load_student(tmp_path / "junk.pth")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(
        StudentFileError, match=r"other.pth: missing key .*not an exported RegSAM student"
    ):
        load_student(tmp_path / "other.pth")

    class Evil:  # a pickled object is refused, not executed
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"student": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UntrustedCheckpointError, match="evil.pth"):
        load_student(tmp_path / "evil.pth")


def test_progress_line():
    record = {
        "lr": 0.00125,
        "loss": 3.5,
        "loss_cls": 1.25,
        "loss_dice": 2.25,
        "iter": 20,
        "data_time": 0.0123,
        "fusion_weights": [0.5, 0.5],
    }
    line = progress_line(record, it=20, max_iters=620, iters=10, seconds=4.0, elapsed=3725.0)
    assert line == (
        "iter 20/620  loss 3.5000 (loss_cls 1.2500 loss_dice 2.2500)  lr 1.25e-03  "
        "2.50 it/s, data 0.012 s/it  elapsed 1:02:05, ETA 0:04:00"
    )
    assert progress_line(record, 20, 620, 0, 0.0, 1.0).endswith("ETA ?")
