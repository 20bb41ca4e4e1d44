"""Multi-seed ablation statistics: mean ± std per variant, paired differences with intervals.

Runs named ``<variant>-s<seed>`` (``configs/ablation.yaml`` with ``seeds:``) are grouped by
variant. Every variant is compared with ``baseline`` seed by seed (same seed = same data order,
augmentation and initialisation of the shared parts), with two 95 % intervals for the mean
paired difference of PQ:

* **over seeds** - a Student-t interval of the per-seed differences (training noise; with n
  seeds it has n - 1 degrees of freedom, so it is wide for 3 seeds);
* **over images** - a paired percentile bootstrap over validation images: the same resampled
  image set for every run, PQ recomputed from the resampled per-image statistics (TP, FP, FN,
  summed IoU per class), differences averaged over seeds (what another sample of images would
  show).

An effect is reported only when **both** intervals exclude 0; otherwise the row says "no
measurable effect".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from pipeline.data.coco_panoptic import load_panoptic_png
from pipeline.evaluation.pq import pq_single_image

__all__ = [
    "SeedRun",
    "bootstrap_pq_difference",
    "image_stat_matrix",
    "pq_from_sums",
    "seed_table",
    "split_seed_name",
    "t_interval",
]

SEED_NAME = re.compile(r"^(?P<variant>.+)-s(?P<seed>\d+)$")
STAT_FIELDS = 4  # tp, fp, fn, iou


def split_seed_name(name: str) -> tuple[str, int] | None:
    """``"sam_distill-s2"`` -> ``("sam_distill", 2)``; None for a name without a seed suffix."""
    m = SEED_NAME.match(name)
    return (m["variant"], int(m["seed"])) if m else None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of the mean (NaN bounds for fewer than 2 values)."""
    x = np.asarray(values, np.float64)
    mean = float(x.mean()) if x.size else float("nan")
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(sps.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return mean, mean - half, mean + half


def image_stat_matrix(
    gt_json: str | Path,
    gt_png_dir: str | Path,
    pred_json: str | Path,
    pred_png_dir: str | Path,
    image_ids: Sequence[str],
    category_ids: Sequence[int],
) -> np.ndarray:
    """Per-image PQ statistics: float64 ``[n_images, n_categories, 4]`` = (tp, fp, fn, iou sum),
    images in the order of ``image_ids``, categories in the order of ``category_ids``."""
    gt = json.loads(Path(gt_json).read_text())
    pred = json.loads(Path(pred_json).read_text())
    gt_by = {str(a["image_id"]): a for a in gt["annotations"]}
    pred_by = {str(a["image_id"]): a for a in pred["annotations"]}
    col = {int(c): j for j, c in enumerate(category_ids)}
    out = np.zeros((len(image_ids), len(category_ids), STAT_FIELDS))
    for i, image_id in enumerate(image_ids):
        if image_id not in pred_by:
            raise ValueError(f"{pred_json}: no prediction for image_id {image_id!r}")
        g, p = gt_by[image_id], pred_by[image_id]
        stat = pq_single_image(
            load_panoptic_png(Path(gt_png_dir) / g["file_name"]),
            g["segments_info"],
            load_panoptic_png(Path(pred_png_dir) / p["file_name"]),
            p["segments_info"],
            category_ids,
            image_id,
        )
        for cat, s in stat.per_category.items():
            out[i, col[cat]] = (s.tp, s.fp, s.fn, s.iou)
    return out


def pq_from_sums(sums: np.ndarray) -> np.ndarray:
    """PQ (percent) from summed statistics ``[..., n_categories, 4]``, averaged over the
    categories that have a GT or a prediction (as panopticapi): ``[...]``."""
    tp, fp, fn, iou = (sums[..., k] for k in range(STAT_FIELDS))
    denom = tp + 0.5 * fp + 0.5 * fn
    present = denom > 0
    pq = np.where(present, 100.0 * iou / np.where(present, denom, 1.0), 0.0)
    return pq.sum(-1) / np.maximum(present.sum(-1), 1)


def bootstrap_pq_difference(
    variant: Sequence[np.ndarray],
    baseline: Sequence[np.ndarray],
    num_samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap over images of the seed-averaged PQ difference variant - baseline.

    Arguments:
      variant, baseline: per seed (same order), the :func:`image_stat_matrix` of the run.

    Returns:
      (difference on the full image set, lower, upper) of the percentile interval.
    """
    if len(variant) != len(baseline) or not variant:
        raise ValueError("bootstrap_pq_difference: need the same seeds (>= 1) for both rows")
    n = variant[0].shape[0]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=num_samples).astype(np.float64)

    def diffs(weights: np.ndarray) -> np.ndarray:
        per_seed = [
            pq_from_sums(np.einsum("bi,icf->bcf", weights, v))
            - pq_from_sums(np.einsum("bi,icf->bcf", weights, b))
            for v, b in zip(variant, baseline)
        ]
        return np.mean(per_seed, axis=0)

    full = float(diffs(np.ones((1, n)))[0])
    boot = diffs(counts)
    alpha = (1 - confidence) / 2
    return full, float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))


@dataclass
class SeedRun:
    """One evaluated run of a multi-seed ablation."""

    variant: str
    seed: int
    metrics: Mapping[str, Any]  # eval/metrics.json
    image_stats: np.ndarray | None  # image_stat_matrix, None when not computable


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if x is None or not np.isfinite(x) else format(x, spec)


def seed_table(
    runs: Sequence[SeedRun],
    baseline: str = "baseline",
    confidence: float = 0.95,
    num_samples: int = 2000,
) -> tuple[str, list[dict]]:
    """The Markdown table of the multi-seed ablation and its rows as dicts.

    Variants keep the order of first appearance; differences need the baseline at the same
    seed (seeds missing on either side are left out of that variant's comparison).
    """
    variants: dict[str, dict[int, SeedRun]] = {}
    for r in runs:
        variants.setdefault(r.variant, {})[r.seed] = r
    base = variants.get(baseline, {})
    pct = int(round(confidence * 100))
    header = [
        "variant",
        "seeds",
        "PQ mean ± std",
        "PQ Th",
        "PQ St",
        "ΔPQ vs baseline",
        f"{pct} % CI over seeds (t)",
        f"{pct} % CI over images (bootstrap)",
        "verdict",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([" :--- "] + [" ---: "] * 7 + [" :--- "]) + "|",
    ]
    rows = []
    for name, by_seed in variants.items():
        seeds = sorted(by_seed)
        pq = np.array([by_seed[s].metrics["All"]["pq"] for s in seeds])
        th = np.array([by_seed[s].metrics["Things"]["pq"] for s in seeds])
        st = np.array([by_seed[s].metrics["Stuff"]["pq"] for s in seeds])
        row: dict[str, Any] = {
            "variant": name,
            "seeds": seeds,
            "pq_mean": float(pq.mean()),
            "pq_std": float(pq.std(ddof=1)) if pq.size > 1 else float("nan"),
            "pq_things_mean": float(th.mean()),
            "pq_stuff_mean": float(st.mean()),
        }
        diff_cells = ["–", "–", "–", "–"]
        if name != baseline and base:
            paired = [s for s in seeds if s in base]
            d = [by_seed[s].metrics["All"]["pq"] - base[s].metrics["All"]["pq"] for s in paired]
            mean, lo, hi = t_interval(d, confidence)
            row.update(diff=mean, t_lo=lo, t_hi=hi, paired_seeds=paired)
            boot = None
            if paired and all(
                by_seed[s].image_stats is not None and base[s].image_stats is not None
                for s in paired
            ):
                boot = bootstrap_pq_difference(
                    [by_seed[s].image_stats for s in paired],
                    [base[s].image_stats for s in paired],
                    num_samples,
                    confidence,
                )
                row.update(boot_diff=boot[0], boot_lo=boot[1], boot_hi=boot[2])
            excludes = [
                iv is not None and np.isfinite(iv[0]) and (iv[0] > 0 or iv[1] < 0)
                for iv in ((lo, hi), None if boot is None else boot[1:])
            ]
            if all(excludes):
                verdict = "gain" if mean > 0 else "loss"
            else:
                verdict = "no measurable effect"
            row["verdict"] = verdict
            diff_cells = [
                f"{mean:+.2f}",
                f"[{_fmt(lo, '+.2f')}, {_fmt(hi, '+.2f')}]",
                "–" if boot is None else f"[{boot[1]:+.2f}, {boot[2]:+.2f}]",
                verdict,
            ]
        rows.append(row)
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    str(len(seeds)),
                    f"{row['pq_mean']:.2f} ± {_fmt(row['pq_std'])}",
                    f"{row['pq_things_mean']:.2f}",
                    f"{row['pq_stuff_mean']:.2f}",
                    *diff_cells,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n", rows
