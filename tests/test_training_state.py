"""Training state on disk: no non-finite weights saved, older checkpoints kept as a fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.training.checkpoint import CheckpointReadError, load_checkpoint
from pipeline.training.trainer import NonFiniteParameterError, Trainer

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(data_root: Path, *extra: str):
    return load_config(
        ROOT / "configs/reg_sam/baseline.yaml",
        [
            f"data.root={data_root}",
            "data.crop_size=[64, 64]",
            "data.num_workers=0",
            "model.neck.channels=16",
            "model.head.num_queries=4",
            "model.head.num_stages=1",
            "model.head.ffn_dim=32",
            "model.loss.num_points=64",
            "training.batch_size=2",
            "training.max_iters=4",
            "training.warmup_iters=1",
            "training.checkpoint_interval=1",
            "training.num_threads=1",
            *extra,
        ],
    )


def all_finite(state: dict) -> bool:
    tensors = list(state["model"].values())
    for st in state["optimizer"]["state"].values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_huge_learning_rate_never_saves_non_finite_weights(tmp_path, data_root):
    """lr=inf without warm-up (the issue's case; check-config refuses it, so it is set past the
    validation here) turns weights into inf/NaN in the first step: the run stops there naming
    iteration 1 and a parameter, and writes no checkpoint."""
    work = tmp_path / "run"
    cfg = cfg_for(data_root, "training.warmup_iters=0", "training.grad_clip=null")
    cfg.training = cfg.training.model_copy(update={"lr": float("inf")})
    with pytest.raises(NonFiniteParameterError, match=r"iteration 1: student\.\S+ is not finite"):
        Trainer(cfg, work, progress=False).train()
    assert not (work / "checkpoints" / "last.pth").exists()


def test_non_finite_step_keeps_the_last_good_checkpoint(tmp_path, data_root, monkeypatch):
    """A step that poisons one weight at iteration 3: the error names it and the iteration, and
    the checkpoint on disk stays the finite one of iteration 2."""
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[-1]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    work = tmp_path / "run"
    with pytest.raises(NonFiniteParameterError, match=r"iteration 3: \S+ is not finite") as info:
        Trainer(cfg_for(data_root), work, progress=False).train()
    assert "1 of" in str(info.value)
    state = load_checkpoint(work / "checkpoints" / "last.pth")
    assert state["iteration"] == 2 and all_finite(state)


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, data_root, caplog):
    """keep_checkpoints=2 (default): a truncated last.pth is set aside with a warning and the run
    resumes from last.1.pth, ending with the weights of an uninterrupted run."""
    clean = tmp_path / "clean"
    Trainer(cfg_for(data_root), clean, progress=False).train()
    work = tmp_path / "run"
    Trainer(cfg_for(data_root), work, progress=False, stop_at=3).train()
    ckpt = work / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["last.1.pth", "last.pth"]
    assert load_checkpoint(ckpt / "last.1.pth")["iteration"] == 2
    last = ckpt / "last.pth"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # torn by a full disk
    with caplog.at_level(logging.WARNING):
        summary = Trainer(cfg_for(data_root), work, progress=False).train()
    assert summary["status"] == "done"
    assert "falling back to the previous checkpoint" in caplog.text and "last.pth" in caplog.text
    assert (ckpt / "last.pth.unreadable").exists()
    a = load_checkpoint(clean / "checkpoints" / "last.pth")["model"]
    b = load_checkpoint(last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x)["iter"] for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]


def test_keep_checkpoints_limits_the_files(tmp_path, data_root):
    work = tmp_path / "run"
    Trainer(cfg_for(data_root, "training.keep_checkpoints=3"), work, progress=False).train()
    ckpt = work / "checkpoints"
    got = {p.name: load_checkpoint(p)["iteration"] for p in ckpt.glob("*.pth")}
    assert got == {"last.pth": 4, "last.1.pth": 3, "last.2.pth": 2}


def test_no_readable_checkpoint_says_no_resume(tmp_path, data_root):
    work = tmp_path / "run"
    Trainer(cfg_for(data_root), work, progress=False, stop_at=2).train()
    for p in (work / "checkpoints").glob("*.pth"):
        p.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointReadError, match="--no-resume"):
        Trainer(cfg_for(data_root), work, progress=False).train()
    assert (
        Trainer(cfg_for(data_root), work, resume=False, progress=False).train()["status"] == "done"
    )


def test_finiteness_screen_is_exact():
    """The fused norm screen overflows on huge finite weights; the per-tensor scan then decides."""
    from pipeline.training.trainer import first_non_finite

    huge = [("a", torch.ones(3)), ("b", torch.tensor([1e30, -3e38]))]
    assert first_non_finite(iter(huge)) == (None, 0, 2)
    bad = [
        ("a", torch.ones(3)),
        ("c", torch.tensor([1.0, float("nan")])),
        ("d", torch.tensor([float("-inf")])),
        ("i", torch.arange(3)),
    ]
    assert first_non_finite(iter(bad)) == ("c", 2, 3)
