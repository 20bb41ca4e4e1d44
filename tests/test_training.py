"""The training loop: exact resume after a kill, non-finite losses, sampler, schedule, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.training.checkpoint import load_checkpoint
from pipeline.training.schedule import lr_factor
from pipeline.training.trainer import NonFiniteLossError, ResumableBatchSampler, Trainer

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, **extra) -> list[str]:
    ov = {
        "data.root": str(data_root),
        "data.crop_size": "[64, 64]",
        "data.test_size": 64,
        "data.num_workers": 0,
        "model.neck.channels": 16,
        "model.head.num_queries": 6,
        "model.head.num_stages": 1,
        "model.head.ffn_dim": 32,
        "model.loss.num_points": 256,
        "training.batch_size": 2,
        "training.max_iters": 6,
        "training.warmup_iters": 2,
        "training.checkpoint_interval": 2,
        "training.log_interval": 1,
        "training.num_threads": 1,
    }
    ov.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco_panoptic(
        root, num_train=6, num_val=2, image_size=(64, 64), seed=3, progress=False
    )
    return root


def cfg_for(data_root: Path, **extra):
    return load_config(ROOT / "configs/reg_sam/baseline.yaml", tiny_overrides(data_root, **extra))


def weights(work: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(work / "checkpoints" / "last.pth")["model"]


def test_lr_schedule_values():
    assert lr_factor(0, 100, 10, "poly", warmup_start=0.0) == 0.0
    assert lr_factor(5, 100, 10, "poly", warmup_start=0.0) == pytest.approx(0.5)
    assert lr_factor(10, 100, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "poly", power=1.0) == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(20, 100, 10, "step")


def test_sampler_positions_epochs_and_ranks():
    s = ResumableBatchSampler(5, 2, seed=1, start_iter=0, max_iters=5)
    stream = [k for b in s for k in b]
    epochs = [k // 5 for k in stream]
    assert epochs == [0] * 5 + [1] * 5  # each epoch is a full permutation
    assert sorted(k % 5 for k in stream[:5]) == list(range(5))
    # resuming at iteration 3 yields exactly the tail of the stream
    tail = [k for b in ResumableBatchSampler(5, 2, 1, 3, 5) for k in b]
    assert tail == stream[6:]
    # two ranks split every global batch without overlap
    r0 = [b for b in ResumableBatchSampler(8, 2, 1, 0, 4, rank=0, world_size=2)]
    r1 = [b for b in ResumableBatchSampler(8, 2, 1, 0, 4, rank=1, world_size=2)]
    for a, b in zip(r0, r1):
        assert not set(a) & set(b)


def test_resume_equals_uninterrupted_run(tmp_path, data_root):
    full = tmp_path / "full"
    Trainer(cfg_for(data_root), full, progress=False).train()
    # the interrupted run also evaluates every 3 iterations: neither the evaluations nor the
    # resume may change a single bit of the weights
    with_eval = {"training.eval_interval": 3}
    part = tmp_path / "part"
    Trainer(cfg_for(data_root, **with_eval), part, progress=False, stop_at=4).train()
    assert load_checkpoint(part / "checkpoints/last.pth")["iteration"] == 4
    # same run directory, continued to 6 iterations: model, optimizer, schedule, RNG, data order
    Trainer(cfg_for(data_root, **with_eval), part, progress=False).train()
    evals = [json.loads(x) for x in (part / "evaluations.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals] == [3, 6]
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lb] == list(range(1, 7))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    for term in ("loss_cls", "loss_mask", "loss_dice", "loss_iou", "lr"):
        assert term in la[0]
    # the stored resolved config reproduces the run's config exactly
    assert load_config(part / "config.yaml") == cfg_for(data_root, **with_eval)
    info = json.loads((part / "run_info.json").read_text())
    assert info["status"] == "done" and info["iterations"] == 6 and info["seed"] == 0
    exported = torch.load(part / "final.pth", weights_only=True)
    assert set(exported) == {"student", "config", "categories"}


def test_sigkill_then_resume_matches(tmp_path, data_root):
    """Kill -9 a training process mid-run; the rerun continues and ends where a clean run ends."""
    ov = tiny_overrides(
        data_root,
        **{
            "training.max_iters": 10,
            "training.checkpoint_interval": 1,
            "data.num_workers": 2,
            "training.eval_interval": 2,
        },
    )
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        "--config",
        str(ROOT / "configs/reg_sam/baseline.yaml"),
        "--no-progress",
    ]
    for o in ov:
        args += ["-o", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        args + ["--work-dir", str(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = killed / "checkpoints" / "last.pth"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists():
            try:
                if load_checkpoint(ckpt)["iteration"] >= 3:
                    break
            except RuntimeError:
                pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = load_checkpoint(ckpt)["iteration"]
    assert 3 <= done_at_kill < 10, "the kill should land mid-run"
    assert (
        subprocess.run(
            args + ["--work-dir", str(killed)], cwd=ROOT, env=env, capture_output=True
        ).returncode
        == 0
    )
    clean = tmp_path / "clean"
    assert (
        subprocess.run(
            args + ["--work-dir", str(clean)], cwd=ROOT, env=env, capture_output=True
        ).returncode
        == 0
    )
    a, b = weights(clean), weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iter"] for x in lines] == list(range(1, 11))
    # evaluations ran in both (every 2 iterations) and agree, best.pth included
    evals = [(killed / "evaluations.jsonl").read_text(), (clean / "evaluations.jsonl").read_text()]
    assert [json.loads(x)["iter"] for x in evals[0].splitlines()] == [2, 4, 6, 8, 10]
    assert evals[0] == evals[1]
    best = [torch.load(w / "best.pth", weights_only=True)["student"] for w in (killed, clean)]
    assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])


def _event_tags(log_dir: Path) -> dict[str, set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": set(tags["scalars"]), "images": set(tags["images"])}


def test_evaluation_during_training_writes_pq_best_and_tensorboard(tmp_path, data_root):
    work = tmp_path / "evals"
    cfg = cfg_for(data_root, **{"training.eval_interval": 2, "evaluation.num_visualize": 1})
    summary = Trainer(cfg, work, progress=False).train()
    evals = [json.loads(x) for x in (work / "evaluations.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals] == [2, 4, 6]
    for e in evals:
        assert 0.0 <= e["PQ"] <= 100.0 and {
            "SQ",
            "RQ",
            "PQ_things",
            "PQ_stuff",
            "AP",
            "mIoU",
        } <= set(e)
    best = max(evals, key=lambda e: e["PQ"])  # the first of equal PQs wins
    assert summary["best"] == {"iteration": best["iter"], "pq": best["PQ"], "path": "best.pth"}
    assert json.loads((work / "run_info.json").read_text())["best"]["iteration"] == best["iter"]
    metrics = json.loads((work / "evaluations" / "iter_0000004" / "metrics.json").read_text())
    assert metrics["All"]["pq"] == evals[1]["PQ"] and metrics["settings"]["iteration"] == 4
    exported = torch.load(work / "best.pth", weights_only=True)
    assert set(exported) == {"student", "config", "categories"}
    # TensorBoard beside the JSONL: every loss term, lr, grad norm, times, PQ and panels
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)
    tags = _event_tags(work / "tensorboard")
    terms = [k for k in rows[0] if k.startswith("loss")]
    assert {"loss", "loss_cls", "loss_mask", "loss_dice", "loss_iou"} <= set(terms)
    for tag in [f"train/{t}" for t in terms] + [
        "train/lr",
        "train/grad_norm",
        "time/iteration",
        "time/data",
        "val/PQ",
        "val/PQ_things",
        "val/PQ_stuff",
        "val/SQ",
        "val/RQ",
        "val/mIoU",
    ]:
        assert tag in tags["scalars"], tag
    assert any(t.startswith("val/panel/") for t in tags["images"])


def test_tensorboard_can_be_switched_off(tmp_path, data_root):
    work = tmp_path / "quiet"
    Trainer(
        cfg_for(data_root, **{"training.max_iters": 1, "training.tensorboard": "false"}),
        work,
        progress=False,
    ).train()
    assert not (work / "tensorboard").exists() and not (work / "best.pth").exists()


def test_non_finite_loss_names_term_and_keeps_checkpoint(tmp_path, data_root, monkeypatch):
    from pipeline.losses import criterion as crit

    original = crit.SetCriterion.forward
    calls = {"n": 0}

    def poisoned(self, outputs, targets):
        losses, indices = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses, indices

    monkeypatch.setattr(crit.SetCriterion, "forward", poisoned)
    work = tmp_path / "nan"
    cfg = cfg_for(data_root, **{"training.checkpoint_interval": 1})
    with pytest.raises(NonFiniteLossError, match=r"loss_dice is nan at iteration 2"):
        Trainer(cfg, work, progress=False).train()
    state = load_checkpoint(work / "checkpoints" / "last.pth")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (work / "final.pth").exists()


def test_init_from_rejects_weights_of_another_student(tmp_path, data_root):
    work = tmp_path / "a"
    Trainer(cfg_for(data_root, **{"training.max_iters": 1}), work, progress=False).train()
    cfg = cfg_for(
        data_root, **{"training.init_from": str(work / "final.pth"), "model.neck.channels": 24}
    )
    with pytest.raises(RuntimeError, match="do not fit this student"):
        Trainer(cfg, tmp_path / "b", progress=False).train()


def test_ddp_two_processes_on_cpu(tmp_path, data_root):
    """torchrun with 2 gloo processes: ranks see disjoint data, rank 0 writes one run."""
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free port: test files run in parallel (pytest-xdist)
        "-m",
        "pipeline",
        "train",
        "--config",
        str(ROOT / "configs/reg_sam/baseline.yaml"),
        "--work-dir",
        str(tmp_path / "ddp"),
        "--no-progress",
    ]
    for o in tiny_overrides(data_root, **{"training.max_iters": 3, "training.eval_interval": 2}):
        args += ["-o", o]
    res = subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "done"
    rows = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["iter"] for r in rows] == [1, 2, 3]  # rank 0 alone writes
    exported = torch.load(tmp_path / "ddp" / "final.pth", weights_only=True)["student"]
    assert not any(k.startswith("module.") for k in exported)
    # rank 0 evaluated alone (at 2 and at the end) while rank 1 waited, and kept best.pth
    evals = (tmp_path / "ddp" / "evaluations.jsonl").read_text().splitlines()
    assert [json.loads(e)["iter"] for e in evals] == [2, 3]
    assert (tmp_path / "ddp" / "best.pth").is_file()


def test_init_from_starts_from_the_previous_stage(tmp_path, data_root):
    """Progressive training: a stage starts from the previous stage's exported student."""
    first = tmp_path / "stage0"
    Trainer(cfg_for(data_root, **{"training.max_iters": 2}), first, progress=False).train()
    prev = torch.load(first / "final.pth", weights_only=True)["student"]
    cfg = cfg_for(
        data_root,
        **{"training.init_from": str(first / "final.pth"), "model.use_learnable_fusion": "true"},
    )
    trainer = Trainer(cfg, tmp_path / "stage1", progress=False)
    trainer.build()
    start = trainer.step_module.student.state_dict()
    shared = [k for k in prev if "fusion" not in k]
    assert shared and all(torch.equal(start[k], prev[k]) for k in shared)
