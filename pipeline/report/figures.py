"""Figures of the ablation report: PQ vs latency, loss curves, learned fusion weights.

Every plotting function takes plain data (run name -> numbers or metric records), returns a
:class:`matplotlib.figure.Figure` bound to the Agg canvas (pyplot and its global state are never
touched, so nothing leaks between calls), and leaves saving to :func:`save_figure`. Figure sizes
are fixed in inches and saved at a fixed dpi without tight cropping, so a PNG's pixel size is
``figsize * dpi``.

A run keeps the same colour in every figure: colours come from :func:`run_colors` over the
report's full, ordered list of run names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "LOSS_TERMS",
    "DPI",
    "moving_average",
    "default_window",
    "run_colors",
    "loss_terms",
    "loss_series",
    "fusion_history",
    "normalise_weights",
    "level_names",
    "plot_pq_vs_latency",
    "plot_loss_curves",
    "plot_fusion_weights",
    "save_figure",
]

DPI = 100

# Display order of the loss terms logged by the trainer; any other ``loss_*`` key follows, sorted.
LOSS_TERMS = (
    "loss",
    "loss_cls",
    "loss_mask",
    "loss_dice",
    "loss_iou",
    "loss_sr",
    "loss_fa",
    "loss_resolution_distill",
    "loss_feat_distill",
    "loss_cls_distill",
    "loss_mask_distill",
    "loss_sam_distill",
)


# ------------------------------------------------------------------------------ data helpers
def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average with the same length as ``values``.

    ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``: the first ``window - 1`` outputs
    average over the values seen so far, so the curve starts at the first value instead of being
    shifted or padded.

    Arguments:
        values: float ``[N]``.
        window: number of values averaged, >= 1 (1 returns the values unchanged).

    Returns:
        float64 ``[N]``.
    """
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    if x.size == 0:
        return x.copy()
    csum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, x.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def default_window(num_points: int) -> int:
    """Smoothing window for a curve of ``num_points`` values: about 2% of it, in ``[1, 50]``."""
    return int(min(50, max(1, num_points // 50)))


def run_colors(names: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per run, in order (tab10 up to 10 runs, tab20 up to 20, then cycled)."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def loss_terms(records_by_run: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Loss keys (``loss`` and ``loss_*`` with numeric values) present in any run, display order."""
    present: set[str] = set()
    for records in records_by_run.values():
        for rec in records:
            present.update(
                k
                for k, v in rec.items()
                if (k == "loss" or k.startswith("loss_")) and _is_number(v)
            )
    known = [t for t in LOSS_TERMS if t in present]
    return known + sorted(present - set(LOSS_TERMS))


def loss_series(records: Sequence[Mapping[str, Any]], term: str) -> tuple[np.ndarray, np.ndarray]:
    """``(iters [N], values [N])`` of the records holding a numeric ``term``, by iteration."""
    pts = sorted((float(r["iter"]), float(r[term])) for r in records if _is_number(r.get(term)))
    if not pts:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(pts, dtype=np.float64)
    return arr[:, 0], arr[:, 1]


def normalise_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """``relu(w) / sum(relu(w))`` (the neck's fast normalised fusion), float64 ``[L]``.

    Weights the neck already normalised only lose its ``eps`` (they then sum to exactly 1).
    """
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0.0)
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"fusion weights must have a positive finite sum, got {list(weights)}")
    return w / total


def fusion_history(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(iters [N], normalised weights [N, L])`` of the records with ``fusion_weights``.

    None when the run logged no fusion weights (plain-average fusion).
    """
    rows = [
        (float(r["iter"]), normalise_weights(r["fusion_weights"]))
        for r in records
        if r.get("fusion_weights") is not None
    ]
    if not rows:
        return None
    rows.sort(key=lambda t: t[0])
    lengths = {len(w) for _, w in rows}
    if len(lengths) != 1:
        raise ValueError(f"fusion_weights change length within one run: {sorted(lengths)}")
    return np.array([i for i, _ in rows]), np.stack([w for _, w in rows])


def level_names(num_levels: int) -> list[str]:
    """FPN level labels ``P2 (s4)``, ``P3 (s8)``, ... for the weights ``[w2, w3, ...]``."""
    return [f"P{i + 2} (s{2 ** (i + 2)})" for i in range(num_levels)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ------------------------------------------------------------------------------- figures
def plot_pq_vs_latency(
    points: Mapping[str, tuple[float, float]],
    colors: Mapping[str, Any] | None = None,
    latency_label: str = "latency (ms, batch 1)",
) -> Figure:
    """Scatter of PQ against latency, one labelled point per run.

    Arguments:
        points: run name -> ``(latency_ms, pq)``; must not be empty.
        colors: run name -> colour (default :func:`run_colors` over ``points``).
        latency_label: x-axis label (names the device and input size).
    """
    if not points:
        raise ValueError("plot_pq_vs_latency: no run has both a latency and a PQ")
    colors = colors or run_colors(list(points))
    fig = _new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    for name, (latency, pq) in points.items():
        ax.scatter([latency], [pq], s=50, color=colors[name], zorder=3)
        ax.annotate(name, (latency, pq), xytext=(5, 5), textcoords="offset points", fontsize=8)
    ax.set_xlabel(latency_label)
    ax.set_ylabel("PQ (%)")
    ax.set_title("PQ vs latency")
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    return fig


def plot_loss_curves(
    records_by_run: Mapping[str, Sequence[Mapping[str, Any]]],
    window: int | None = None,
    colors: Mapping[str, Any] | None = None,
    ncols: int = 3,
) -> Figure:
    """One subplot per loss term, one moving-averaged line per run, iteration on the x axis.

    Arguments:
        records_by_run: run name -> ``metrics.jsonl`` records (dicts with ``iter`` and losses).
        window: moving-average window; None = :func:`default_window` of each curve's length.
        colors: run name -> colour (default :func:`run_colors` over ``records_by_run``).
        ncols: subplots per row.

    Returns:
        A figure whose ``axes`` are exactly the terms of :func:`loss_terms`, in that order,
        each titled with its term.
    """
    terms = loss_terms(records_by_run)
    if not terms:
        raise ValueError("plot_loss_curves: no run logged any loss term")
    colors = colors or run_colors(list(records_by_run))
    ncols = max(1, min(ncols, len(terms)))
    nrows = math.ceil(len(terms) / ncols)
    fig = _new_figure(4.2 * ncols, 3.0 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, term in zip(axes, terms):
        for name, records in records_by_run.items():
            iters, values = loss_series(records, term)
            if iters.size == 0:
                continue
            w = window if window is not None else default_window(iters.size)
            (line,) = ax.plot(
                iters, moving_average(values, w), color=colors[name], linewidth=1.2, label=name
            )
            handles.setdefault(name, line)
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(terms) :]:
        fig.delaxes(ax)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 5),
            fontsize=8,
        )
    return fig


def plot_fusion_weights(
    final_weights: Mapping[str, Sequence[float] | np.ndarray],
    history: tuple[str, np.ndarray, np.ndarray] | None = None,
    colors: Mapping[str, Any] | None = None,
) -> Figure:
    """Grouped bars of each run's final normalised level weights, plus one run's history.

    Arguments:
        final_weights: run name -> normalised weights ``[L]`` (runs with learnable fusion only);
            must not be empty.
        history: optional ``(run name, iters [N], weights [N, L])`` drawn in a second subplot as
            one line per level.
        colors: run name -> colour (default :func:`run_colors` over ``final_weights``).
    """
    if not final_weights:
        raise ValueError("plot_fusion_weights: no run has learned fusion weights")
    colors = colors or run_colors(list(final_weights))
    num_levels = max(len(w) for w in final_weights.values())
    fig = _new_figure(11.0 if history is not None else 6.0, 4.0)
    axes = fig.subplots(1, 2 if history is not None else 1, squeeze=False).ravel()
    ax = axes[0]
    width = 0.8 / len(final_weights)
    x = np.arange(num_levels)
    for k, (name, weights) in enumerate(final_weights.items()):
        w = np.asarray(weights, dtype=np.float64)
        ax.bar(x[: w.size] - 0.4 + (k + 0.5) * width, w, width, color=colors[name], label=name)
    ax.axhline(1.0 / num_levels, color="grey", linestyle="--", linewidth=1, label="plain average")
    ax.set_xticks(x, level_names(num_levels))
    ax.set_ylabel("normalised weight")
    ax.set_title("final fusion weights")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if history is not None:
        name, iters, weights = history
        hx = axes[1]
        cmap = colormaps["viridis"]
        labels = level_names(weights.shape[1])
        for level in range(weights.shape[1]):
            hx.plot(
                iters,
                weights[:, level],
                label=labels[level],
                color=cmap(level / max(1, weights.shape[1] - 1)),
            )
        hx.set_xlabel("iteration")
        hx.set_ylabel("normalised weight")
        hx.set_title(f"fusion weights during training: {name}")
        hx.legend(fontsize=8)
        hx.grid(True, alpha=0.3)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG of ``figsize * DPI`` pixels; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path
