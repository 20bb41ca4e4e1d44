"""Stage two with both distillations, reading targets from a real stage-one cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cache.reader import CacheNotFoundError
from pipeline.cache.runner import build_cache
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.models.student import build_student
from pipeline.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DISTILL_TERMS = (
    "loss_sr",
    "loss_fa",
    "loss_resolution_distill",
    "loss_feat_distill",
    "loss_cls_distill",
    "loss_mask_distill",
    "loss_sam_distill",
)


def overrides(tmp: Path, **extra) -> list[str]:
    ov = {
        "data.root": str(tmp / "data"),
        "cache.root": str(tmp / "cache"),
        "teacher_adapt.enabled": "false",
        "data.synthetic.num_train": 4,
        "data.synthetic.num_val": 1,
        "data.synthetic.image_size": "[64, 96]",
        "data.crop_size": "[64, 64]",
        "data.num_workers": 0,
        "model.neck.channels": 16,
        "model.head.num_queries": 6,
        "model.head.num_stages": 1,
        "model.head.ffn_dim": 32,
        "model.loss.num_points": 256,
        "model.resolution_distill.feat_channels": 8,
        "model.sam_distill.num_points": 128,
        "teacher.tiny.img_size": 128,
        "teacher.tiny.embed_dim": 32,
        "teacher.tiny.depth": 2,
        "teacher.tiny.global_attn_indexes": "[0, 1]",
        "cache.pca_samples": 2,
        "model.sam_distill.distill_feat_layers": "[0, 1]",
        "training.batch_size": 2,
        "training.max_iters": 3,
        "training.warmup_iters": 1,
        "training.checkpoint_interval": 3,
        "training.num_threads": 1,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    cfg = load_config(ROOT / "configs/reg_sam/regnet_distill.yaml", overrides(tmp))
    s = cfg.data.synthetic
    generate_synthetic_coco_panoptic(
        cfg.data.root, s.num_train, s.num_val, tuple(s.image_size), progress=False
    )
    build_cache(cfg, "train", n_workers=1, progress=False)
    return tmp, cfg


def test_all_distillations_train_from_the_cache(built):
    tmp, cfg = built
    work = tmp / "run"
    summary = Trainer(cfg, work, progress=False).train()
    assert summary["status"] == "done"
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    for term in DISTILL_TERMS:
        assert all(term in r and r[term] == r[term] for r in rows), term
    # the totals are the weighted sums of their logged parts
    rd = cfg.model.resolution_distill
    r = rows[-1]
    assert r["loss_resolution_distill"] == pytest.approx(
        rd.sr_loss_weight * r["loss_sr"] + rd.fa_loss_weight * r["loss_fa"], rel=1e-5
    )
    assert len(r["fusion_weights"]) == 4 and sum(r["fusion_weights"]) == pytest.approx(1, abs=1e-3)
    # TensorBoard (on by default) holds every loss term by its design name, and the fusion weights
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for term in ("loss", "loss_cls", "loss_mask", "loss_dice", "loss_iou") + DISTILL_TERMS:
        assert f"train/{term}" in scalars, term
        assert [e.value for e in acc.Scalars(f"train/{term}")] == pytest.approx(
            [row[term] for row in rows]
        ), term
    assert {"fusion/stride4", "fusion/stride32", "train/grad_norm", "train/lr"} <= scalars
    info = json.loads((work / "run_info.json").read_text())
    assert len(info["cache_fingerprint"]) == 64
    # the exported student carries no distillation module: same keys as a fresh student
    exported = torch.load(work / "final.pth", weights_only=True)["student"]
    fresh = build_student(cfg.model, num_classes=5).state_dict()
    assert exported.keys() == fresh.keys()
    assert all(exported[k].shape == fresh[k].shape for k in fresh)


def test_missing_cache_says_to_run_cache_teacher(built):
    tmp, cfg = built
    other = load_config(
        ROOT / "configs/reg_sam/regnet_distill.yaml",
        overrides(tmp, **{"cache.root": str(tmp / "nowhere")}),
    )
    with pytest.raises(CacheNotFoundError, match="snakemake cache_teacher"):
        Trainer(other, tmp / "run2", progress=False).train()


def test_changed_teacher_never_reuses_the_cache(built):
    tmp, cfg = built
    # a different teacher setting gives a different cache path, which does not exist yet
    other = load_config(
        ROOT / "configs/reg_sam/regnet_distill.yaml",
        overrides(tmp, **{"teacher.points_per_stuff": 5}),
    )
    with pytest.raises(CacheNotFoundError, match="missing"):
        Trainer(other, tmp / "run3", progress=False).train()
    # a student-only change reuses it
    student_only = load_config(
        ROOT / "configs/reg_sam/regnet_distill.yaml",
        overrides(tmp, **{"model.sam_distill.temperature": 2.0, "training.max_iters": 1}),
    )
    assert Trainer(student_only, tmp / "run4", progress=False).train()["status"] == "done"


def test_distill_warmup_ramps_the_distillation_terms_of_the_total(built):
    tmp, cfg = built
    cfg = load_config(
        ROOT / "configs/reg_sam/regnet_distill.yaml",
        overrides(tmp, **{"training.distill_warmup_iters": 2}),
    )
    work = tmp / "run_warmup"
    assert Trainer(cfg, work, progress=False).train()["status"] == "done"
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    # factor min(1, it / 2) at the 0-based iterations 0, 1, 2; logged only while below 1
    assert [r.get("distill_scale") for r in rows] == [0.0, 0.5, None]
    for r, scale in zip(rows, (0.0, 0.5, 1.0)):
        task = r["loss_cls"] + r["loss_mask"] + r["loss_dice"] + r["loss_iou"]
        distill = r["loss_resolution_distill"] + r["loss_sam_distill"]
        assert distill > 0.01  # the terms are computed (and logged unscaled) all along
        assert r["loss"] == pytest.approx(task + scale * distill, rel=1e-5)
