"""Ablation report: one Markdown page with the results table, provenance and figures.

Input: run directories as the trainer and the evaluator write them::

    run_info.json        experiment, seed, git_commit, config (resolved), cache_fingerprint,
                         status ("done" when finished), iterations, train_seconds_total, ...
    metrics.jsonl        one JSON object per logged iteration: iter, lr, loss, loss_*, fusion_weights
    final.pth            exported student: {"student", "config" (JSON), "categories" (JSON)}
    eval/metrics.json    All / Things / Stuff {pq, sq, rq, n}, per_class, num_images (PQ in %)
    eval/panels/*.png    optional qualitative panels (eval/visualizations/*.jpg is read too)
    complexity.json      params / FLOPs / latency; measured and written here when missing

Output in ``out_dir``: ``report.md``, ``pq_vs_latency.png``, ``loss_curves.png``,
``fusion_weights.png``, ``configs/<run>.yaml`` (each run's resolved config, reproducible with
``python -m pipeline train --config configs/<run>.yaml``) and ``panels/<run>/<image>``.

A run that is unfinished or lacks a file is kept in every table and marked in its status cell;
it is never dropped. Unreadable JSON raises :class:`ReportError` naming the file (and line).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml
from tqdm import tqdm

from pipeline.config import Config, load_config_dict
from pipeline.report import figures
from pipeline.evaluation.dynamics import loss_trace, plateau_exit
from pipeline.report.seeds import SeedRun, image_stat_matrix, seed_table, split_seed_name

__all__ = [
    "ReportError",
    "RunRecord",
    "MeasureFn",
    "read_json",
    "read_jsonl",
    "load_run",
    "complexity_input_shape",
    "student_complexity",
    "ensure_complexity",
    "ablation_table",
    "provenance_table",
    "build_report",
]

log = logging.getLogger(__name__)

FINISHED = "done"
SWITCHES = (
    ("fusion", "use_learnable_fusion"),
    ("res. distill", "use_resolution_distill"),
    ("SAM distill", "use_sam_distill"),
)
PANEL_DIRS = ("panels", "visualizations")
PANEL_SUFFIXES = (".png", ".jpg", ".jpeg")
COMPLEXITY_KEYS = ("params_m", "gflops", "latency_ms")
MISSING = "n/a"

# measure(weights, input_shape) -> {"params_m", "gflops", "latency_ms", optional "gmacs", "device"}
MeasureFn = Callable[[Path, tuple[int, int, int, int]], Mapping[str, Any]]


class ReportError(ValueError):
    """A run directory holds unreadable or malformed data; the message names the file/field."""


# ------------------------------------------------------------------------------- reading
def read_json(path: Path) -> Any:
    """Parse one JSON file; errors name ``path:line``."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSON-lines file of objects with an ``iter`` field; errors name ``path:line``.

    Blank lines are ignored.
    """
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(
                f"{path}:{lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        if not isinstance(rec, dict):
            raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if not _is_number(rec.get("iter")):
            raise ReportError(f"{path}:{lineno}: field 'iter' is missing or not a number")
        records.append(rec)
    return records


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(d: Mapping[str, Any], key: str, where: str) -> float | None:
    """``d[key]`` as float, None if absent or null; a non-number names ``where`` and the field."""
    v = d.get(key)
    if v is None:
        return None
    if not _is_number(v):
        raise ReportError(f"{where}: field '{key}' must be a number, got {v!r}")
    return float(v)


def _check_eval(metrics: Any, path: Path) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    if not isinstance(metrics.get("All"), dict):
        raise ReportError(f"{path}: field 'All' (overall pq/sq/rq) is missing")
    for group in ("All", "Things", "Stuff"):
        if group not in metrics:
            continue
        if not isinstance(metrics[group], dict):
            raise ReportError(f"{path}: field '{group}' must be an object")
        for key in ("pq", "sq", "rq"):
            if _number(metrics[group], key, f"{path}: {group}") is None:
                raise ReportError(f"{path}: field '{group}.{key}' is missing")
    return metrics


# --------------------------------------------------------------------------------- runs
@dataclass
class RunRecord:
    """Everything the report reads from one run directory.

    Attributes:
        name: row label (the directory name, made unique among the report's runs).
        path: the run directory.
        info: ``run_info.json`` ({} when absent).
        config: the validated resolved config, or None when ``run_info.json`` has none.
        metrics: ``metrics.jsonl`` records ([] when absent).
        eval: ``eval/metrics.json`` or None.
        complexity: ``complexity.json`` (or freshly measured) or None.
        panels: image stem -> qualitative panel file.
        notes: problems shown in the status cell ("no eval/metrics.json", ...).
    """

    name: str
    path: Path
    info: dict[str, Any] = field(default_factory=dict)
    config: Config | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    complexity: dict[str, Any] | None = None
    panels: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def weights(self) -> Path:
        return self.path / "final.pth"

    def evaluated_checkpoint(self) -> str:
        """File name of the checkpoint ``eval/metrics.json`` scored (``settings.checkpoint``,
        written by ``pipeline evaluate``); evaluations that predate the field came from the
        workflow's ``evaluate`` rule, which scores ``final.pth``."""
        if self.eval is None:
            return MISSING
        settings = self.eval.get("settings")
        checkpoint = settings.get("checkpoint") if isinstance(settings, dict) else None
        return Path(str(checkpoint)).name if checkpoint else "final.pth"

    def best_during_training(self) -> str:
        """``"PQ <pq> @ <iteration>"`` of ``best.pth`` (``training.eval_interval``), or –."""
        best = self.info.get("best")
        if not isinstance(best, dict) or not _is_number(best.get("pq")):
            return "–"
        return f"PQ {best['pq']:.2f} @ {best.get('iteration', '?')}"

    def switch(self, key: str) -> bool | None:
        """A ``model.use_*`` flag of the config, None without a config."""
        return None if self.config is None else bool(getattr(self.config.model, key))

    def iterations(self) -> int | None:
        """Iterations trained: ``run_info.iterations``, else the last logged ``iter``."""
        it = _number(self.info, "iterations", str(self.path / "run_info.json"))
        if it is None and self.metrics:
            it = max(float(r["iter"]) for r in self.metrics)
        return None if it is None else int(it)

    def train_minutes(self) -> float | None:
        where = str(self.path / "run_info.json")
        seconds = _number(self.info, "train_seconds_total", where)
        if seconds is None:
            seconds = _number(self.info, "train_seconds", where)
        return None if seconds is None else seconds / 60.0


def _find_panels(eval_dir: Path) -> dict[str, Path]:
    panels: dict[str, Path] = {}
    for sub in PANEL_DIRS:
        d = eval_dir / sub
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if p.is_file() and p.suffix.lower() in PANEL_SUFFIXES:
                    panels.setdefault(p.stem, p)
    return panels


def load_run(path: Path, name: str | None = None) -> RunRecord:
    """Read one run directory; missing files become notes, malformed ones raise ReportError."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run directory not found: {path}")
    run = RunRecord(name=name or path.name, path=path)
    info_path = path / "run_info.json"
    if info_path.is_file():
        info = read_json(info_path)
        if not isinstance(info, dict):
            raise ReportError(f"{info_path}: expected a JSON object, got {type(info).__name__}")
        run.info = info
        raw = info.get("config")
        if isinstance(raw, dict):
            run.config = load_config_dict(raw, source=f"{info_path} (field 'config')")
        elif raw is None:
            run.notes.append("no config in run_info.json")
        else:
            raise ReportError(
                f"{info_path}: field 'config' must be an object, got {type(raw).__name__}"
            )
        if not run.finished:
            run.notes.append(f"unfinished (status '{run.status}')")
    else:
        run.notes.append("no run_info.json")
    metrics_path = path / "metrics.jsonl"
    if metrics_path.is_file():
        run.metrics = read_jsonl(metrics_path)
    else:
        run.notes.append("no metrics.jsonl")
    eval_path = path / "eval" / "metrics.json"
    if eval_path.is_file():
        run.eval = _check_eval(read_json(eval_path), eval_path)
    else:
        run.notes.append("no eval/metrics.json")
    cx_path = path / "complexity.json"
    if cx_path.is_file():
        cx = read_json(cx_path)
        if not isinstance(cx, dict):
            raise ReportError(f"{cx_path}: expected a JSON object, got {type(cx).__name__}")
        for key in COMPLEXITY_KEYS:
            if _number(cx, key, str(cx_path)) is None:
                raise ReportError(f"{cx_path}: field '{key}' is missing")
        run.complexity = cx
    run.panels = _find_panels(path / "eval")
    return run


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, prefixed by the parent's name where two runs share one."""
    names = [p.name for p in paths]
    out = []
    for p, n in zip(paths, names):
        out.append(f"{p.parent.name}-{n}" if names.count(n) > 1 else n)
    if len(set(out)) != len(out):
        dup = sorted({n for n in out if out.count(n) > 1})
        raise ReportError(f"run directories given twice or indistinguishable: {dup}")
    return out


# --------------------------------------------------------------------------- complexity
def complexity_input_shape(cfg: Config) -> tuple[int, int, int, int]:
    """``(1, 3, S, S)``: the eval test size rounded up to the size divisibility (padded input)."""
    div = cfg.data.size_divisibility
    side = math.ceil(cfg.data.test_size / div) * div
    return (1, 3, side, side)


def student_complexity(
    weights: Path,
    input_shape: tuple[int, int, int, int],
    device: str = "auto",
    warmup: int = 5,
    iters: int = 20,
) -> dict[str, Any]:
    """Params, FLOPs and batch-1 latency of the exported student in ``final.pth``.

    Arguments:
        weights: ``final.pth`` with ``student`` (state dict), ``config`` and ``categories`` (JSON).
        input_shape: ``(1, 3, H, W)``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
        warmup, iters: untimed and timed forwards of the latency measurement.

    Returns:
        ``{"params_m", "gflops" (2 FLOPs per multiply-add), "gmacs", "latency_ms" (the median,
        robust to other processes sharing the machine), "latency" (mean/median/p90/fps),
        "device"}``.
    """
    import torch

    from pipeline.device import resolve_device
    from pipeline.evaluation.complexity import count_flops, count_params, measure_latency
    from pipeline.export import ExportError, load_exported_student

    try:
        model = load_exported_student(weights, "cpu").student
    except ExportError as exc:
        raise ReportError(str(exc)) from None
    device = resolve_device(device)
    flops = count_flops(model, input_shape, device)
    latency = measure_latency(model, input_shape, device, warmup=warmup, iters=iters)
    return {
        "params_m": count_params(model) / 1e6,
        "gflops": float(getattr(flops, "gflops", flops)),
        "gmacs": float(getattr(flops, "gmacs", float(getattr(flops, "gflops", flops)) / 2)),
        "latency_ms": float(latency.get("median_ms", latency["mean_ms"])),
        "latency": {k: float(v) for k, v in latency.items()},
        "device": str(torch.device(device)),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_complexity(run: RunRecord, measure: MeasureFn | None) -> dict[str, Any] | None:
    """``run.complexity``, measured with ``measure`` and cached to ``complexity.json`` if needed.

    A cached result is reused when it was measured on the current ``final.pth`` (same sha256)
    at the current input shape. Without ``measure`` (measuring disabled) a cached result is
    used as is. A run without ``final.pth`` or config gets a note and no complexity.
    """
    cached = run.complexity
    if measure is None:
        return cached
    if run.config is None or not run.weights.is_file():
        if cached is None:
            run.notes.append(
                "no final.pth: complexity not measured"
                if run.config is not None
                else "no config: complexity not measured"
            )
        return cached
    shape = complexity_input_shape(run.config)
    digest = _sha256(run.weights)
    if (
        cached is not None
        and cached.get("weights_sha256") in (None, digest)
        and list(cached.get("input_shape", shape)) == list(shape)
    ):
        return cached
    log.info("measuring complexity of %s at %s", run.weights, shape)
    result = dict(measure(run.weights, shape))
    where = f"complexity of {run.weights}"
    for key in COMPLEXITY_KEYS:
        if _number(result, key, where) is None:
            raise ReportError(f"{where}: the measurer returned no '{key}'")
    result.update(input_shape=list(shape), weights_sha256=digest)
    (run.path / "complexity.json").write_text(json.dumps(result, indent=1))
    run.complexity = result
    return result


# ------------------------------------------------------------------------------ markdown
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None
) -> str:
    right = right or [False] * len(header)
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "| " + " | ".join("---:" if r else ":---" for r in right) + " |",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return MISSING if value is None else format(value, spec)


def _group_value(run: RunRecord, group: str, key: str) -> float | None:
    """``eval[group][key]``; None when absent or the group has no category (``n == 0``)."""
    if run.eval is None or not isinstance(run.eval.get(group), dict):
        return None
    g = run.eval[group]
    if g.get("n") == 0:
        return None
    return _number(g, key, str(run.path / "eval" / "metrics.json") + f": {group}")


def _latency(run: RunRecord) -> tuple[float | None, bool]:
    """(latency ms, whether it comes from eval/metrics.json instead of complexity.json)."""
    if run.complexity is not None:
        return float(run.complexity["latency_ms"]), False
    if run.eval is not None:
        v = _number(run.eval, "latency_ms", str(run.path / "eval" / "metrics.json"))
        if v is not None:
            return v, True
    return None, False


def _measurement_setup(runs: Sequence[RunRecord]) -> tuple[list[tuple[int, ...]], list[str]]:
    """The distinct input shapes and devices of the runs' complexity measurements."""
    cxs = [r.complexity for r in runs if r.complexity]
    shapes = sorted({tuple(c["input_shape"]) for c in cxs if c.get("input_shape")})
    devices = sorted({str(c["device"]) for c in cxs if c.get("device")})
    return shapes, devices


def _status(run: RunRecord) -> str:
    return FINISHED if not run.notes else "⚠ " + "; ".join(run.notes)


QUALITY_COLUMNS = (
    ("PQ", "All", "pq"),
    ("SQ", "All", "sq"),
    ("RQ", "All", "rq"),
    ("PQ Th", "Things", "pq"),
    ("PQ St", "Stuff", "pq"),
    ("AP Th", "instance", "AP"),
    ("mIoU", "semantic", "mIoU"),
)


def ablation_table(runs: Sequence[RunRecord]) -> str:
    """The results table: switches, PQ/SQ/RQ, PQ things/stuff, cost, training and status.

    Switches print ✓ (on), – (off) or ? (no config); missing numbers print ``n/a``; the best
    value of each quality column is bold when two or more runs have one.
    """
    quality = {col: [_group_value(r, g, k) for r in runs] for col, g, k in QUALITY_COLUMNS}
    best = {
        col: max(v for v in vals if v is not None)
        for col, vals in quality.items()
        if sum(v is not None for v in vals) >= 2
    }
    header = [
        "run",
        *(s for s, _ in SWITCHES),
        *(c for c, _, _ in QUALITY_COLUMNS),
        "params (M)",
        "GFLOPs",
        "latency (ms)",
        "train (min)",
        "iters",
        "checkpoint",
        "status",
    ]
    rows = []
    for i, run in enumerate(runs):
        row: list[str] = [run.name]
        for _, key in SWITCHES:
            on = run.switch(key)
            row.append("?" if on is None else ("✓" if on else "–"))
        for col, _, _ in QUALITY_COLUMNS:
            v = quality[col][i]
            text = _fmt(v, ".2f")
            row.append(f"**{text}**" if v is not None and v == best.get(col) else text)
        cx = run.complexity or {}
        latency, from_eval = _latency(run)
        row += [
            _fmt(cx.get("params_m"), ".2f"),
            _fmt(cx.get("gflops"), ".2f"),
            _fmt(latency, ".2f") + (" †" if from_eval else ""),
            _fmt(run.train_minutes(), ".1f"),
        ]
        it = run.iterations()
        max_iters = run.config.training.max_iters if run.config is not None else None
        if it is None:
            row.append(MISSING)
        else:
            row.append(str(it) if run.finished or max_iters is None else f"{it}/{max_iters}")
        row.append(run.evaluated_checkpoint())
        row.append(_status(run))
        rows.append(row)
    right = (
        [False] * (1 + len(SWITCHES)) + [True] * (len(header) - 3 - len(SWITCHES)) + [False, False]
    )
    return _md_table(header, rows, right)


def _short_commit(commit: Any) -> str:
    if not commit:
        return MISSING
    commit = str(commit)
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:10] + (" (dirty)" if dirty else "")


def provenance_table(runs: Sequence[RunRecord], config_paths: Mapping[str, str]) -> str:
    """git commit, seed, cache fingerprint (short), resolved config and run directory per run."""
    header = [
        "run",
        "git commit",
        "seed",
        "cache",
        "config",
        "eval images",
        "evaluated",
        "best.pth (during training)",
        "run dir",
    ]
    rows = []
    for run in runs:
        seed = run.info.get("seed", run.config.seed if run.config is not None else None)
        fp = run.info.get("cache_fingerprint")
        cfg = config_paths.get(run.name)
        n_img = run.eval.get("num_images") if run.eval is not None else None
        rows.append(
            [
                run.name,
                _short_commit(run.info.get("git_commit")),
                MISSING if seed is None else seed,
                str(fp)[:12] if fp else "–",
                f"[{cfg}]({cfg})" if cfg else MISSING,
                MISSING if n_img is None else n_img,
                run.evaluated_checkpoint(),
                run.best_during_training(),
                f"`{run.path}`",
            ]
        )
    return _md_table(header, rows)


def _per_class_table(runs: Sequence[RunRecord]) -> str | None:
    with_eval = [
        r for r in runs if r.eval is not None and isinstance(r.eval.get("per_class"), dict)
    ]
    if not with_eval:
        return None
    classes: dict[str, dict[str, float]] = {}
    for run in with_eval:
        for key, row in run.eval["per_class"].items():
            if not isinstance(row, dict):
                raise ReportError(
                    f"{run.path / 'eval' / 'metrics.json'}: per_class['{key}'] must be an object"
                )
            label = str(row.get("name", key))
            classes.setdefault(label, {})[run.name] = _number(
                row, "pq", f"{run.path / 'eval' / 'metrics.json'}: per_class['{key}']"
            )
    rows = [
        [label, *(_fmt(vals.get(r.name), ".2f") for r in with_eval)]
        for label, vals in classes.items()
    ]
    return _md_table(
        ["class", *(r.name for r in with_eval)], rows, [False] + [True] * len(with_eval)
    )


# --------------------------------------------------------------------------------- report
def _write_configs(runs: Sequence[RunRecord], out_dir: Path) -> dict[str, str]:
    paths = {}
    for run in runs:
        if run.config is None:
            continue
        rel = f"configs/{run.name}.yaml"
        (out_dir / "configs").mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_text(
            f"# resolved config of run {run.name} ({run.path})\n"
            + yaml.safe_dump(run.config.to_dict(), sort_keys=False)
        )
        paths[run.name] = rel
    return paths


def _copy_panels(runs: Sequence[RunRecord], out_dir: Path) -> dict[str, dict[str, str]]:
    """run -> image stem -> panel path relative to ``out_dir``."""
    copied: dict[str, dict[str, str]] = {}
    for run in runs:
        for stem, src in run.panels.items():
            rel = f"panels/{run.name}/{src.name}"
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            copied.setdefault(run.name, {})[stem] = rel
    return copied


def _figure_sections(
    runs: Sequence[RunRecord], out_dir: Path, smoothing_window: int | None
) -> list[str]:
    colors = figures.run_colors([r.name for r in runs])
    parts: list[str] = []

    parts.append("## PQ vs latency\n")
    points = {}
    for r in runs:
        latency, _ = _latency(r)
        pq = _group_value(r, "All", "pq")
        if latency is not None and pq is not None:
            points[r.name] = (latency, pq)
    if points:
        shapes, devices = _measurement_setup(runs)
        label = "latency (ms, batch 1"
        if len(shapes) == 1:
            label += f", {shapes[0][-2]}x{shapes[0][-1]}"
        if len(devices) == 1:
            label += f", {devices[0]}"
        fig = figures.plot_pq_vs_latency(points, colors, label + ")")
        figures.save_figure(fig, out_dir / "pq_vs_latency.png")
        parts.append("![PQ vs latency](pq_vs_latency.png)\n")
    missing = [r.name for r in runs if r.name not in points]
    if missing:
        parts.append(f"Not plotted (no PQ or no latency): {', '.join(missing)}.\n")

    parts.append("## Training losses\n")
    records = {r.name: r.metrics for r in runs if r.metrics}
    if records and figures.loss_terms(records):
        fig = figures.plot_loss_curves(records, smoothing_window, colors)
        figures.save_figure(fig, out_dir / "loss_curves.png")
        how = (
            f"a trailing moving average over {smoothing_window} logged iterations"
            if smoothing_window
            else "a trailing moving average over ~2% of each curve"
        )
        parts.append(
            f"![loss curves](loss_curves.png)\n\nOne panel per loss term (weighted, as "
            f"optimised), smoothed with {how}.\n"
        )
    else:
        parts.append("No run logged losses (no metrics.jsonl).\n")

    parts.append("## Learned fusion weights\n")
    final, history = {}, None
    for r in runs:
        h = figures.fusion_history(r.metrics)
        if h is not None:
            final[r.name] = h[1][-1]
            history = (r.name, h[0], h[1])  # the last run in the report's order
    if final:
        fig = figures.plot_fusion_weights(final, history, colors)
        figures.save_figure(fig, out_dir / "fusion_weights.png")
        num_levels = max(len(w) for w in final.values())
        rows = [
            [name, *(f"{x:.3f}" for x in w), *([MISSING] * (num_levels - len(w)))]
            for name, w in final.items()
        ]
        parts.append(
            "![fusion weights](fusion_weights.png)\n\nFinal normalised weights "
            "(the last logged iteration); a plain average gives "
            f"{1 / num_levels:.3f} to every level.\n\n"
            + _md_table(
                ["run", *figures.level_names(num_levels)], rows, [False] + [True] * num_levels
            )
        )
    else:
        parts.append("No run logged fusion weights (plain-average fusion).\n")
    return parts


def _panel_section(runs: Sequence[RunRecord], out_dir: Path) -> str:
    copied = _copy_panels(runs, out_dir)
    if not copied:
        return "## Qualitative results\n\nNo run has qualitative panels (eval/panels).\n"
    stems = sorted({s for per_run in copied.values() for s in per_run})
    cols = [r for r in runs if r.name in copied]
    rows = [
        [
            stem,
            *(
                f"![{r.name} {stem}]({copied[r.name][stem]})" if stem in copied[r.name] else MISSING
                for r in cols
            ),
        ]
        for stem in stems
    ]
    return (
        "## Qualitative results\n\nEach panel: image | ground truth | prediction.\n\n"
        + _md_table(["image", *(r.name for r in cols)], rows)
    )


def _seed_run(run: RunRecord) -> SeedRun | None:
    parsed = split_seed_name(run.name)
    if parsed is None or run.eval is None:
        return None
    stats = None
    pred_json = run.path / "eval" / "predictions.json"
    if run.config is not None and pred_json.is_file():
        _, gt_json, gt_png = run.config.split_paths("val")
        gt = read_json(gt_json)
        ids = [str(a["image_id"]) for a in gt["annotations"]]
        cats = [int(c["id"]) for c in gt["categories"]]
        stats = image_stat_matrix(
            gt_json, gt_png, pred_json, run.path / "eval" / "panoptic", ids, cats
        )
    return SeedRun(parsed[0], parsed[1], run.eval, stats)


def seed_section(runs: Sequence[RunRecord]) -> str | None:
    """The "Seeds" section: mean ± std per variant and paired differences with intervals, for
    runs named ``<variant>-s<seed>`` (None when fewer than two such runs)."""
    seed_runs = [sr for r in runs if (sr := _seed_run(r)) is not None]
    if len(seed_runs) < 2:
        return None
    table, _ = seed_table(seed_runs)
    return (
        "## Seeds\n\n" + table + "\n"
        "- PQ in %, mean ± sample std over seeds. ΔPQ: mean over seeds of (variant − baseline) "
        "at the same seed.\n"
        "- Intervals (95 %): Student-t over the per-seed differences; paired percentile "
        "bootstrap over validation images (2000 resamples, the same images for every run, "
        "differences averaged over seeds).\n"
        "- Verdict: a gain or loss only when both intervals exclude 0; otherwise "
        '"no measurable effect".\n'
    )


def loss_magnitude_section(runs: Sequence[RunRecord], tail: float = 0.2) -> str | None:
    """Mean of every logged loss term over the last ``tail`` of each run's iterations, averaged
    over the seeds of a variant: how large each distillation term is against the task terms."""
    by_variant: dict[str, list[dict[str, float]]] = {}
    for r in runs:
        parsed = split_seed_name(r.name)
        if parsed is None or not r.metrics:
            continue
        rows = r.metrics[int(len(r.metrics) * (1 - tail)) :] or r.metrics
        terms = {
            k for row in rows for k, v in row.items() if k.startswith("loss") and _is_number(v)
        }
        by_variant.setdefault(parsed[0], []).append(
            {k: float(sum(row[k] for row in rows if k in row) / len(rows)) for k in terms}
        )
    if not by_variant:
        return None
    terms = sorted(
        {k for means in by_variant.values() for m in means for k in m},
        key=lambda k: (k != "loss", k),
    )
    table = [
        [
            v,
            *(
                _fmt(sum(m.get(t, 0.0) for m in ms) / len(ms), ".4f")
                if any(t in m for m in ms)
                else MISSING
                for t in terms
            ),
        ]
        for v, ms in by_variant.items()
    ]
    return (
        f"## Loss magnitudes\n\nMean of each logged (weighted) term over the last "
        f"{int(tail * 100)} % of iterations, averaged over seeds:\n\n"
        + _md_table(["variant", *terms], table, [False] + [True] * len(terms))
    )


def plateau_section(
    runs: Sequence[RunRecord], term: str = "loss_cls", frac: float = 0.5, window: int = 10
) -> str | None:
    """When ``term`` leaves its starting plateau (:func:`pipeline.evaluation.dynamics.plateau_exit`)
    in each seed run, next to its things PQ, and the Spearman rank correlation of the two over
    all seed runs (a run whose loss never halves ranks after every run that does)."""
    from scipy.stats import spearmanr

    by_variant: dict[str, dict[int, tuple[int | None, int, float | None]]] = {}
    for r in runs:
        parsed = split_seed_name(r.name)
        if parsed is None or not r.metrics:
            continue
        iters, _ = loss_trace(r.metrics, term)
        if iters.size == 0:
            continue
        things = _group_value(r, "Things", "pq")
        exit_iter = plateau_exit(r.metrics, term, frac, window)
        by_variant.setdefault(parsed[0], {})[parsed[1]] = (exit_iter, int(iters[-1]), things)
    if not by_variant:
        return None
    seeds = sorted({s for v in by_variant.values() for s in v})
    rows = []
    for variant, per_seed in by_variant.items():
        cells = []
        for s in seeds:
            if s not in per_seed:
                cells.append(MISSING)
                continue
            exit_iter, last, things = per_seed[s]
            where = f"> {last}" if exit_iter is None else str(exit_iter)
            cells.append(f"{where} ({_fmt(things, '.1f')})")
        exits = [e for e, _, _ in per_seed.values() if e is not None]
        never = sum(e is None for e, _, _ in per_seed.values())
        mean = _fmt(sum(exits) / len(exits), ".0f") if exits else MISSING
        rows.append([variant, *cells, mean, str(never)])
    text = (
        f"## When `{term}` leaves its plateau\n\n"
        f"Iteration at which the {window}-record moving average of `{term}` first falls below "
        f"{frac:g} × its starting value, per seed (PQ Th in brackets); a run that gets there late "
        "has little of its schedule left to learn the classes.\n\n"
        + _md_table(
            ["variant", *(f"seed {s}" for s in seeds), "mean exit", "never"],
            rows,
            [False] + [True] * (len(seeds) + 2),
        )
    )
    pairs = [
        (last + 1 if e is None else e, th)
        for per_seed in by_variant.values()
        for e, last, th in per_seed.values()
        if th is not None
    ]
    if len(pairs) >= 4 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
        rho, pval = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
        text += (
            f"\nSpearman rank correlation of exit iteration and PQ Th over {len(pairs)} runs: "
            f"{rho:+.2f} (p = {pval:.2g}).\n"
        )
    return text


def teacher_section(paths: Sequence[Path]) -> str:
    """The "Teacher" section: prompted-mask quality of each ``evaluate-teacher`` JSON."""
    rows = []
    for p in paths:
        d = read_json(Path(p))
        if not isinstance(d, dict) or "miou" not in d:
            raise ReportError(f"{p}: not an evaluate-teacher result (no 'miou' field)")
        corr = d.get("iou_pearson")
        rows.append(
            [
                Path(p).stem,
                d.get("weights", "?"),
                d.get("split", "?"),
                _fmt(d.get("miou"), ".4f"),
                _fmt(d.get("miou_things"), ".4f"),
                _fmt(d.get("miou_stuff"), ".4f"),
                _fmt(d.get("miou_class_mean"), ".4f"),
                "undefined (constant)" if corr is None else f"{corr:.3f}",
                str(d.get("num_segments", "?")),
            ]
        )
    return (
        "## Teacher\n\nPrompted-mask quality of the teacher as the cache prompts it (things "
        "by box, stuff by interior points; IoU at the original resolution, void and crowd "
        "ignored):\n\n"
        + _md_table(
            [
                "teacher",
                "weights",
                "split",
                "mIoU",
                "things",
                "stuff",
                "class mean",
                "IoU-head corr.",
                "segments",
            ],
            rows,
        )
    )


def build_report(
    run_dirs: Sequence[Path],
    out_dir: Path,
    title: str,
    measure_complexity: bool = True,
    *,
    measure_fn: MeasureFn | None = None,
    smoothing_window: int | None = None,
    teacher_evals: Sequence[Path] = (),
) -> Path:
    """Write ``out_dir/report.md`` and its figures for the runs in ``run_dirs`` (table order).

    Arguments:
        run_dirs: run directories (see the module docstring).
        out_dir: created if needed; files there are overwritten.
        title: the page title.
        measure_complexity: measure params/FLOPs/latency of runs without a current
            ``complexity.json`` (and cache it there); False uses cached files only.
        measure_fn: ``(final.pth, input_shape) -> {"params_m", "gflops", "latency_ms", ...}``;
            default :func:`student_complexity` (CUDA when available).
        smoothing_window: moving-average window of the loss curves; None = ~2% of each curve.
        teacher_evals: ``evaluate-teacher`` JSON files shown in a "Teacher" section.

    Returns:
        The path of ``report.md``.
    """
    if not run_dirs:
        raise ReportError("build_report: no run directories given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in run_dirs]
    measure = (measure_fn or student_complexity) if measure_complexity else None
    runs = []
    for path, name in tqdm(
        list(zip(paths, _unique_names(paths))), desc="report: runs", dynamic_ncols=True
    ):
        run = load_run(path, name)
        ensure_complexity(run, measure)
        runs.append(run)

    config_paths = _write_configs(runs, out_dir)
    parts = [f"# {title}\n"]
    n_done = sum(not r.notes for r in runs)
    parts.append(
        f"{len(runs)} runs, {n_done} complete. PQ, SQ and RQ in %, on the validation "
        "split; the best value per column is bold.\n"
    )

    parts.append("## Results\n")
    parts.append(ablation_table(runs))
    shapes, devices = _measurement_setup(runs)
    notes = [
        "switches: fusion = learnable FPN fusion weights, res. distill = DSRL resolution "
        "distillation, SAM distill = distillation from the cached SAM teacher; "
        "✓ on, – off.",
        "GFLOPs: one forward at batch 1, counted by torch's FlopCounterMode (2 FLOPs per "
        'multiply-add; papers that report fvcore/mmcv "GFLOPs" count multiply-adds, half '
        "this number).",
        "latency: median forward time at batch 1"
        + (f", input {', '.join('x'.join(map(str, s)) for s in shapes)}" if shapes else "")
        + (f", on {', '.join(devices)}" if devices else "")
        + ".",
    ]
    if any(_latency(r)[1] for r in runs):
        notes.append("†: latency from eval/metrics.json (no complexity.json).")
    parts.append("\n".join(f"- {n}" for n in notes) + "\n")
    seeds = seed_section(runs)
    if seeds:
        parts.append(seeds)
        magnitudes = loss_magnitude_section(runs)
        if magnitudes:
            parts.append(magnitudes)
        plateau = plateau_section(runs)
        if plateau:
            parts.append(plateau)
    if teacher_evals:
        parts.append(teacher_section(teacher_evals))
    attention = [r for r in runs if r.notes]
    if attention:
        parts.append(
            "Runs needing attention:\n\n"
            + "\n".join(f"- `{r.path}`: {'; '.join(r.notes)}" for r in attention)
            + "\n"
        )

    parts.append("## Provenance\n")
    parts.append(provenance_table(runs, config_paths))
    commits = {str(r.info.get("git_commit")) for r in runs if r.info.get("git_commit")}
    if len(commits) > 1:
        parts.append(f"The runs come from {len(commits)} different commits.\n")
    if config_paths:
        cmds = []
        for r in runs:
            if r.name in config_paths:
                cfg = out_dir / config_paths[r.name]
                cmds.append(
                    f"python -m pipeline train --config {cfg} --work-dir {r.path}\n"
                    f"python -m pipeline evaluate --config {cfg} "
                    f"--checkpoint {r.path / 'final.pth'} --out {r.path / 'eval'}"
                )
        parts.append(
            "Reproduce a row (the resolved config holds every setting, including "
            "`training.init_from` of progressive stages):\n\n```bash\n"
            + "\n".join(cmds)
            + "\n```\n"
        )

    parts.extend(_figure_sections(runs, out_dir, smoothing_window))
    per_class = _per_class_table(runs)
    if per_class is not None:
        parts.append("## Per-class PQ\n")
        parts.append(per_class)
    parts.append(_panel_section(runs, out_dir))

    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    log.info("wrote %s", report)
    return report
