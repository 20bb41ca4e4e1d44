"""Panoptic Quality against hand-computed cases (COCO panopticapi definitions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.coco_panoptic import id_to_rgb
from pipeline.evaluation.pq import (
    PQCategory,
    PQStat,
    evaluate_from_files,
    pq_single_image,
    summarize_pq,
)

CATS = [PQCategory(1, "person", True), PQCategory(2, "sky", False), PQCategory(3, "car", True)]


def row(*ids: int) -> np.ndarray:
    """A 1-pixel-high id map; each argument is one pixel."""
    return np.array([ids], dtype=np.int64)


def seg(seg_id: int, cat: int, crowd: int = 0) -> dict:
    return {"id": seg_id, "category_id": cat, "iscrowd": crowd}


def test_perfect_prediction_is_100():
    gt = np.array([[1, 1, 2, 2], [1, 0, 2, 2], [3, 3, 2, 2]])
    segs = [seg(1, 1), seg(2, 2), seg(3, 1)]
    stat = pq_single_image(gt, segs, gt.copy(), [seg(1, 1), seg(2, 2), seg(3, 1)])
    res = summarize_pq(stat, CATS)
    # cat 1: two TPs with IoU 1; cat 2: one TP; cat 3 absent -> excluded from averages.
    assert res["All"] == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 2}
    assert res["Things"]["pq"] == 100.0 and res["Things"]["n"] == 1
    assert res["Stuff"]["pq"] == 100.0 and res["Stuff"]["n"] == 1
    assert stat[1].tp == 2 and stat[1].iou == pytest.approx(2.0)
    assert res["per_class"][3]["tp"] == 0 and res["per_class"][3]["pq"] == 0.0


def test_overlap_at_or_below_half_does_not_match():
    # GT: cat-1 segment on px 0-3, cat-2 segment on px 4-7.
    gt = row(1, 1, 1, 1, 2, 2, 2, 2)
    # pred 1 (cat 1) on px 2-5: inter 2, union 4 + 4 - 2 = 6 -> IoU 1/3.
    # pred 2 (cat 2) on px 6-7: inter 2, union 2 + 4 - 2 = 4 -> IoU exactly 0.5, not > 0.5.
    pred = row(0, 0, 1, 1, 1, 1, 2, 2)
    stat = pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred, [seg(1, 1), seg(2, 2)])
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (0, 1, 1)
    assert (stat[2].tp, stat[2].fp, stat[2].fn) == (0, 1, 1)
    res = summarize_pq(stat, CATS)
    assert res["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_partial_match_values():
    # pred 1 covers 3 of GT 1's 4 px: IoU 3/4. pred 2 covers px 3-7 (5 px), 4 of them GT 2:
    # IoU 4 / (5 + 4 - 4) = 0.8.  PQ_1 = SQ_1 = 75, PQ_2 = SQ_2 = 80, RQ = 100.
    gt = row(1, 1, 1, 1, 2, 2, 2, 2)
    pred = row(1, 1, 1, 2, 2, 2, 2, 2)
    res = summarize_pq(
        pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred, [seg(1, 1), seg(2, 2)]), CATS
    )
    assert res["per_class"][1]["pq"] == pytest.approx(75.0)
    assert res["per_class"][2]["pq"] == pytest.approx(80.0)
    assert res["All"]["pq"] == pytest.approx(77.5)
    assert res["All"]["rq"] == pytest.approx(100.0)


def test_void_pixels_leave_the_union_and_ignore_mostly_void_predictions():
    # px 0-3: GT 1 (cat 1), px 4-7: void, px 8-9: GT 2 (cat 2, stuff).
    gt = row(1, 1, 1, 1, 0, 0, 0, 0, 2, 2)
    # pred 1 (cat 1) on px 0-5: inter 4, 2 px on void -> union 6 + 4 - 4 - 2 = 4 -> IoU 1.
    # pred 2 (cat 3) on px 6-9: 2 of 4 px on void = exactly half -> still a false positive.
    # GT 2 (cat 2) unmatched -> FN.
    pred = row(1, 1, 1, 1, 1, 1, 2, 2, 2, 2)
    stat = pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred, [seg(1, 1), seg(2, 3)])
    assert stat[1].tp == 1 and stat[1].iou == pytest.approx(1.0)
    assert (stat[2].fn, stat[3].fp) == (1, 1)
    res = summarize_pq(stat, CATS)
    # per class 100 / 0 / 0: All = 100/3, Things (cats 1, 3) = 50, Stuff (cat 2) = 0.
    assert res["All"]["pq"] == pytest.approx(100 / 3)
    assert res["Things"]["pq"] == pytest.approx(50.0)
    assert res["Stuff"]["pq"] == 0.0 and res["Stuff"]["n"] == 1

    # A prediction with 3 of 4 px on void (> half) is ignored entirely: cat 3 has no stats.
    pred2 = row(1, 1, 1, 1, 1, 2, 2, 2, 0, 0)
    stat2 = pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred2, [seg(1, 1), seg(2, 3)])
    assert (stat2[3].tp, stat2[3].fp, stat2[3].fn) == (0, 0, 0)
    # pred 1 on px 0-4: inter 4, 1 px void -> union 5 + 4 - 4 - 1 = 4 -> IoU 1.
    assert stat2[1].iou == pytest.approx(1.0)


def test_crowd_regions_are_not_matched_and_absorb_same_class_predictions():
    # px 0-3: crowd GT 5 (cat 1); px 4-7: GT 6 (cat 1).
    gt = row(5, 5, 5, 5, 6, 6, 6, 6)
    gt_segs = [seg(5, 1, crowd=1), seg(6, 1)]
    # pred 1 (cat 1) on px 0-2: entirely in the same-class crowd -> ignored (no FP).
    # pred 2 (cat 2) on px 3: in a crowd of another class -> FP of cat 2.
    # pred 3 (cat 1) on px 4-7 = GT 6 -> TP IoU 1. The crowd segment is never a FN.
    pred = row(1, 1, 1, 2, 3, 3, 3, 3)
    stat = pq_single_image(gt, gt_segs, pred, [seg(1, 1), seg(2, 2), seg(3, 1)])
    assert (stat[1].tp, stat[1].fp, stat[1].fn) == (1, 0, 0)
    assert (stat[2].tp, stat[2].fp, stat[2].fn) == (0, 1, 0)
    assert summarize_pq(stat, CATS)["All"]["pq"] == pytest.approx(50.0)

    # pred 1 (cat 1) on px 0-5: IoU with GT 6 = 2 / (6 + 4 - 2) = 1/4 -> unmatched; 4 of its
    # 6 px lie in the cat-1 crowd (> half) -> ignored. GT 6 is a FN: PQ_1 = 0 with fn = 1.
    pred2 = row(1, 1, 1, 1, 1, 1, 0, 0)
    stat2 = pq_single_image(gt, gt_segs, pred2, [seg(1, 1)])
    assert (stat2[1].tp, stat2[1].fp, stat2[1].fn) == (0, 0, 1)


def test_prediction_with_the_wrong_class_is_a_fp_and_a_fn():
    gt = row(1, 1, 1, 1, 0, 0)
    pred = row(1, 1, 1, 1, 0, 0)
    stat = pq_single_image(gt, [seg(1, 1)], pred, [seg(1, 3)])
    assert (stat[1].tp, stat[1].fn, stat[3].fp) == (0, 1, 1)
    res = summarize_pq(stat, CATS)
    assert res["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_averages_over_things_and_stuff_across_merged_images():
    # Image A: GT 1 (cat 1) px 0-3, GT 2 (cat 2) px 4-7.
    #   pred 1 (cat 1) px 0-2 -> IoU 3/4; pred 2 (cat 2) px 3-7 -> IoU 4/5.
    a = pq_single_image(
        row(1, 1, 1, 1, 2, 2, 2, 2),
        [seg(1, 1), seg(2, 2)],
        row(1, 1, 1, 2, 2, 2, 2, 2),
        [seg(1, 1), seg(2, 2)],
    )
    # Image B: GT 1 (cat 1) px 0-1, GT 2 (cat 1) px 2-3, GT 3 (cat 2) px 4-7.
    #   pred 1 (cat 1) px 0-1 -> IoU 1; pred 2 (cat 2) px 2-7 -> IoU with GT 3 = 4/6; GT 2 -> FN.
    b = pq_single_image(
        row(1, 1, 2, 2, 3, 3, 3, 3),
        [seg(1, 1), seg(2, 1), seg(3, 2)],
        row(1, 1, 2, 2, 2, 2, 2, 2),
        [seg(1, 1), seg(2, 2)],
    )
    total = PQStat()
    total += a
    total += b
    # cat 1: tp 2, iou 1.75, fn 1 -> PQ 1.75/2.5 = 70, SQ 87.5, RQ 80.
    # cat 2: tp 2, iou 0.8 + 2/3 -> PQ = SQ = 73.33, RQ 100. cat 3 unused -> n = 2.
    res = summarize_pq(total, CATS)
    assert res["per_class"][1]["pq"] == pytest.approx(70.0)
    assert res["per_class"][1]["sq"] == pytest.approx(87.5)
    assert res["per_class"][1]["rq"] == pytest.approx(80.0)
    assert res["per_class"][2]["pq"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)
    assert res["All"]["pq"] == pytest.approx((70.0 + 100 * (0.8 + 2 / 3) / 2) / 2)
    assert res["All"]["sq"] == pytest.approx((87.5 + 100 * (0.8 + 2 / 3) / 2) / 2)
    assert res["All"]["rq"] == pytest.approx(90.0)
    assert res["Things"] == pytest.approx({"pq": 70.0, "sq": 87.5, "rq": 80.0, "n": 1})
    assert res["Stuff"]["n"] == 1
    # state_dict round trip (what ranks exchange) gives the same numbers
    assert (
        summarize_pq(PQStat.from_state_dict(json.loads(json.dumps(total.state_dict()))), CATS)
        == res
    )


def _reference_stat(gt, gt_segs, pred, pred_segs) -> PQStat:
    """Direct per-segment boolean-mask implementation of the same definitions."""
    stat = PQStat()
    void = gt == 0
    matched_g, matched_p = set(), set()
    for g in gt_segs:
        for p in pred_segs:
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            gm, pm = gt == g["id"], pred == p["id"]
            inter = (gm & pm).sum()
            union = (gm | pm).sum() - (pm & void).sum()
            if union and inter / union > 0.5:
                stat[g["category_id"]].tp += 1
                stat[g["category_id"]].iou += inter / union
                matched_g.add(g["id"])
                matched_p.add(p["id"])
    for g in gt_segs:
        if g["id"] not in matched_g and not g["iscrowd"]:
            stat[g["category_id"]].fn += 1
    for p in pred_segs:
        if p["id"] in matched_p:
            continue
        pm = pred == p["id"]
        ignore = void.copy()
        for g in gt_segs:
            if g["iscrowd"] and g["category_id"] == p["category_id"]:
                ignore |= gt == g["id"]
        if (pm & ignore).sum() / pm.sum() <= 0.5:
            stat[p["category_id"]].fp += 1
    return stat


def test_matches_direct_reference_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(20):
        # blocky random maps so that real matches occur
        gt = np.kron(rng.integers(0, 6, (4, 4)), np.ones((4, 4), dtype=np.int64))
        pred = gt.copy()
        flip = rng.random(gt.shape) < 0.2
        pred[flip] = rng.integers(0, 6, flip.sum())
        gt_segs = [
            seg(i, int(rng.integers(1, 4)), int(rng.random() < 0.2)) for i in np.unique(gt) if i
        ]
        pred_segs = [seg(i, int(rng.integers(1, 4))) for i in np.unique(pred) if i]
        ours = pq_single_image(gt, gt_segs, pred, pred_segs)
        ref = _reference_stat(gt, gt_segs, pred, pred_segs)
        assert ours.state_dict().keys() <= {1, 2, 3}
        for c in (1, 2, 3):
            assert (ours[c].tp, ours[c].fp, ours[c].fn) == (ref[c].tp, ref[c].fp, ref[c].fn)
            assert ours[c].iou == pytest.approx(ref[c].iou)


def test_inconsistent_inputs_raise_clear_errors():
    gt = row(1, 1, 0)
    with pytest.raises(ValueError, match=r"image 7: predicted ids \[2\] are in the PNG"):
        pq_single_image(gt, [seg(1, 1)], row(1, 2, 0), [seg(1, 1)], image_id=7)
    with pytest.raises(ValueError, match=r"ids \[9\] in segments_info but not in the PNG"):
        pq_single_image(gt, [seg(1, 1)], row(1, 1, 0), [seg(1, 1), seg(9, 1)])
    with pytest.raises(ValueError, match="unknown category_id 42"):
        pq_single_image(gt, [seg(1, 1)], row(1, 1, 0), [seg(1, 42)], category_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"GT ids \[1\] are in the PNG but not in segments_info"):
        pq_single_image(gt, [], row(1, 1, 0), [seg(1, 1)])
    with pytest.raises(KeyError, match="category_id"):
        pq_single_image(gt, [{"id": 1}], row(1, 1, 0), [seg(1, 1)])


def _write_split(root: Path, name: str, maps: dict, segments: dict, categories=None) -> tuple:
    png_dir = root / name
    png_dir.mkdir(parents=True)
    anns = []
    for image_id, ids in maps.items():
        Image.fromarray(id_to_rgb(ids)).save(png_dir / f"{image_id}.png")
        anns.append(
            {
                "image_id": image_id,
                "file_name": f"{image_id}.png",
                "segments_info": segments[image_id],
            }
        )
    data = {"annotations": anns}
    if categories is not None:
        data["categories"] = categories
    (root / f"{name}.json").write_text(json.dumps(data))
    return root / f"{name}.json", png_dir


JSON_CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "sky", "isthing": 0}]


def test_evaluate_from_files_perfect_is_100_and_workers_agree(tmp_path):
    maps = {"a": np.array([[1, 1, 2], [1, 0, 2]]), "b": np.array([[3, 3, 3], [5, 5, 0]])}
    segs = {"a": [seg(1, 1), seg(2, 2)], "b": [seg(3, 2), seg(5, 1)]}
    gt_json, gt_dir = _write_split(tmp_path, "gt", maps, segs, JSON_CATS)
    pred_json, pred_dir = _write_split(tmp_path, "pred", maps, segs)
    res = evaluate_from_files(gt_json, gt_dir, pred_json, pred_dir)
    assert res["All"] == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 2}
    assert res["per_class"][1]["name"] == "person" and res["per_class"][1]["tp"] == 2

    # one wrong prediction: image b's person predicted as sky -> person 1 TP + 1 FN,
    # sky 2 TP + 1 FP: PQ_person = 1/1.5, PQ_sky = 2/2.5.
    wrong = {"a": segs["a"], "b": [seg(3, 2), seg(5, 2)]}
    pred_json2, pred_dir2 = _write_split(tmp_path, "pred2", maps, wrong)
    res2 = evaluate_from_files(gt_json, gt_dir, pred_json2, pred_dir2)
    assert res2["All"]["pq"] == pytest.approx(100 * (1 / 1.5 + 2 / 2.5) / 2)
    assert evaluate_from_files(gt_json, gt_dir, pred_json2, pred_dir2, num_workers=2) == res2


def test_evaluate_from_files_missing_prediction_names_the_image(tmp_path):
    maps = {"a": np.array([[1, 1]]), "b": np.array([[1, 0]])}
    segs = {"a": [seg(1, 1)], "b": [seg(1, 1)]}
    gt_json, gt_dir = _write_split(tmp_path, "gt", maps, segs, JSON_CATS)
    pred_json, pred_dir = _write_split(tmp_path, "pred", {"a": maps["a"]}, {"a": segs["a"]})
    with pytest.raises(ValueError, match="no prediction for image_id 'b'"):
        evaluate_from_files(gt_json, gt_dir, pred_json, pred_dir)
    (pred_dir / "a.png").write_bytes(b"not a png")
    pred_json.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": k, "file_name": "a.png", "segments_info": segs["a"]} for k in "ab"
                ]
            }
        )
    )
    with pytest.raises(ValueError, match=r"a\.png: cannot decode PNG"):
        evaluate_from_files(gt_json, gt_dir, pred_json, pred_dir)
