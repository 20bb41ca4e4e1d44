"""Instance AP (pycocotools) and semantic mIoU against hand-computed cases; one default for
the panoptic post-processing thresholds."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from pipeline.config import OBJECT_MASK_THRESHOLD, OVERLAP_THRESHOLD, EvaluationConfig
from pipeline.evaluation import evaluate, inference, predict
from pipeline.evaluation.instance_ap import (
    coco_instance_ap,
    gt_thing_annotations,
    select_thing_queries,
    thing_detections,
)
from pipeline.evaluation.semantic import confusion_matrix, semantic_map, summarize_miou

# ----------------------------------------------------------------------------- mIoU


def test_miou_hand_computed():
    # GT: segment 1 = class 0, segment 2 = class 1, id 0 = void (ignored)
    gt_ids = np.array([[1, 1, 2, 2], [1, 1, 2, 0]])
    gt_segments = [{"id": 1, "train_id": 0}, {"id": 2, "train_id": 1}]
    # prediction: segment 7 = class 0, segment 8 = class 1, pixel (1, 1) left unassigned
    pred_ids = np.array([[7, 7, 7, 8], [7, 0, 8, 8]])
    pred_segments = [{"id": 7, "category_id": 0}, {"id": 8, "category_id": 1}]
    gt = semantic_map(gt_ids, gt_segments, "train_id")
    pred = semantic_map(pred_ids, pred_segments, "category_id")
    conf = confusion_matrix(gt, pred, num_classes=3)
    # class 0: GT 4 px, predicted 4 px (on non-void GT), TP 3 -> IoU 3 / 5
    # class 1: GT 3 px, predicted 2 px ((1, 3) is void GT), TP 2 -> IoU 2 / 3
    # class 2: absent from GT and prediction -> left out of the mean
    out = summarize_miou(conf, ["a", "b", "c"])
    assert out["per_class"] == pytest.approx({"a": 60.0, "b": 200 / 3, "c": None})
    assert out["mIoU"] == pytest.approx((60.0 + 200 / 3) / 2)
    assert out["pixel_accuracy"] == pytest.approx(100 * 5 / 7)
    assert conf[3, 0] == 1  # the unassigned pixel is a miss of class 0


def test_miou_false_positives_of_an_absent_class_lower_the_others():
    gt = np.array([[0, 0, 0, 0]])
    pred = np.array([[0, 0, 1, 1]])
    out = summarize_miou(confusion_matrix(gt, pred, 2))
    assert out["per_class"] == {"0": pytest.approx(50.0), "1": None}
    assert out["mIoU"] == pytest.approx(50.0)


def test_miou_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="differ in size"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match=r"GT classes must be in \[0, 2\)"):
        confusion_matrix(np.full((2, 2), 5), np.zeros((2, 2), int), 2)


# ------------------------------------------------------------------------------- AP
def _square(top: int, left: int, size: int = 4, shape=(12, 12)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def _gt(masks_crowd: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, list[dict]]:
    ids = np.zeros((12, 12), np.int64)
    segments = []
    for k, (mask, crowd) in enumerate(masks_crowd):
        ids[mask] = k + 1
        segments.append({"id": k + 1, "train_id": 0, "isthing": True, "iscrowd": crowd})
    # a stuff segment (never an instance)
    ids[11, :] = 99
    segments.append({"id": 99, "train_id": 1, "isthing": False, "iscrowd": 0})
    return ids, segments


def _dets(masks_scores: list[tuple[np.ndarray, float]]) -> list[dict]:
    logits = torch.stack([torch.where(torch.from_numpy(m), 10.0, -10.0) for m, _ in masks_scores])
    labels = torch.zeros(len(masks_scores), dtype=torch.int64)
    # class probability chosen so that p * mean(sigmoid(10)) is the wanted score
    probs = torch.tensor([s for _, s in masks_scores]) / torch.sigmoid(torch.tensor(10.0))
    return thing_detections(logits, labels, probs, image_id=0)


def _ap(gt_masks, det_masks) -> dict:
    ids, segments = _gt(gt_masks)
    gts = gt_thing_annotations(ids, segments, image_id=0)
    return coco_instance_ap(gts, _dets(det_masks), [(0, 12, 12)], [0], {0: "thing"})


def test_ap_one_exact_detection_is_100():
    a = _square(0, 0)
    out = _ap([(a, 0)], [(a, 0.9)])
    assert out["AP"] == pytest.approx(100.0) and out["AP50"] == pytest.approx(100.0)
    assert out["per_class"] == {"thing": pytest.approx(100.0)}


def test_ap_half_recall_is_51_of_101_recall_points():
    # two GT things, only one found exactly: precision 1 up to recall 0.5, then nothing.
    # COCO interpolates precision at 101 recall points 0, 0.01, ..., 1: 51 of them are <= 0.5.
    out = _ap([(_square(0, 0), 0), (_square(6, 6), 0)], [(_square(0, 0), 0.9)])
    assert out["AP"] == pytest.approx(100 * 51 / 101)


def test_ap_higher_scored_false_positive_halves_precision():
    # one GT; a false positive scored above the true positive: precision 1/2 at recall 1
    out = _ap([(_square(0, 0), 0)], [(_square(6, 6), 0.95), (_square(0, 0), 0.9)])
    assert out["AP"] == pytest.approx(50.0)


def test_ap_detection_on_crowd_is_ignored_as_coco_does():
    # the same false positive, but it lies on a crowd segment: neither TP nor FP -> AP 100
    out = _ap(
        [(_square(0, 0), 0), (_square(6, 6), 1)], [(_square(6, 6), 0.95), (_square(0, 0), 0.9)]
    )
    assert out["AP"] == pytest.approx(100.0)


def test_ap_without_gt_things_is_undefined_and_without_detections_zero():
    out = coco_instance_ap([], [], [(0, 12, 12)], [0])
    assert out["AP"] is None
    ids, segments = _gt([(_square(0, 0), 0)])
    gts = gt_thing_annotations(ids, segments, 0)
    assert len(gts) == 1 and gts[0]["area"] == 16 and gts[0]["bbox"] == [0, 0, 4, 4]
    assert coco_instance_ap(gts, [], [(0, 12, 12)], [0])["AP"] == 0.0


def test_select_thing_queries_takes_topk_query_class_pairs_of_thing_classes():
    # K = 3 (things 0 and 2, stuff 1); Q = 2
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.2, 0.1, 0.6, 0.1]]))
    queries, labels, probs = select_thing_queries(logits, [True, False, True], topk=3)
    assert queries.tolist() == [1, 0, 1] and labels.tolist() == [2, 0, 0]
    assert probs.tolist() == pytest.approx([0.6, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"\[Q, K \+ 1\]"):
        select_thing_queries(logits, [True, False], topk=3)


# -------------------------------------------------------------------------- defaults
@pytest.mark.parametrize(
    "func",
    [
        inference.panoptic_merge,
        inference.panoptic_from_outputs,
        inference.run_panoptic_inference,
        evaluate.evaluate_model,
        predict.predict_folder,
    ],
)
def test_one_default_for_the_post_processing_thresholds(func):
    params = inspect.signature(func).parameters
    assert params["object_mask_threshold"].default == OBJECT_MASK_THRESHOLD
    assert params["overlap_threshold"].default == OVERLAP_THRESHOLD
    cfg = EvaluationConfig()
    assert (cfg.object_mask_threshold, cfg.overlap_threshold) == (
        OBJECT_MASK_THRESHOLD,
        OVERLAP_THRESHOLD,
    )
