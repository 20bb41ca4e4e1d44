"""Model complexity: parameter count, FLOPs / multiply-adds and wall-clock latency.

Two FLOP conventions are in use and differ by a factor of two:

* ``torch.utils.flop_counter.FlopCounterMode`` (used here) counts **2 FLOPs per
  multiply-add** (one multiply plus one add), e.g. a ``Conv2d`` with ``C_in -> C_out``,
  kernel ``k x k`` on an ``H x W`` output costs ``2 * C_out * C_in * k * k * H * W``.
* The segmentation literature (Mask2Former, MaskConver, RAP-SAM, ... measured with fvcore or
  mmcv) reports "GFLOPs" that are in fact **giga multiply-adds (GMACs)**.

:func:`count_flops` therefore returns a :class:`FlopCount` holding both numbers:
``gflops`` (FlopCounterMode's convention) and ``gmacs = gflops / 2`` (the number to compare with
published tables). Only operators in torch's FLOP registry are counted (matrix products,
convolutions, attention kernels); element-wise ops, normalisation, pooling, interpolation,
``grid_sample`` and bias additions are not, which matches fvcore's defaults closely.

:func:`measure_latency` times batch forwards under ``torch.inference_mode`` with CUDA
synchronisation around every iteration on GPU, and optionally in reduced precision
(autocast or a half-precision copy of the model).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.device import resolve_device

__all__ = [
    "device_description",
    "load_average",
    "FlopCount",
    "count_params",
    "count_flops",
    "measure_latency",
    "complexity_table",
    "write_report",
]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward pass.

    Attributes:
        gflops: giga floating-point operations, 2 per multiply-add (FlopCounterMode's count).
        gmacs: giga multiply-adds, ``gflops / 2``; what papers such as Mask2Former and
            MaskConver report under the name "GFLOPs".
        by_operator: GFLOPs (2 per multiply-add) per counted aten operator, e.g.
            ``{"convolution": 3.1, "mm": 0.2}``.
    """

    gflops: float
    gmacs: float
    by_operator: dict[str, float] = field(default_factory=dict)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) == 0 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(
            f"input_shape must be a sequence of positive ints such as "
            f"(1, 3, 640, 640), got {input_shape!r}"
        )
    return shape


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model``.

    A parameter shared between submodules is counted once (``nn.Module.parameters`` yields
    each tensor once). Buffers (e.g. BatchNorm running statistics) are not parameters.

    Arguments:
        model: any module.
        trainable_only: count only parameters with ``requires_grad=True``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device = "cpu",
) -> FlopCount:
    """FLOPs of one forward pass of ``model`` on a random input of ``input_shape``.

    The model is run once in eval mode under ``torch.inference_mode`` and
    ``FlopCounterMode``; its train/eval state is restored afterwards.

    Arguments:
        model: called as ``model(x)`` with ``x`` float32 ``[B, C, H, W]`` (wrap models that
            need keyword inputs in a small adapter module).
        input_shape: e.g. ``(1, 3, 640, 640)``.
        device: where the forward runs; the model is moved there.

    Returns:
        A :class:`FlopCount`: ``gflops`` (2 FLOPs per multiply-add, FlopCounterMode's
        convention) and ``gmacs`` (multiply-adds; the "GFLOPs" of Mask2Former/MaskConver
        tables), plus a per-operator breakdown.
    """
    shape = _check_shape(input_shape)
    dev = resolve_device(device)
    was_training = model.training
    model.to(dev).eval()
    x = torch.randn(shape, device=dev)
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            model(x)
    finally:
        model.train(was_training)
    total = counter.get_total_flops()
    per_op: dict[str, float] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        name = getattr(op, "__name__", str(op)).split(".")[0]
        per_op[name] = per_op.get(name, 0.0) + n / 1e9
    return FlopCount(gflops=total / 1e9, gmacs=total / 2e9, by_operator=per_op)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    device: str | torch.device = "cpu",
    warmup: int = 3,
    iters: int = 10,
    dtype: torch.dtype | None = None,
    precision_mode: Literal["autocast", "half"] = "autocast",
) -> dict[str, float]:
    """Wall-clock latency of ``model(x)`` for a random ``x`` of ``input_shape``.

    Every forward runs in eval mode under ``torch.inference_mode``; on CUDA the device is
    synchronised before starting and after finishing each timed forward, so the numbers are
    end-to-end GPU time. No timing is taken during the ``warmup`` forwards.

    Arguments:
        model: called as ``model(x)``; moved to ``device`` and put in eval mode (its training
            flag is restored afterwards).
        input_shape: ``(B, C, H, W)``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        warmup: untimed forwards first (cuDNN autotuning, allocator warm-up).
        iters: timed forwards, >= 1.
        dtype: ``None`` for the model's own precision (float32), or a reduced precision such
            as ``torch.float16`` / ``torch.bfloat16``.
        precision_mode: with ``dtype`` set, ``"autocast"`` runs under
            ``torch.autocast(device.type, dtype)``; ``"half"`` times a copy of the model cast
            to ``dtype`` on an input of ``dtype`` (the original model is left untouched).

    Returns:
        ``{"mean_ms", "median_ms", "p90_ms", "fps"}`` where ``fps = B * 1000 / mean_ms``
        (images per second).
    """
    shape = _check_shape(input_shape)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if precision_mode not in ("autocast", "half"):
        raise ValueError(f"precision_mode must be 'autocast' or 'half', got {precision_mode!r}")
    dev = resolve_device(device)

    was_training = model.training
    net = model.to(dev).eval()
    x = torch.randn(shape, device=dev)
    context: Any = nullcontext()
    if dtype is not None:
        if precision_mode == "half":
            net = copy.deepcopy(model).to(dtype)
            x = x.to(dtype)
        else:
            context = torch.autocast(device_type=dev.type, dtype=dtype)

    times_ms: list[float] = []
    try:
        with torch.inference_mode(), context:
            for _ in range(warmup):
                net(x)
            _synchronize(dev)
            for _ in range(iters):
                start = time.perf_counter()
                net(x)
                _synchronize(dev)
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)

    mean_ms = statistics.fmean(times_ms)
    # p90 with linear interpolation between order statistics (numpy's default)
    ordered = sorted(times_ms)
    pos = 0.9 * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    p90 = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return {
        "mean_ms": mean_ms,
        "median_ms": statistics.median(times_ms),
        "p90_ms": p90,
        "fps": shape[0] * 1e3 / mean_ms,
    }


def _format_cell(value: Any, float_format: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "–" if math.isnan(value) else format(value, float_format)
    return str(value).replace("|", "\\|")


def complexity_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    float_format: str = ".2f",
) -> str:
    """Render rows of measurements as a GitHub-flavoured Markdown table.

    Arguments:
        rows: one mapping per table row, column name -> value. Floats are formatted with
            ``float_format``; ``None`` and NaN print as "–"; a column missing from a row is "–".
        columns: column order; default is the order in which keys first appear in ``rows``.
        float_format: ``format`` spec for floats.

    Returns:
        The table as one string (header, separator, one line per row), ending in a newline.
        Text columns are left-aligned, numeric columns right-aligned.
    """
    if not rows:
        raise ValueError("complexity_table: rows is empty")
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    columns = list(columns)
    if not columns:
        raise ValueError("complexity_table: no columns")

    def numeric(col: str) -> bool:
        vals = [r[col] for r in rows if r.get(col) is not None]
        return bool(vals) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
        )

    align = ["---:" if numeric(c) else ":---" for c in columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join(align) + " |",
    ]
    for row in rows:
        cells = [_format_cell(row.get(c), float_format) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def device_description(device: torch.device) -> str:
    """``"GPU <name>"`` or ``"CPU <model name> (<n> logical cores)"``, for benchmark headers."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} logical cores)"


def load_average() -> str:
    """The 1/5/15-minute load average as text (CPU timings on a shared machine depend on it)."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def write_report(text: str, out: str | Path | None, tag: str) -> None:
    """Write a benchmark's Markdown report to ``out`` (parents created) and say so on stderr;
    nothing when ``out`` is None."""
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[{tag}] wrote {out}", file=sys.stderr)
