"""PQ of a model on a COCO-panoptic split, against the original-resolution ground truth.

The network sees each image through the dataset's :class:`~pipeline.data.transforms.EvalTransform`
(resize + pad); its masks are resampled to the original size with the sample's exact
``transform`` and compared with the raw PNG / JSON of the split (never the resized view), so the
numbers are the standard COCO panoptic ones.

With ``torch.distributed`` initialised, rank ``r`` of ``W`` evaluates images ``r, r + W, ...``;
the per-category statistics (:class:`~pipeline.evaluation.pq.PQStat`) are summed over ranks and
every rank returns the same metrics. Only rank 0 writes ``metrics.json`` / ``predictions.json``.

``out_dir`` layout::

    metrics.json              All / Things / Stuff PQ SQ RQ, per-class rows, counts, settings
    predictions.json          (write_predictions) COCO panoptic "annotations" + "categories"
    panoptic/<gt png name>    (write_predictions) COCO panoptic PNGs
    visualizations/<id>.jpg   (num_visualize > 0) image | ground truth | prediction
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline.data.coco_panoptic import Category, PanopticDataset, load_image_rgb, load_panoptic_png
from pipeline.data.transforms import EvalTransform
from pipeline.evaluation.inference import run_panoptic_inference, to_coco_panoptic
from pipeline.evaluation.pq import PQStat, pq_single_image, summarize_pq
from pipeline.evaluation.predict import categories_to_json
from pipeline.evaluation.visualize import overlay_panoptic, save_image, side_by_side

__all__ = ["evaluate_model", "dist_rank_world"]

log = logging.getLogger(__name__)


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _as_list(batch: list) -> list:
    return batch


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _raw_image_ids(json_path: Path) -> dict[str, Any]:
    """``str(image_id) -> image_id`` as typed in the split's JSON (COCO uses ints)."""
    with open(json_path) as f:
        return {str(a["image_id"]): a["image_id"] for a in json.load(f)["annotations"]}


def evaluate_model(
    model: torch.nn.Module,
    dataset: PanopticDataset,
    categories: Sequence[Category] | None,
    device: torch.device | str,
    out_dir: str | Path | None = None,
    batch_size: int = 1,
    max_images: int | None = None,
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
    iou_score_weight: float = 0.0,
    write_predictions: bool = False,
    num_visualize: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and compute panoptic quality.

    Arguments:
        model: the student or an exported one, called through
            :func:`~pipeline.evaluation.inference.forward_pixels` (uint8 ``[B, 3, H, W]`` ->
            ``pred_logits``, ``pred_masks``, optionally ``pred_iou``); put in eval mode (and
            restored after).
        dataset: a :class:`PanopticDataset` whose transform is an :class:`EvalTransform`
            (or None: full resolution). Skip records (``on_bad_sample="skip"``) are counted and
            left out of the metric.
        categories: categories ordered by train id; None = ``dataset.categories``.
        out_dir: where ``metrics.json`` (and predictions / visualisations) go; None = nowhere.
        max_images: evaluate only the first ``max_images`` images of the split.
        write_predictions: also write COCO panoptic PNGs and ``predictions.json``.
        num_visualize: write image | GT | prediction panels for the first N evaluated images.

    Returns:
        ``{"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class": {category_id: {...}},
        "num_images", "num_skipped", "skipped": [{image_id, file_name, reason}], "settings"}``;
        PQ / SQ / RQ in percent.
    """
    if not isinstance(dataset, PanopticDataset):
        raise TypeError(f"dataset must be a PanopticDataset, got {type(dataset).__name__}")
    if dataset.transform is not None and not isinstance(dataset.transform, EvalTransform):
        raise ValueError(f"dataset.transform must be an EvalTransform (or None) for evaluation, "
                         f"got {dataset.transform!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    categories = list(dataset.categories if categories is None else categories)
    if [int(c.id) for c in categories] != [int(c.id) for c in dataset.categories]:
        raise ValueError("categories differ from dataset.categories (ids in train-id order); "
                         "the model must be evaluated on the label space it was trained on")
    isthing = [bool(c.isthing) for c in categories]
    rank, world = dist_rank_world()
    num = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    shard = list(range(rank, num, world))
    out_dir = None if out_dir is None else Path(out_dir)
    png_dir = None if out_dir is None or not write_predictions else out_dir / "panoptic"
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
    raw_ids = _raw_image_ids(dataset.json_path) if png_dir is not None else {}

    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_as_list)
    was_training = model.training
    model.to(device).eval()
    stat = PQStat()
    annotations: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    position = 0
    with tqdm(total=len(shard), desc=f"evaluate[{rank}]" if world > 1 else "evaluate",
              disable=not progress) as bar:
        for batch in loader:
            indices = shard[position:position + len(batch)]
            position += len(batch)
            good = [(i, s) for i, s in zip(indices, batch) if "skip_reason" not in s]
            skipped += [{"image_id": s["image_id"], "file_name": s["file_name"],
                         "reason": s["skip_reason"]} for s in batch if "skip_reason" in s]
            results = run_panoptic_inference(
                model, [s for _, s in good], isthing, device,
                object_mask_threshold=object_mask_threshold,
                overlap_threshold=overlap_threshold, iou_score_weight=iou_score_weight)
            for (index, sample), (id_map, segments) in zip(good, results):
                pred_rgb, pred_segments = to_coco_panoptic(id_map, segments, categories)
                pred_ids = id_map.cpu().numpy()
                gt_ids = load_panoptic_png(dataset.png_path(index))
                gt_segments = dataset.segments(index)
                stat += pq_single_image(gt_ids, gt_segments, pred_ids, pred_segments,
                                        [c.id for c in categories], sample["image_id"])
                if png_dir is not None:
                    name = dataset.png_path(index).name
                    save_image(pred_rgb, png_dir / name)
                    annotations.append({
                        "image_id": raw_ids.get(sample["image_id"], sample["image_id"]),
                        "file_name": name, "segments_info": pred_segments})
                if out_dir is not None and index < num_visualize:
                    image = load_image_rgb(dataset.image_path(index))
                    panel = side_by_side([
                        image,
                        overlay_panoptic(image, gt_ids, gt_segments, categories),
                        overlay_panoptic(image, pred_ids, pred_segments, categories)])
                    save_image(panel, out_dir / "visualizations" / f"{sample['image_id']}.jpg")
            bar.update(len(batch))
    model.train(was_training)

    gathered = _gather({"stat": stat.state_dict(), "annotations": annotations,
                        "skipped": skipped}, world)
    total = PQStat()
    for part in gathered:
        total += PQStat.from_state_dict(part["stat"])
    skipped = [s for part in gathered for s in part["skipped"]]
    metrics = summarize_pq(total, categories)
    metrics.update({
        "num_images": num - len(skipped),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "settings": {"object_mask_threshold": object_mask_threshold,
                     "overlap_threshold": overlap_threshold,
                     "iou_score_weight": iou_score_weight,
                     "test_size": getattr(dataset.transform, "test_size", None),
                     "world_size": world},
    })
    if skipped:
        log.warning("evaluation skipped %d image(s): %s", len(skipped),
                    ", ".join(f"{s['file_name']} ({s['reason']})" for s in skipped))
    if out_dir is not None and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if png_dir is not None:
            all_annotations = [a for part in gathered for a in part["annotations"]]
            (out_dir / "predictions.json").write_text(json.dumps(
                {"annotations": all_annotations, "categories": categories_to_json(categories)},
                indent=1))
    return metrics
