"""ResolutionDistiller and SamDistiller with a small stand-in student."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.geometry import hflip_matrix, scale_matrix, translate_matrix
from pipeline.losses.distill import cls_distill_loss, feat_distill_loss, mask_distill_loss
from pipeline.losses.fa_loss import fa_loss
from pipeline.models.resolution_distill import ResolutionDistiller, SRDecoder
from pipeline.models.sam_distill import SamDistiller
from pipeline.training.teacher_targets import batch_warp_teacher_targets


class StandInStudent(nn.Module):
    """The student contract of docs/architecture.md at toy size: 4 neck levels (strides 4..32),
    stride-4 mask features, a query head with dot-product masks."""

    def __init__(self, channels: int = 16, num_classes: int = 3, num_queries: int = 5):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 4, stride=4), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.down = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(3)
        )
        self.mask_proj = nn.Conv2d(channels, channels, 1)
        self.queries = nn.Parameter(torch.randn(num_queries, channels))
        self.cls = nn.Linear(channels, num_classes + 1)
        self.iou = nn.Linear(channels, 1)

    def forward_features(self, images):
        assert images.shape[-1] % 4 == 0 and images.shape[-2] % 4 == 0, images.shape
        levels = [self.stem(images)]
        for conv in self.down:
            levels.append(conv(levels[-1]))
        return {
            "neck_features": levels,
            "mask_features": self.mask_proj(levels[0]),
            "fusion_weights": None,
        }

    def forward_head(self, feats):
        mf = feats["mask_features"]
        q = self.queries[None] + mf.mean((2, 3))[:, None]  # [B, Q, C]
        return {
            "pred_logits": self.cls(q),
            "pred_masks": torch.einsum("bqc,bchw->bqhw", q, mf),
            "pred_iou": self.iou(q)[..., 0],
            "aux_outputs": [],
        }

    def forward(self, images):
        feats = self.forward_features(images)
        return {**feats, **self.forward_head(feats)}


def _student(seed: int = 0) -> StandInStudent:
    torch.manual_seed(seed)
    return StandInStudent()


def _res_distiller(**kw) -> ResolutionDistiller:
    args = dict(
        in_channels=16,
        feat_channels=8,
        sr_loss_weight=0.5,
        fa_loss_weight=2.0,
        fa_subscale=0.25,
        lr_scale=0.5,
        mask_stride=4,
    )
    args.update(kw)
    torch.manual_seed(1)
    return ResolutionDistiller(**args)


# ----------------------------------------------------------------- resolution distillation
def test_sr_decoder_shapes():
    dec = SRDecoder(in_channels=8, feat_channels=4, upscale=8)
    assert dec(torch.randn(2, 8, 5, 6)).shape == (2, 3, 40, 48)
    # two 3x3 convs (no bias) + BN, then the 1x1 sub-pixel projection with bias
    expected = 8 * 4 * 9 + 2 * 4 + 4 * 4 * 9 + 2 * 4 + 4 * 3 * 64 + 3 * 64
    assert sum(p.numel() for p in dec.parameters()) == expected
    with pytest.raises(ValueError, match="upscale"):
        SRDecoder(in_channels=8, feat_channels=4, upscale=0)


def test_resolution_losses_follow_their_definitions():
    student, distiller = _student(), _res_distiller()
    images = torch.randn(2, 3, 64, 64)
    feats = student.forward_features(images)
    state = copy.deepcopy(student.state_dict())
    out = distiller(student, images, feats)

    # reference: the same computation spelled out (student restored: BN stats moved in train mode)
    student.load_state_dict(state)
    small = F.interpolate(
        images, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True
    )
    lr_feat = student.forward_features(small)["mask_features"]  # [2, 16, 8, 8]
    recon = distiller.sr_decoder(lr_feat)
    assert recon.shape == images.shape
    torch.testing.assert_close(out["loss_sr"], F.mse_loss(recon, images))
    up = F.interpolate(lr_feat, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["loss_fa"], fa_loss(up, feats["mask_features"], 0.25))
    torch.testing.assert_close(
        out["loss_resolution_distill"], 0.5 * out["loss_sr"] + 2.0 * out["loss_fa"]
    )
    assert out["loss_fa"].item() > 0 and out["loss_sr"].item() > 0


def test_resolution_gradients_skip_the_high_resolution_target():
    student, distiller = _student(), _res_distiller()
    images = torch.randn(2, 3, 64, 64)
    feats = student.forward_features(images)
    feats["mask_features"].retain_grad()
    out = distiller(student, images, feats)
    out["loss_resolution_distill"].backward()
    assert feats["mask_features"].grad is None  # the HR path is the (detached) target
    assert all(p.grad is not None for p in distiller.sr_decoder.parameters())
    assert student.stem[0].weight.grad.abs().sum() > 0  # reached through the LR path
    assert student.cls.weight.grad is None  # the head does not run on the LR path


def test_resolution_distiller_leaves_the_student_unchanged():
    student, reference = _student(), _student()  # identical initialisation
    fresh = {k: v.shape for k, v in reference.state_dict().items()}
    distiller = _res_distiller()
    images = torch.randn(2, 3, 64, 64)
    out = distiller(student, images, student.forward_features(images))
    out["loss_resolution_distill"].backward()

    # same state-dict keys and shapes, same parameter count: the decoder is not in the student
    assert {k: v.shape for k, v in student.state_dict().items()} == fresh
    assert sum(p.numel() for p in student.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    assert all(k.startswith("sr_decoder.") for k in distiller.state_dict())
    assert sum(p.numel() for p in distiller.parameters()) == sum(
        p.numel() for p in distiller.sr_decoder.parameters()
    )
    # the student's forward does not route through the distiller: with equal weights (the LR
    # pass moved BN running stats in train mode, so copy them), outputs are identical
    reference.load_state_dict(student.state_dict())
    student.eval(), reference.eval()
    a, b = student(images), reference(images)
    assert torch.equal(a["pred_masks"], b["pred_masks"])
    assert torch.equal(a["pred_logits"], b["pred_logits"])


def test_resolution_low_resolution_padding_and_odd_scales():
    # 160 px -> 80 px: by default no padding (the student takes any size), 20 mask cells
    # decoded x8 back to 160
    distiller = _res_distiller()
    small, (h, w) = distiller.low_resolution(torch.randn(1, 3, 160, 96))
    assert small.shape[-2:] == (80, 48) and (h, w) == (80, 48)
    # optional padding to a multiple: zeros bottom/right, content size reported
    padded = _res_distiller(size_divisibility=32)
    small, (h, w) = padded.low_resolution(torch.randn(1, 3, 160, 96))
    assert small.shape[-2:] == (96, 64) and (h, w) == (80, 48)
    assert torch.all(small[..., 80:, :] == 0)
    student = _student()
    images = torch.randn(2, 3, 160, 160)
    out = distiller(student, images, student.forward_features(images))
    assert all(torch.isfinite(v) for v in out.values())
    # lr_scale 0.3: upscale round(4 / 0.3) = 13, reconstruction resized to the input size
    odd = _res_distiller(lr_scale=0.3)
    assert odd.sr_decoder.upscale == 13
    out = odd(student, images, student.forward_features(images))
    assert torch.isfinite(out["loss_resolution_distill"])
    with pytest.raises(ValueError, match="lr_scale"):
        _res_distiller(lr_scale=1.0)


# ------------------------------------------------------------------------ SAM distillation
K = 3


def _cache_item(seed, segment_ids, orig_size=(64, 48), channels=(6, 10), sizes=(16, 8)):
    g = torch.Generator().manual_seed(seed)
    m = len(segment_ids)
    return {
        "features": [torch.randn(c, s, s, generator=g) for c, s in zip(channels, sizes)],
        "level_names": ["a", "b"],
        "segment_ids": torch.tensor(segment_ids, dtype=torch.int64),
        "mask_logits": torch.randn(m, 16, 16, generator=g) * 3,
        "iou": torch.rand(m, generator=g),
        "embeddings": torch.randn(m, 256, generator=g),
        "cls_logits": torch.randn(m, K, generator=g) * 2,
        "scale": 64 / max(orig_size),
        "input_size": 64,
        "orig_size": orig_size,
    }


def _sam_setup(num_points=10_000):
    torch.manual_seed(0)
    student = StandInStudent(num_classes=K)
    distiller = SamDistiller(
        student_channels=[16] * 4,
        teacher_channels=[6, 10],
        distill_feat_layers=[0, 1],
        feat_distill_weight=0.7,
        output_distill_weight=1.5,
        temperature=2.0,
        num_points=num_points,
    )
    images = torch.randn(2, 3, 64, 64)
    feats = student.forward_features(images)
    outputs = student.forward_head(feats)
    items = [_cache_item(1, [20, 99, 10]), _cache_item(2, [5, 6])]
    transforms = [translate_matrix(-4, 0) @ scale_matrix(1.2, 1.2) @ hflip_matrix(48), np.eye(3)]
    sizes = distiller.level_sizes([f.shape[-2:] for f in feats["neck_features"]])
    teacher = batch_warp_teacher_targets(
        items, transforms, (64, 64), sizes, outputs["pred_masks"].shape[-2:]
    )
    targets = [{"segment_ids": torch.tensor([10, 20, 30])}, {"segment_ids": torch.tensor([6, 7])}]
    # image 0: queries 4, 1, 2 matched to segments 30 (not cached), 10, 20; image 1: query 0 -> 6
    indices = [
        (torch.tensor([4, 1, 2]), torch.tensor([2, 0, 1])),
        (torch.tensor([0]), torch.tensor([0])),
    ]
    return student, distiller, feats, outputs, indices, targets, teacher


def test_sam_level_pairing_and_sizes():
    d = SamDistiller(
        student_channels=[16] * 4,
        teacher_channels=[4] * 6,
        distill_feat_layers=[0, 2, 5],
        feat_distill_weight=1.0,
        output_distill_weight=1.0,
        temperature=4.0,
        num_points=16,
    )
    assert [d.student_level(i) for i in (0, 2, 5)] == [0, 2, 3]  # min(i, L - 1)
    sizes = [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert d.level_sizes(sizes) == [(32, 32), None, (8, 8), None, None, (4, 4)]
    assert sorted(d.adapters.keys()) == ["0", "2", "5"]
    assert d.adapters["5"].in_channels == 16 and d.adapters["5"].out_channels == 4


def test_sam_losses_pair_segments_by_id():
    student, distiller, feats, outputs, indices, targets, teacher = _sam_setup()
    torch.manual_seed(5)
    out = distiller(feats, outputs, indices, targets, teacher)
    assert distiller.stats == {"matched": 4, "distilled": 3, "skipped_not_cached": 1}

    # features: teacher level i on student level i through adapter i, mean over the two levels
    feat_ref = torch.stack(
        [
            feat_distill_loss(
                distiller.adapters[str(i)](feats["neck_features"][i]),
                teacher["features"][i],
                teacher["feature_valid"][i],
            )
            for i in (0, 1)
        ]
    ).mean()
    torch.testing.assert_close(out["loss_feat_distill"], feat_ref)
    # outputs: (query 1 <-> cached 10 = row 2), (query 2 <-> cached 20 = row 0), image 1: (0 <-> 6)
    s_logits = torch.cat([outputs["pred_logits"][0, [1, 2]], outputs["pred_logits"][1, [0]]])
    t_logits = torch.cat([teacher["cls_logits"][0][[2, 0]], teacher["cls_logits"][1][[1]]])
    torch.testing.assert_close(out["loss_cls_distill"], cls_distill_loss(s_logits, t_logits, 2.0))
    s_masks = torch.cat([outputs["pred_masks"][0, [1, 2]], outputs["pred_masks"][1, [0]]])
    t_masks = torch.cat([teacher["mask_logits"][0][[2, 0]], teacher["mask_logits"][1][[1]]])
    valid = torch.cat([teacher["mask_valid"][[0, 0]], teacher["mask_valid"][[1]]])
    # num_points exceeds the grid, so every valid pixel is used and the value is deterministic
    torch.testing.assert_close(
        out["loss_mask_distill"], mask_distill_loss(s_masks, t_masks, valid, 2.0, 10_000)
    )
    # a wrong pairing gives a different value (the check above can fail)
    swapped = cls_distill_loss(s_logits, t_logits[[1, 0, 2]], 2.0)
    assert abs(swapped.item() - out["loss_cls_distill"].item()) > 1e-4
    # raw terms, weighted total
    torch.testing.assert_close(
        out["loss_sam_distill"],
        0.7 * out["loss_feat_distill"] + 1.5 * (out["loss_cls_distill"] + out["loss_mask_distill"]),
    )
    # image 0's flipped / scaled view leaves part of the grid outside the 64 x 48 original
    assert not teacher["mask_valid"][0].all() and teacher["mask_valid"][0].any()


def test_sam_gradients_reach_student_and_adapters_only():
    student, distiller, feats, outputs, indices, targets, teacher = _sam_setup(num_points=32)
    out = distiller(feats, outputs, indices, targets, teacher)
    out["loss_sam_distill"].backward()
    for t in teacher["features"] + teacher["mask_logits"] + teacher["cls_logits"]:
        assert not t.requires_grad and t.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
    for name in ("stem.0.weight", "down.0.weight", "mask_proj.weight", "queries", "cls.weight"):
        assert dict(student.named_parameters())[name].grad.abs().sum() > 0, name
    assert all(k.startswith("adapters.") for k in distiller.state_dict())


def test_sam_without_cached_segments_distils_features_only():
    student, distiller, feats, outputs, indices, targets, teacher = _sam_setup()
    teacher = {**teacher, "segment_ids": [torch.tensor([1000, 1001, 1002]), torch.tensor([1, 2])]}
    out = distiller(feats, outputs, indices, targets, teacher)
    assert out["loss_cls_distill"].item() == 0.0 and out["loss_mask_distill"].item() == 0.0
    assert out["loss_feat_distill"].item() > 0
    assert distiller.stats["skipped_not_cached"] == 4


def test_sam_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="distill_feat_layers"):
        SamDistiller(
            student_channels=[16] * 4,
            teacher_channels=[6, 10],
            distill_feat_layers=[0, 1, 2],
            feat_distill_weight=1.0,
            output_distill_weight=1.0,
            temperature=4.0,
            num_points=16,
        )
    student, distiller, feats, outputs, indices, targets, teacher = _sam_setup()
    with pytest.raises(TypeError, match="batch_warp_teacher_targets"):
        distiller(feats, outputs, indices, targets, [teacher])
    wrong = {
        **teacher,
        "features": [teacher["features"][0][..., :8, :8], teacher["features"][1]],
        "feature_valid": [teacher["feature_valid"][0][..., :8, :8], teacher["feature_valid"][1]],
    }
    with pytest.raises(ValueError, match="teacher level 0 must be warped onto student level 0"):
        distiller(feats, outputs, indices, targets, wrong)
    few = {**teacher, "cls_logits": [c[:, :2] for c in teacher["cls_logits"]]}
    with pytest.raises(ValueError, match="classes"):
        distiller(feats, outputs, indices, targets, few)
