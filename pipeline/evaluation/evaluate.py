"""PQ, instance AP and mIoU of a model on a COCO-panoptic split, against the
original-resolution ground truth.

The network sees each image through the dataset's :class:`~pipeline.data.transforms.EvalTransform`
(resize + pad); its masks are resampled to the original size with the sample's exact
``transform`` and compared with the raw PNG / JSON of the split (never the resized view), so the
numbers are the standard COCO panoptic ones.

Beside PQ/SQ/RQ the metrics hold what panoptic papers report next to it (Mask2Former's table):
``instance`` = COCO ``segm`` AP of the thing classes from the same model's scored thing queries
(:mod:`pipeline.evaluation.instance_ap`) and ``semantic`` = mIoU of the merged prediction
(:mod:`pipeline.evaluation.semantic`).

With ``torch.distributed`` initialised (and ``distributed=True``), rank ``r`` of ``W`` evaluates
images ``r, r + W, ...``; the per-category statistics, confusion matrices and AP inputs are
gathered and every rank returns the same metrics. Only rank 0 writes ``metrics.json`` /
``predictions.json``. ``distributed=False`` evaluates the whole split in this process (the
trainer's periodic evaluation on rank 0).

``out_dir`` layout::

    metrics.json              All / Things / Stuff PQ SQ RQ, per-class rows, counts, settings
    predictions.json          (write_predictions) COCO panoptic "annotations" + "categories"
    panoptic/<gt png name>    (write_predictions) COCO panoptic PNGs
    visualizations/<id>.jpg   (num_visualize > 0) image | ground truth | prediction
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline.config import OBJECT_MASK_THRESHOLD, OVERLAP_THRESHOLD
from pipeline.data.coco_panoptic import Category, PanopticDataset, load_image_rgb, load_panoptic_png
from pipeline.data.transforms import EvalTransform
from pipeline.evaluation.inference import (
    forward_samples,
    panoptic_from_outputs,
    thing_queries_at_original,
    to_coco_panoptic,
)
from pipeline.evaluation.instance_ap import coco_instance_ap, gt_thing_annotations, thing_detections
from pipeline.evaluation.pq import PQStat, pq_single_image, summarize_pq
from pipeline.evaluation.predict import categories_to_json
from pipeline.evaluation.semantic import confusion_matrix, semantic_map, summarize_miou
from pipeline.evaluation.visualize import overlay_panoptic, save_image, side_by_side

__all__ = ["evaluate_model", "dist_rank_world"]

log = logging.getLogger(__name__)

PanelSink = Callable[[str, np.ndarray], None]  # (image_id, uint8 [H, 3W, 3] panel)


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


@dataclass
class _Outputs:
    """Where one evaluation writes: PNGs + predictions.json, panels (files and/or a sink)."""

    out_dir: Path | None
    png_dir: Path | None
    raw_ids: dict[str, Any]
    num_visualize: int
    on_panel: PanelSink | None


@dataclass
class _ShardResult:
    """What one rank accumulates; gathered and summed over ranks (plain, picklable data)."""

    stat: PQStat = field(default_factory=PQStat)
    confusion: np.ndarray | None = None
    gt_things: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (index, H0, W0)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_state(self) -> dict[str, Any]:
        return {
            "stat": self.stat.state_dict(),
            "confusion": self.confusion,
            "gt_things": self.gt_things,
            "detections": self.detections,
            "images": self.images,
            "annotations": self.annotations,
            "skipped": self.skipped,
        }


def _check_inputs(
    dataset: PanopticDataset, categories: Sequence[Category] | None, batch_size: int
) -> list[Category]:
    if not isinstance(dataset, PanopticDataset):
        raise TypeError(f"dataset must be a PanopticDataset, got {type(dataset).__name__}")
    if dataset.transform is not None and not isinstance(dataset.transform, EvalTransform):
        raise ValueError(
            f"dataset.transform must be an EvalTransform (or None) for evaluation, "
            f"got {dataset.transform!r}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    categories = list(dataset.categories if categories is None else categories)
    if [int(c.id) for c in categories] != [int(c.id) for c in dataset.categories]:
        raise ValueError(
            "categories differ from dataset.categories (ids in train-id order); "
            "the model must be evaluated on the label space it was trained on"
        )
    return categories


def _score_image(
    result: _ShardResult,
    dataset: PanopticDataset,
    index: int,
    sample: dict[str, Any],
    panoptic: tuple[torch.Tensor, list[dict[str, Any]]],
    instances: tuple[torch.Tensor, ...] | None,
    categories: Sequence[Category],
    outputs: _Outputs,
) -> None:
    """Add one image's PQ statistics, confusion matrix and AP inputs; write its PNG / panel."""
    id_map, segments = panoptic
    pred_rgb, pred_segments = to_coco_panoptic(id_map, segments, categories)
    pred_ids = id_map.cpu().numpy()
    gt_ids = load_panoptic_png(dataset.png_path(index))
    gt_segments = dataset.segments(index)
    result.stat += pq_single_image(
        gt_ids, gt_segments, pred_ids, pred_segments, [c.id for c in categories], sample["image_id"]
    )
    conf = confusion_matrix(
        semantic_map(gt_ids, gt_segments, "train_id"),
        semantic_map(pred_ids, segments, "category_id"),
        len(categories),
    )
    result.confusion = conf if result.confusion is None else result.confusion + conf
    result.images.append((index, *gt_ids.shape[:2]))
    if instances is not None:
        result.gt_things += gt_thing_annotations(gt_ids, gt_segments, index)
        masks, labels, class_prob, query_index = instances
        result.detections += thing_detections(masks, labels, class_prob, index, query_index)
    if outputs.png_dir is not None:
        name = dataset.png_path(index).name
        save_image(pred_rgb, outputs.png_dir / name)
        result.annotations.append(
            {
                "image_id": outputs.raw_ids.get(sample["image_id"], sample["image_id"]),
                "file_name": name,
                "segments_info": pred_segments,
            }
        )
    wants_panel = outputs.out_dir is not None or outputs.on_panel is not None
    if wants_panel and index < outputs.num_visualize:
        image = load_image_rgb(dataset.image_path(index))
        panel = side_by_side(
            [
                image,
                overlay_panoptic(image, gt_ids, gt_segments, categories),
                overlay_panoptic(image, pred_ids, pred_segments, categories),
            ]
        )
        if outputs.out_dir is not None:
            save_image(panel, outputs.out_dir / "visualizations" / f"{sample['image_id']}.jpg")
        if outputs.on_panel is not None:
            outputs.on_panel(str(sample["image_id"]), panel)


def _evaluate_shard(
    model: torch.nn.Module,
    dataset: PanopticDataset,
    shard: list[int],
    categories: Sequence[Category],
    device: torch.device | str,
    settings: dict[str, Any],
    outputs: _Outputs,
    batch_size: int,
    num_workers: int,
    bar: tqdm,
) -> _ShardResult:
    """Inference and scoring of the images ``shard`` of ``dataset`` (model already in eval)."""
    isthing = [bool(c.isthing) for c in categories]
    topk = settings["instance_topk"]
    merge = {
        k: settings[k] for k in ("object_mask_threshold", "overlap_threshold", "iou_score_weight")
    }
    # a seeded generator: creating the loader's iterator draws its base seed from it, not from
    # the global RNG (evaluation during training must not move the training's random stream)
    loader = DataLoader(
        Subset(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_list,
        generator=torch.Generator().manual_seed(0),
    )
    result = _ShardResult()
    position = 0
    for batch in loader:
        indices = shard[position : position + len(batch)]
        position += len(batch)
        good = [(i, s) for i, s in zip(indices, batch) if "skip_reason" not in s]
        result.skipped += [
            {"image_id": s["image_id"], "file_name": s["file_name"], "reason": s["skip_reason"]}
            for s in batch
            if "skip_reason" in s
        ]
        if good:
            samples = [s for _, s in good]
            raw, input_size = forward_samples(model, samples, device)
            for (index, sample), out in zip(good, raw):
                panoptic = panoptic_from_outputs(out, sample, input_size, isthing, **merge)
                instances = (
                    thing_queries_at_original(out, sample, input_size, isthing, topk)
                    if topk and any(isthing)
                    else None
                )
                _score_image(
                    result, dataset, index, sample, panoptic, instances, categories, outputs
                )
        bar.update(len(batch))
    return result


def _summarize(
    parts: list[dict[str, Any]], categories: Sequence[Category], num: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of the gathered shard results."""
    total = PQStat()
    for part in parts:
        total += PQStat.from_state_dict(part["stat"])
    skipped = [s for part in parts for s in part["skipped"]]
    metrics = summarize_pq(total, categories)
    names = [str(getattr(c, "name", c.id)) for c in categories]
    confusions = [part["confusion"] for part in parts if part["confusion"] is not None]
    conf = (
        sum(confusions)
        if confusions
        else np.zeros((len(categories) + 1, len(categories)), np.int64)
    )
    metrics["semantic"] = summarize_miou(conf, names)
    things = [t for t, c in enumerate(categories) if c.isthing]
    if settings["instance_topk"] and things:
        metrics["instance"] = coco_instance_ap(
            [a for part in parts for a in part["gt_things"]],
            [d for part in parts for d in part["detections"]],
            sorted(i for part in parts for i in part["images"]),
            things,
            {t: names[t] for t in things},
        )
    else:
        metrics["instance"] = None
    metrics.update(
        {
            "num_images": num - len(skipped),
            "num_skipped": len(skipped),
            "skipped": skipped,
            "settings": settings,
        }
    )
    if skipped:
        log.warning(
            "evaluation skipped %d image(s): %s",
            len(skipped),
            ", ".join(f"{s['file_name']} ({s['reason']})" for s in skipped),
        )
    return metrics


def evaluate_model(
    model: torch.nn.Module,
    dataset: PanopticDataset,
    categories: Sequence[Category] | None,
    device: torch.device | str,
    out_dir: str | Path | None = None,
    batch_size: int = 1,
    max_images: int | None = None,
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
    iou_score_weight: float = 0.0,
    write_predictions: bool = False,
    num_visualize: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    instance_topk: int | None = 100,
    distributed: bool = True,
    on_panel: PanelSink | None = None,
    extra_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` and compute panoptic quality, instance AP and mIoU.

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
        num_visualize: image | GT | prediction panels for the first N images of the split
            (files under ``out_dir/visualizations`` and/or passed to ``on_panel``).
        instance_topk: scored thing queries per image for instance AP; None or 0 = no AP.
        distributed: shard over the ranks of an initialised process group; False = this
            process evaluates every image alone.
        on_panel: called with ``(image_id, panel uint8 [H, 3W, 3])`` for every panel.
        extra_settings: added to ``settings`` (e.g. the checkpoint evaluated).

    Returns:
        ``{"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class": {category_id: {...}},
        "instance": {AP, AP50, AP75, APs, APm, APl, per_class} or None (no thing class),
        "semantic": {mIoU, pixel_accuracy, per_class}, "num_images", "num_skipped",
        "skipped": [{image_id, file_name, reason}], "settings"}``; all in percent.
    """
    categories = _check_inputs(dataset, categories, batch_size)
    rank, world = dist_rank_world() if distributed else (0, 1)
    num = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    shard = list(range(rank, num, world))
    out_dir = None if out_dir is None else Path(out_dir)
    png_dir = None if out_dir is None or not write_predictions else out_dir / "panoptic"
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
    outputs = _Outputs(
        out_dir,
        png_dir,
        _raw_image_ids(dataset.json_path) if png_dir else {},
        num_visualize,
        on_panel,
    )
    settings = {
        "object_mask_threshold": object_mask_threshold,
        "overlap_threshold": overlap_threshold,
        "iou_score_weight": iou_score_weight,
        "instance_topk": instance_topk or None,
        "test_size": getattr(dataset.transform, "test_size", None),
        "world_size": world,
        **(extra_settings or {}),
    }

    was_training = model.training
    model.to(device).eval()
    try:
        with tqdm(
            total=len(shard),
            desc=f"evaluate[{rank}]" if world > 1 else "evaluate",
            disable=not progress,
        ) as bar:
            part = _evaluate_shard(
                model,
                dataset,
                shard,
                categories,
                device,
                settings,
                outputs,
                batch_size,
                num_workers,
                bar,
            )
    finally:
        model.train(was_training)

    gathered = _gather(part.to_state(), world)
    metrics = _summarize(gathered, categories, num, settings)
    if out_dir is not None and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if png_dir is not None:
            all_annotations = [a for part in gathered for a in part["annotations"]]
            (out_dir / "predictions.json").write_text(
                json.dumps(
                    {"annotations": all_annotations, "categories": categories_to_json(categories)},
                    indent=1,
                )
            )
    return metrics
