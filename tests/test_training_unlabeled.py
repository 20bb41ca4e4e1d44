"""Mixed labelled/unlabelled training: the mixed sampler, exact resume, and the default
(``training.unlabeled_ratio: 0``) left unchanged."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.cache.runner import build_cache
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.training.trainer import (
    UNLABELED_STREAM,
    MixedBatchSampler,
    ResumableBatchSampler,
    Trainer,
)

ROOT = Path(__file__).resolve().parents[1]
TEACHER = [
    "teacher_adapt.enabled=false",
    "teacher.tiny={img_size: 64, embed_dim: 32, depth: 4, num_heads: 2, "
    "global_attn_indexes: [1, 3], window_size: 4}",
    "cache.pca_samples=4",
    "cache.channels=16",
    "cache.mask_size=16",
    "cache.max_segments=8",
    "teacher.automatic={points_per_side: 4, points_per_batch: 16, pred_iou_thresh: 0.0, "
    "stability_score_thresh: 0.0, stability_score_offset: 1.0, box_nms_thresh: 0.99}",
    "data.unlabeled=[unlabeled]",
    "data.labeled_fraction=0.5",
]
STUDENT = [
    "data.crop_size=[64, 64]",
    "data.test_size=64",
    "data.num_workers=0",
    "model.neck.channels=16",
    "model.head.num_queries=6",
    "model.head.num_stages=1",
    "model.head.ffn_dim=32",
    "model.loss.num_points=256",
    "model.sam_distill.num_points=64",
    "model.sam_distill.distill_feat_layers=[0, 1]",
    "model.sam_distill.unlabeled_min_confidence=0.0",
    "training.batch_size=4",
    "training.max_iters=4",
    "training.warmup_iters=1",
    "training.checkpoint_interval=2",
    "training.log_interval=1",
    "training.num_threads=1",
    "training.tensorboard=false",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    root = tmp / "data"
    generate_synthetic_coco_panoptic(
        root, num_train=6, num_val=2, image_size=(64, 64), seed=3, progress=False, num_unlabeled=3
    )
    common = [f"data.root={root}", f"cache.root={tmp / 'cache'}", *TEACHER, *STUDENT]
    cfg = load_config(ROOT / "configs/reg_sam/baseline.yaml", common)
    build_cache(cfg, "train", n_workers=1, progress=False)
    build_cache(cfg, "unlabeled", n_workers=1, progress=False)
    return common


def cfg_for(common, *extra):
    return load_config(ROOT / "configs/reg_sam/baseline.yaml", [*common, *extra])


MIXED = ("model.use_sam_distill=true", "training.unlabeled_ratio=0.5")


def weights(work: Path) -> dict[str, torch.Tensor]:
    return torch.load(work / "final.pth", weights_only=True)["student"]


def test_mixed_sampler_is_a_pure_function_of_the_iteration():
    s = MixedBatchSampler(
        5, 3, batch_size=4, unlabeled_per_batch=1, seed=7, start_iter=0, max_iters=6
    )
    batches = list(s)
    assert all(len(b) == 4 and isinstance(b[3], tuple) and b[3][0] == "u" for b in batches)
    assert all(not isinstance(k, tuple) for b in batches for k in b[:3])
    late = MixedBatchSampler(
        5, 3, batch_size=4, unlabeled_per_batch=1, seed=7, start_iter=4, max_iters=6
    )
    assert list(late) == batches[4:]
    # labelled stream: exactly the labelled-only sampler's with batch 3
    plain = ResumableBatchSampler(5, 3, seed=7, start_iter=0, max_iters=6)
    assert [b[:3] for b in batches] == list(plain)
    # unlabelled stream: every image once per epoch, its own permutation
    u = [b[3][1] for b in batches]
    assert sorted(k % 3 for k in u[:3]) == [0, 1, 2] and [k // 3 for k in u] == [0] * 3 + [1] * 3
    with pytest.raises(ValueError, match="unlabeled_per_batch"):
        MixedBatchSampler(5, 3, 4, 4, 0, 0, 1)


def test_mixed_sampler_shards_both_streams_across_ranks():
    """Under DDP (world size 2) the two ranks of an iteration take consecutive, disjoint parts of
    each stream: together they are the one-process batch of twice the size, labelled and
    unlabelled alike, so no image is seen twice within a step and resuming stays exact."""
    W, B, B_u, N_l, N_u = 2, 4, 1, 7, 5
    ranks = [
        MixedBatchSampler(N_l, N_u, B, B_u, seed=3, start_iter=0, max_iters=9, rank=r, world_size=W)
        for r in range(W)
    ]
    labelled = ResumableBatchSampler(N_l, W * (B - B_u), seed=3, start_iter=0, max_iters=9)
    unlabelled = ResumableBatchSampler(
        N_u, W * B_u, seed=3, start_iter=0, max_iters=9, stream=UNLABELED_STREAM
    )
    for it in range(9):
        parts = [s.batch_at(it) for s in ranks]
        assert parts[0][: B - B_u] + parts[1][: B - B_u] == labelled.batch_at(it)
        assert [k for _, k in parts[0][B - B_u :] + parts[1][B - B_u :]] == unlabelled.batch_at(it)
        # labelled keys epoch * N + index: within a step the ranks never share an image of an epoch
        keys = parts[0][: B - B_u] + parts[1][: B - B_u]
        assert len(set(keys)) == len(keys)
    # a resumed rank continues its own shard
    late = MixedBatchSampler(
        N_l, N_u, B, B_u, seed=3, start_iter=5, max_iters=9, rank=1, world_size=W
    )
    assert list(late) == [ranks[1].batch_at(it) for it in range(5, 9)]


def test_mixed_training_resumes_exactly(setup, tmp_path):
    full = tmp_path / "full"
    Trainer(cfg_for(setup, *MIXED), full, progress=False).train()
    part = tmp_path / "part"
    out = Trainer(cfg_for(setup, *MIXED), part, progress=False, stop_at=2).train()
    assert out["status"] == "stopped"
    Trainer(cfg_for(setup, *MIXED), part, progress=False).train()
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(ln) for ln in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 4]
    for r in records:  # the new terms are logged and part of the total
        assert {"loss_feat_distill_unlabeled", "loss_sam_distill_unlabeled"} <= set(r)
    resumed = [json.loads(ln) for ln in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records]
    info = json.loads((full / "run_info.json").read_text())
    assert info["unlabeled_images"] == 6 and info["unlabeled_cache_fingerprint"]


def test_ratio_zero_leaves_training_unchanged(setup, tmp_path):
    """With unlabeled_ratio 0 the unlabelled images (and their cache) play no part: the same
    weights as a config without them."""
    cfg = cfg_for(setup, "training.max_iters=2")
    plain = cfg.model_copy(deep=True)
    plain.data.unlabeled = []
    Trainer(cfg, tmp_path / "a", progress=False).train()
    Trainer(plain, tmp_path / "b", progress=False).train()
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_unlabelled_term_stops_training(setup, tmp_path, monkeypatch):
    from pipeline.models.sam_distill import SamDistiller
    from pipeline.training.trainer import NonFiniteLossError

    real = SamDistiller.forward_unlabeled

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out["loss_mask_distill_unlabeled"] = out["loss_mask_distill_unlabeled"] * float("nan")
        return out

    monkeypatch.setattr(SamDistiller, "forward_unlabeled", poisoned)
    with pytest.raises(NonFiniteLossError, match="loss_mask_distill_unlabeled.*iteration 0"):
        Trainer(cfg_for(setup, *MIXED), tmp_path / "nan", progress=False).train()
