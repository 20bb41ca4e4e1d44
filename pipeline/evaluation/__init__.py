"""Evaluation and inference: panoptic merge, Panoptic Quality, overlays, folder prediction."""

from pipeline.evaluation.evaluate import evaluate_model
from pipeline.evaluation.inference import (
    mask_logits_to_original,
    panoptic_merge,
    postprocess,
    run_panoptic_inference,
    to_coco_panoptic,
)
from pipeline.evaluation.pq import PQStat, evaluate_from_files, pq_single_image, summarize_pq
from pipeline.evaluation.predict import PredictionSummary, predict_folder
from pipeline.evaluation.visualize import overlay_panoptic, side_by_side

__all__ = [
    "evaluate_model",
    "mask_logits_to_original",
    "panoptic_merge",
    "postprocess",
    "run_panoptic_inference",
    "to_coco_panoptic",
    "PQStat",
    "evaluate_from_files",
    "pq_single_image",
    "summarize_pq",
    "PredictionSummary",
    "predict_folder",
    "overlay_panoptic",
    "side_by_side",
]
