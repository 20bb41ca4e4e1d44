"""Panoptic merge, resampling back to the original image and COCO encoding."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.geometry import scale_matrix, warp_affine
from pipeline.evaluation.inference import (
    panoptic_merge,
    postprocess,
    to_coco_panoptic,
    unbatch_outputs,
)
from pipeline.data.coco_panoptic import load_panoptic_png
from pipeline.evaluation.visualize import save_image
from pipeline.data.coco_panoptic import Category

ON, OFF = 10.0, -10.0  # mask logits: sigmoid ~ 1 / ~ 0


Cat = Category  # the data layer's category record


def class_logits(*probs: float) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (the last entry is "no object")."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def column_masks(width: int, *spans: tuple[int, int], height: int = 2) -> torch.Tensor:
    """[len(spans), height, width] logits: ON on columns [a, b), OFF elsewhere."""
    masks = torch.full((len(spans), height, width), OFF)
    for q, (a, b) in enumerate(spans):
        masks[q, :, a:b] = ON
    return masks


def test_drops_no_object_and_low_scoring_queries():
    logits = torch.stack(
        [
            class_logits(0.9, 0.05, 0.05),  # kept: thing, p = 0.9
            class_logits(0.05, 0.05, 0.9),  # "no object"
            class_logits(0.7, 0.2, 0.1),
        ]
    )  # p = 0.7 < 0.8
    masks = column_masks(8, (0, 4), (0, 8), (4, 8))
    id_map, segments = panoptic_merge(logits, masks, None, [True, False], object_mask_threshold=0.8)
    assert id_map.dtype == torch.int32
    assert id_map[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert len(segments) == 1
    assert segments[0]["category_id"] == 0 and segments[0]["isthing"]
    assert segments[0]["area"] == 8 and segments[0]["score"] == pytest.approx(0.9)
    # the default threshold (the config's, 0.5) admits the third query (class 0, columns 4-7)
    id_map, segments = panoptic_merge(logits, masks, None, [True, False])
    assert id_map[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [s["score"] for s in segments] == pytest.approx([0.9, 0.7])


def test_overlap_filter_drops_mostly_covered_segments():
    # A (p 0.95) on columns 0-5 beats B (p 0.9) on the shared columns 4-5, so B keeps 2 of its
    # 4 columns: 0.5 < 0.8 -> dropped and its remaining columns 6-7 stay unassigned.
    logits = torch.stack([class_logits(0.95, 0.0, 0.05), class_logits(0.9, 0.0, 0.1)])
    masks = column_masks(8, (0, 6), (4, 8))
    id_map, segments = panoptic_merge(logits, masks, None, [True, False])
    assert id_map[0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert [s["area"] for s in segments] == [12]
    # with overlap_threshold 0.5, B's kept fraction (exactly 0.5) is enough
    id_map, segments = panoptic_merge(logits, masks, None, [True, False], overlap_threshold=0.5)
    assert id_map[0].tolist() == [1, 1, 1, 1, 1, 1, 2, 2]
    assert [s["area"] for s in segments] == [12, 4]


def test_queries_without_a_confident_mask_pixel_are_dropped():
    logits = torch.stack([class_logits(0.9, 0.05, 0.05)])
    masks = torch.full((1, 2, 4), -0.1)  # sigmoid 0.475 < 0.5 everywhere
    id_map, segments = panoptic_merge(logits, masks, None, [True, False])
    assert segments == [] and int(id_map.abs().sum()) == 0


def test_stuff_of_one_class_merges_things_stay_apart():
    # two stuff queries (class 1) and two thing queries (class 0), all on disjoint columns
    logits = torch.stack(
        [
            class_logits(0.05, 0.9, 0.05),
            class_logits(0.05, 0.85, 0.1),
            class_logits(0.95, 0.0, 0.05),
            class_logits(0.88, 0.0, 0.12),
        ]
    )
    masks = column_masks(8, (0, 2), (2, 4), (4, 6), (6, 8))
    id_map, segments = panoptic_merge(logits, masks, None, [True, False])
    # visiting order by score: thing 0.95 -> id 1, stuff 0.9 -> id 2, then the stuff 0.85 query
    # joins id 2, thing 0.88 -> id 3.
    assert id_map[0].tolist() == [2, 2, 2, 2, 1, 1, 3, 3]
    by_id = {s["id"]: s for s in segments}
    assert sorted(by_id) == [1, 2, 3]
    assert by_id[2]["category_id"] == 1 and not by_id[2]["isthing"]
    assert by_id[2]["area"] == 8 and by_id[2]["score"] == pytest.approx(0.9)
    assert by_id[1]["category_id"] == by_id[3]["category_id"] == 0


def test_predicted_iou_reweights_scores():
    # Same mask for both. A: p 0.9 (class 0), IoU 0.5 -> score 0.45; B: p 0.85 (class 1),
    # IoU 1.0 -> score 0.85. Class probability alone picks A; with the IoU weight, B.
    logits = torch.stack([class_logits(0.9, 0.05, 0.05), class_logits(0.05, 0.85, 0.1)])
    masks = column_masks(4, (0, 4), (0, 4))
    iou = torch.tensor([0.5, 1.0])
    _, seg_cls = panoptic_merge(logits, masks, iou, [True, True])
    _, seg_iou = panoptic_merge(logits, masks, iou, [True, True], iou_score_weight=1.0)
    assert [s["category_id"] for s in seg_cls] == [0]
    assert [s["category_id"] for s in seg_iou] == [1]
    assert seg_iou[0]["score"] == pytest.approx(0.85)


def test_merge_rejects_bad_shapes():
    logits = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"pred_logits must be \[Q, K \+ 1\] = \[Q, 3\]"):
        panoptic_merge(logits, torch.zeros(3, 2, 2), None, [True, False])
    with pytest.raises(ValueError, match=r"pred_masks must be \[Q=3"):
        panoptic_merge(logits, torch.zeros(2, 2, 2), None, [True, False, True])
    with pytest.raises(ValueError, match=r"pred_iou must be \[Q=3\]"):
        panoptic_merge(logits, torch.zeros(3, 2, 2), torch.zeros(2), [True, False, True])


def _eval_view(orig_hw: tuple[int, int], test_size: int, divisor: int = 32):
    """Resize so the longest side is ``test_size``, pad bottom/right to a multiple of divisor."""
    h0, w0 = orig_hw
    s = test_size / max(h0, w0)
    pad = (int(np.ceil(h0 * s / divisor) * divisor), int(np.ceil(w0 * s / divisor) * divisor))
    return scale_matrix(s, s), pad


@pytest.mark.parametrize("orig_hw", [(90, 120), (150, 70)])
def test_postprocess_round_trip_recovers_the_original_mask(orig_hw):
    h0, w0 = orig_hw
    yy, xx = np.mgrid[:h0, :w0]
    disc = (xx - 0.55 * w0) ** 2 + (yy - 0.45 * h0) ** 2 < (0.3 * min(h0, w0)) ** 2
    rect = (xx > 0.05 * w0) & (xx < 0.3 * w0) & (yy > 0.6 * h0) & (yy < 0.95 * h0)
    orig = torch.from_numpy(np.stack([disc, rect])).float()  # [2, H0, W0]
    transform, (ph, pw) = _eval_view(orig_hw, test_size=112)
    view, valid = warp_affine(orig, transform, (ph, pw), "bilinear")
    assert not valid[-1].any()  # the last rows are padding
    # a stride-4 head output: logits at 1/4 of the padded input
    low = F.interpolate(view[None], size=(ph // 4, pw // 4), mode="area")[0]
    outputs = {
        "pred_logits": torch.zeros(2, 3),
        "pred_masks": 20 * (low - 0.5),
        "pred_iou": torch.ones(2),
    }
    sample = {
        "transform": torch.from_numpy(transform),
        "orig_size": (h0, w0),
        "image": torch.zeros(3, ph, pw, dtype=torch.uint8),
    }
    out = postprocess(outputs, sample)
    assert out["pred_masks"].shape == (2, h0, w0)
    assert out["pred_iou"] is outputs["pred_iou"]
    back = (out["pred_masks"] > 0).numpy()
    for q, truth in enumerate((disc, rect)):
        iou = (back[q] & truth).sum() / (back[q] | truth).sum()
        assert iou > 0.95, (q, iou)


def test_postprocess_uses_the_batched_input_size():
    # The same 16x16 logits read as covering a 64x64 input (4x) or a 32x32 one (2x)
    # land differently on a 32x32 original with an identity transform.
    logits = torch.full((1, 16, 16), OFF)
    logits[:, :, :4] = ON  # columns 0-3 of the mask grid
    sample = {
        "transform": np.eye(3),
        "orig_size": (32, 32),
        "image": torch.zeros(3, 32, 32, dtype=torch.uint8),
    }
    outputs = {"pred_logits": torch.zeros(1, 2), "pred_masks": logits}
    own = postprocess(outputs, sample)["pred_masks"][0] > 0
    wide = postprocess(outputs, sample, input_size=(64, 64))["pred_masks"][0] > 0
    assert own[0].nonzero().flatten().tolist() == list(range(8))  # 2 px per mask column
    assert wide[0].nonzero().flatten().tolist() == list(range(16))  # 4 px per mask column
    with pytest.raises(KeyError, match="transform"):
        postprocess(outputs, {"orig_size": (32, 32), "image": sample["image"]})


def test_unbatch_outputs_slices_each_image():
    outputs = {
        "pred_logits": torch.randn(2, 5, 3),
        "pred_masks": torch.randn(2, 5, 4, 4),
        "pred_iou": torch.rand(2, 5),
        "aux_outputs": [],
    }
    per_image = unbatch_outputs(outputs)
    assert len(per_image) == 2
    assert torch.equal(per_image[1]["pred_masks"], outputs["pred_masks"][1])
    assert torch.equal(per_image[0]["pred_iou"], outputs["pred_iou"][0])


def test_to_coco_panoptic_round_trips_ids_and_maps_categories(tmp_path):
    cats = [Cat(7, "person", True, (220, 20, 60), 0), Cat(300, "sky", False, (70, 130, 180), 1)]
    id_map = torch.zeros(4, 5, dtype=torch.int32)
    id_map[:2] = 1
    id_map[2:, :3] = 2
    id_map[3, 4] = 300  # an id above 255 needs the G channel
    segments = [
        {"id": 1, "category_id": 1, "isthing": False, "score": 0.9, "area": 10},
        {"id": 2, "category_id": 0, "isthing": True, "score": 0.8, "area": 6},
        {"id": 300, "category_id": 0, "isthing": True, "score": 0.7, "area": 1},
    ]
    rgb, coco = to_coco_panoptic(id_map, segments, cats)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5, 3)
    assert rgb[3, 4].tolist() == [300 % 256, 1, 0]
    save_image(rgb, tmp_path / "pred.png")  # decoded by the data layer's GT reader
    assert np.array_equal(load_panoptic_png(tmp_path / "pred.png"), id_map.numpy())
    assert [c["category_id"] for c in coco] == [300, 7, 7]
    assert [c["area"] for c in coco] == [10, 6, 1]
    assert all(c["iscrowd"] == 0 for c in coco)
    with pytest.raises(ValueError, match=r"segments_info\[0\] has category_id \(train id\) 5"):
        to_coco_panoptic(id_map, [{"id": 1, "category_id": 5}], cats)


class _FixedOutputs(torch.nn.Module):
    """Returns stored outputs (batch of 1) whatever the input; records the input it saw."""

    def __init__(self, outputs: dict):
        super().__init__()
        self.outputs = outputs
        self.seen = None

    def forward(self, images):
        self.seen = images
        return self.outputs


def test_run_panoptic_inference_equals_postprocess_then_merge():
    from pipeline.data.transforms import normalize_images
    from pipeline.evaluation.inference import run_panoptic_inference

    g = torch.Generator().manual_seed(0)
    q, k = 12, 4
    logits = torch.randn(1, q, k + 1, generator=g)
    logits[0, :6, :k] += 8 * F.one_hot(torch.randint(0, k, (6,), generator=g), k)
    masks = torch.full((1, q, 8, 8), OFF)
    for i in range(q):  # random rectangles
        r, c = torch.randint(0, 6, (2,), generator=g).tolist()
        masks[0, i, r : r + 3, c : c + 3] = ON
    outputs = {
        "pred_logits": logits,
        "pred_masks": masks,
        "pred_iou": torch.rand(1, q, generator=g),
    }  # seeded: independent of test order
    transform, (ph, pw) = _eval_view((24, 20), test_size=32)
    image = torch.randint(0, 256, (3, ph, pw), dtype=torch.uint8, generator=g)
    sample = {"transform": transform, "orig_size": (24, 20), "image": image}
    model = _FixedOutputs(outputs)
    isthing = [True, True, False, False]
    [(id_map, segments)] = run_panoptic_inference(
        model, [sample], isthing, "cpu", object_mask_threshold=0.5, iou_score_weight=1.0
    )
    assert torch.allclose(model.seen, normalize_images(image[None]))
    full = postprocess(unbatch_outputs(outputs)[0], sample)
    ref_map, ref_segments = panoptic_merge(
        full["pred_logits"],
        full["pred_masks"],
        full["pred_iou"],
        isthing,
        object_mask_threshold=0.5,
        iou_score_weight=1.0,
    )
    assert id_map.shape == (24, 20) and len(segments) >= 2
    assert torch.equal(id_map, ref_map) and segments == ref_segments
