"""Panoptic Quality (Kirillov et al., 2019) with the COCO ``panopticapi`` definitions.

Per image, ground-truth and predicted segments are read from id maps plus ``segments_info``:

* IoU of a (GT, prediction) pair is ``|G & P| / (|G| + |P| - |G & P| - |P & void|)``: predicted
  pixels on void (GT id 0) are removed from the union.
* A pair matches (true positive) when both have the same category, the GT segment is not crowd
  and ``IoU > 0.5``; such a match is unique by construction.
* Unmatched non-crowd GT segments are false negatives.
* An unmatched prediction is a false positive unless more than half of its area lies on void
  plus the crowd region of its own category.

Statistics accumulate per category in a :class:`PQStat`, which adds with ``+=`` so that images
can be evaluated in separate processes or ranks and merged afterwards. All reported PQ, SQ and
RQ values are percentages in ``[0, 100]``.

One deliberate generalisation: where an image holds several crowd segments of one category,
all of them count as that category's crowd region (``panopticapi`` keeps only the last one;
COCO has at most one per category, so the results agree on COCO).
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.data.coco_panoptic import load_panoptic_png

__all__ = [
    "OFFSET",
    "VOID",
    "CategoryLike",
    "PQCategory",
    "PQStatCat",
    "PQStat",
    "pq_single_image",
    "summarize_pq",
    "evaluate_from_files",
]

OFFSET = 256 * 256 * 256  # larger than any id a 24-bit RGB PNG can hold
VOID = 0
MATCH_IOU = 0.5
METRIC_GROUPS = (("All", None), ("Things", True), ("Stuff", False))


class CategoryLike(Protocol):
    """Anything with a dataset category id and a thing flag (e.g. ``pipeline.data.Category``)."""

    id: int
    isthing: bool


class PQCategory(NamedTuple):
    """A category as read from a COCO-panoptic JSON ``categories`` entry."""

    id: int
    name: str
    isthing: bool


# ----------------------------------------------------------------------------- statistics
@dataclass
class PQStatCat:
    """Counts of one category: matched pairs, false positives, false negatives, summed IoU."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou: float = 0.0

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou += other.iou
        return self


class PQStat:
    """Per-category PQ statistics that merge with ``+=`` (across images, workers, ranks)."""

    def __init__(self) -> None:
        self.per_category: defaultdict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.per_category[int(category_id)]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for category_id, stat in other.per_category.items():
            self.per_category[category_id] += stat
        return self

    def state_dict(self) -> dict[int, list[float]]:
        """Plain ``{category_id: [tp, fp, fn, iou]}`` (picklable / JSON-able, for gathering)."""
        return {k: [v.tp, v.fp, v.fn, v.iou] for k, v in sorted(self.per_category.items())}

    @classmethod
    def from_state_dict(cls, state: Mapping[Any, Sequence[float]]) -> "PQStat":
        stat = cls()
        for k, (tp, fp, fn, iou) in state.items():
            stat.per_category[int(k)] = PQStatCat(int(tp), int(fp), int(fn), float(iou))
        return stat

    def pq_average(
        self, categories: Iterable[CategoryLike], isthing: bool | None = None
    ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
        """Average PQ/SQ/RQ (percent) over ``categories`` (only things / stuff if ``isthing``).

        Categories without any GT or prediction (``tp + fp + fn == 0``) are left out of the
        average, as in ``panopticapi``; they still appear in the per-class results with zeros.

        Returns:
            ``({"pq", "sq", "rq", "n"}, {category_id: {"pq", "sq", "rq", "tp", "fp", "fn"}})``;
            with ``n == 0`` the averages are 0.
        """
        totals = np.zeros(3)
        n = 0
        per_class: dict[int, dict[str, float]] = {}
        for cat in categories:
            if isthing is not None and bool(cat.isthing) != isthing:
                continue
            s = self.per_category.get(int(cat.id), PQStatCat())
            row = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": s.tp, "fp": s.fp, "fn": s.fn}
            per_class[int(cat.id)] = row
            if s.tp + s.fp + s.fn == 0:
                continue
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            row["pq"] = 100.0 * s.iou / denom
            row["sq"] = 100.0 * s.iou / s.tp if s.tp else 0.0
            row["rq"] = 100.0 * s.tp / denom
            totals += (row["pq"], row["sq"], row["rq"])
            n += 1
        pq, sq, rq = (totals / n).tolist() if n else (0.0, 0.0, 0.0)
        return {"pq": pq, "sq": sq, "rq": rq, "n": n}, per_class


def summarize_pq(stat: PQStat, categories: Sequence[CategoryLike]) -> dict[str, Any]:
    """``{"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class": {category_id: {...}}}``.

    Per-class rows also carry the category ``name`` when the categories have one.
    """
    results: dict[str, Any] = {}
    for group, isthing in METRIC_GROUPS:
        results[group], per_class = stat.pq_average(categories, isthing)
        if isthing is None:
            for cat in categories:
                per_class[int(cat.id)]["name"] = getattr(cat, "name", str(cat.id))
                per_class[int(cat.id)]["isthing"] = bool(cat.isthing)
            results["per_class"] = per_class
    return results


# --------------------------------------------------------------------------- one image
def _segments_by_id(segments: Sequence[Mapping[str, Any]], what: str) -> dict[int, Mapping]:
    out: dict[int, Mapping] = {}
    for i, seg in enumerate(segments):
        for key in ("id", "category_id"):
            if key not in seg:
                raise KeyError(f"{what} segments_info[{i}] has no field {key!r}")
        seg_id = int(seg["id"])
        if seg_id == VOID:
            raise ValueError(f"{what} segments_info[{i}] uses the void id 0")
        if seg_id in out:
            raise ValueError(f"{what} segments_info has duplicate id {seg_id}")
        out[seg_id] = seg
    return out


def pq_single_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_ids: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
    category_ids: Iterable[int] | None = None,
    image_id: Any = "?",
) -> PQStat:
    """PQ statistics of one image.

    Arguments:
        gt_ids: integer ``[H, W]`` GT segment ids, 0 = void.
        gt_segments: GT ``segments_info`` dicts with ``id``, ``category_id`` and ``iscrowd``
            (missing ``iscrowd`` means 0).
        pred_ids: integer ``[H, W]`` predicted segment ids, 0 = no prediction.
        pred_segments: predicted ``segments_info`` dicts with ``id`` and ``category_id``.
        category_ids: if given, a predicted ``category_id`` outside it is an error.
        image_id: used in error messages.

    Every id in ``pred_ids`` must be listed in ``pred_segments`` and vice versa, and every
    non-void id of ``gt_ids`` must be listed in ``gt_segments`` (a clear error otherwise).
    """
    gt_ids = np.asarray(gt_ids).astype(np.int64)
    pred_ids = np.asarray(pred_ids).astype(np.int64)
    if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
        raise ValueError(
            f"image {image_id}: GT id map {gt_ids.shape} and prediction "
            f"{pred_ids.shape} must be 2-D of equal size"
        )
    gt_segms = _segments_by_id(gt_segments, f"image {image_id}: GT")
    pred_segms = _segments_by_id(pred_segments, f"image {image_id}: prediction")
    known = None if category_ids is None else {int(c) for c in category_ids}

    # areas from the maps, with consistency checks between the maps and the segment lists
    pred_area = dict(zip(*(a.tolist() for a in np.unique(pred_ids, return_counts=True))))
    pred_area.pop(VOID, None)
    if set(pred_area) != set(pred_segms):
        only_png = sorted(set(pred_area) - set(pred_segms))
        only_json = sorted(set(pred_segms) - set(pred_area))
        raise ValueError(
            f"image {image_id}: predicted ids {only_png} are in the PNG but not in "
            f"segments_info, ids {only_json} in segments_info but not in the PNG"
        )
    for seg_id, seg in pred_segms.items():
        if known is not None and int(seg["category_id"]) not in known:
            raise ValueError(
                f"image {image_id}: predicted segment {seg_id} has unknown "
                f"category_id {seg['category_id']}"
            )
    gt_area = dict(zip(*(a.tolist() for a in np.unique(gt_ids, return_counts=True))))
    gt_area.pop(VOID, None)
    unlisted = sorted(set(gt_area) - set(gt_segms))
    if unlisted:
        raise ValueError(
            f"image {image_id}: GT ids {unlisted} are in the PNG but not in segments_info"
        )

    # intersections of every (gt, pred) id pair, including void on either side
    joint = gt_ids * OFFSET + pred_ids
    pairs, counts = np.unique(joint, return_counts=True)
    inter = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs, counts)}

    def cat(seg: Mapping) -> int:
        return int(seg["category_id"])

    def crowd(seg: Mapping) -> bool:
        return bool(seg.get("iscrowd", 0))

    stat = PQStat()
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (g, p), n in inter.items():
        if g == VOID or p == VOID:
            continue
        gs, ps = gt_segms[g], pred_segms[p]
        if crowd(gs) or cat(gs) != cat(ps):
            continue
        union = pred_area[p] + gt_area[g] - n - inter.get((VOID, p), 0)
        iou = n / union
        if iou > MATCH_IOU:
            stat[cat(gs)].tp += 1
            stat[cat(gs)].iou += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_ids: defaultdict[int, list[int]] = defaultdict(list)
    for g, gs in gt_segms.items():
        if g in gt_matched:
            continue
        if crowd(gs):
            crowd_ids[cat(gs)].append(g)
        else:
            stat[cat(gs)].fn += 1

    for p, ps in pred_segms.items():
        if p in pred_matched:
            continue
        ignored = inter.get((VOID, p), 0)
        ignored += sum(inter.get((g, p), 0) for g in crowd_ids.get(cat(ps), ()))
        if ignored / pred_area[p] > 0.5:
            continue
        stat[cat(ps)].fp += 1
    return stat


# ----------------------------------------------------------------------------- files
def _load_json(path: str | Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read COCO panoptic JSON {path}: {exc}") from exc


def _evaluate_pairs(
    pairs: Sequence[tuple[Mapping, Mapping]],
    gt_png_dir: str,
    pred_png_dir: str,
    category_ids: Sequence[int],
    progress: bool = False,
) -> PQStat:
    stat = PQStat()
    for gt_ann, pred_ann in tqdm(pairs, desc="PQ", disable=not progress):
        image_id = gt_ann["image_id"]
        gt = load_panoptic_png(Path(gt_png_dir) / gt_ann["file_name"])
        pred = load_panoptic_png(Path(pred_png_dir) / pred_ann["file_name"])
        stat += pq_single_image(
            gt, gt_ann["segments_info"], pred, pred_ann["segments_info"], category_ids, image_id
        )
    return stat


def evaluate_from_files(
    gt_json: str | Path,
    gt_png_dir: str | Path,
    pred_json: str | Path,
    pred_png_dir: str | Path,
    num_workers: int = 0,
) -> dict[str, Any]:
    """PQ of COCO-format panoptic predictions against COCO-format ground truth.

    Arguments:
        gt_json, pred_json: COCO panoptic JSON files; each ``annotations`` entry has
            ``image_id``, ``file_name`` (the PNG) and ``segments_info``. The categories come
            from ``gt_json``.
        gt_png_dir, pred_png_dir: folders holding the PNGs named by ``file_name`` (8-bit RGB,
            decoded by :func:`pipeline.data.coco_panoptic.load_panoptic_png`).
        num_workers: > 0 splits the images over that many processes and merges their
            :class:`PQStat`; 0 evaluates in this process.

    Returns:
        :func:`summarize_pq`'s dict; every GT image must have a prediction (error otherwise;
        image ids are compared as strings).
    """
    gt = _load_json(gt_json)
    pred = _load_json(pred_json)
    for name, data in (("gt_json", gt), ("pred_json", pred)):
        if "annotations" not in data:
            raise ValueError(
                f"{name} {gt_json if name == 'gt_json' else pred_json} has no 'annotations' field"
            )
    if "categories" not in gt:
        raise ValueError(f"gt_json {gt_json} has no 'categories' field")
    categories = [
        PQCategory(int(c["id"]), str(c.get("name", c["id"])), bool(c.get("isthing", 0)))
        for c in gt["categories"]
    ]
    category_ids = [c.id for c in categories]
    # image ids are compared as strings (a JSON may hold 139 or "139")
    pred_by_image = {str(ann["image_id"]): ann for ann in pred["annotations"]}
    pairs = []
    for ann in gt["annotations"]:
        if str(ann["image_id"]) not in pred_by_image:
            raise ValueError(
                f"pred_json {pred_json} has no prediction for image_id {ann['image_id']!r}"
            )
        pairs.append((ann, pred_by_image[str(ann["image_id"])]))

    if num_workers <= 0 or len(pairs) < 2:
        stat = _evaluate_pairs(pairs, str(gt_png_dir), str(pred_png_dir), category_ids, True)
    else:
        chunks = [pairs[i::num_workers] for i in range(num_workers) if pairs[i::num_workers]]
        stat = PQStat()
        with ProcessPoolExecutor(max_workers=len(chunks)) as pool:
            futures = [
                pool.submit(_evaluate_pairs, c, str(gt_png_dir), str(pred_png_dir), category_ids)
                for c in chunks
            ]
            for fut in tqdm(futures, desc="PQ workers"):
                stat += fut.result()
    return summarize_pq(stat, categories)
