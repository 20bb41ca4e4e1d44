"""Benchmark the RegSAM student (eager, torch.export, onnxruntime fp32/INT8) against Mask2Former.

Every row is measured side by side, as ``bench_distill.py`` does: ``--rounds`` fresh Python
processes each build every row, warm each up, then alternate their forwards round-robin (round
``k`` starts at row ``k mod R``), so a slow stretch of a shared machine hits all rows alike; a
row's time is the median over the processes of each process's median. Load average and thread
counts are recorded in the report.

Rows, per student config (random weights, ``num_classes = 133``, batch 1, fp32):

* ``eager``: the student as trained (``forward_pixels``: uint8 in, normalisation inside);
* ``torch.export``: the exported program (:mod:`pipeline.deploy.export`: BatchNorm folded into
  the convolutions, one program with dynamic H/W for every size), run by torch;
* ``onnxruntime fp32`` / ``onnxruntime int8``: the same graph as ONNX (dynamic H/W), and
  onnxruntime's dynamic INT8 quantisation of it;

and Mask2Former with a ResNet-50 backbone from ``transformers`` (random weights, 100 queries,
133 classes, built from config objects: nothing downloaded), eager. The default configs are the
default student, the COCO student and the COCO student with the depthwise-separable neck
(``configs/coco/regnet_distill_fast.yaml``).

Reference rows (``--no-reference`` skips them) measure what these cores deliver on the students'
dominant operation: :class:`ConvReference`, a stack of ``REFERENCE_DEPTH`` 3x3 convolutions
128 -> 128 channels (+ ReLU) at stride 4 (160x160 at 640x640: the FPN's P2 output conv and the
mask conv of the COCO student), BatchNorm folded, run in torch eager and onnxruntime fp32 in the
same round-robin; and the same stack depthwise-separable (the separable neck's blocks). The
best reference GMAC/s then gives each student a FLOP floor (a second table): ``floor ms`` = the
student's GMACs / the best reference GMAC/s, the fastest any runtime could run that many MACs on
these cores if every MAC ran as fast as the best-measured dense convolution; ``max M2F / row`` =
Mask2Former's eager ms / floor ms, the largest ratio to Mask2Former reachable at that FLOP count;
``max eager / floor`` = the eager student's ms / floor ms, the largest speed-up any runtime
(onnxruntime included) could give over eager; the same bounds for the backbone alone (its
GMACs counted on the backbone module by itself) bound every student with that backbone.

Columns: parameters, GMACs (multiply-adds, FlopCounterMode on the eager model; the papers'
"GFLOPs"), median ms, Mask2Former's ms / the row's ms at equal size, achieved GMAC/s (GMACs /
seconds: how much of the cores' throughput each row turns into model arithmetic). On CUDA the
same script adds fp16-autocast FPS rows for eager models; without CUDA the report says the GPU
rows were not measured. ``--profile`` adds torch.profiler's top operators of the eager and the
BatchNorm-folded default student.

Example (from the repository root)::

    python benchmarks/bench_model.py --config configs/reg_sam/regnet_distill.yaml \\
        configs/coco/regnet_distill.yaml configs/coco/regnet_distill_fast.yaml \\
        --sizes 640x640 1024x2048 --threads 2 --rounds 3 --profile --out benchmarks/results/model.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this checkout's pipeline
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # and its sibling bench_onnx, however loaded
    sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline.evaluation.complexity import (  # noqa: E402
    complexity_table,
    count_flops,
    count_params,  # noqa: E402
    device_description,
    load_average,
    write_report,
)

NUM_CLASSES = 133  # COCO panoptic: 80 things + 53 stuff
PEER = "Mask2Former R50 (transformers), eager"
STUDENT_ROWS = ("eager", "torch.export", "onnxruntime fp32", "onnxruntime int8")
DEFAULT_CONFIGS = [
    "configs/reg_sam/regnet_distill.yaml",
    "configs/coco/regnet_distill.yaml",
    "configs/coco/regnet_distill_fast.yaml",
]
REFERENCE_CHANNELS = 128  # the COCO student's neck width
REFERENCE_STRIDE = 4  # its P2 / mask-feature stride: 160x160 at 640x640
REFERENCE_DEPTH = 3
REFERENCE_KINDS = ("dense", "separable")
REFERENCE_ROWS = ("eager", "onnxruntime fp32")


# --------------------------------------------------------------------------- models
class PeerAdapter(nn.Module):
    """Mask2Former called as ``model(pixel_values=images)`` on ImageNet-normalised floats
    (its own image processor normalises outside the model; this costs it one subtraction)."""

    def __init__(self, *, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Any:
        return self.model(pixel_values=images)


def build_mask2former_r50(num_labels: int = NUM_CLASSES) -> nn.Module:
    """Mask2Former with a ResNet-50 backbone, random weights, built without any download."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "resnet is not a supported backbone" is informational
    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        num_labels=num_labels,
    )
    return Mask2FormerForUniversalSegmentation(config)


def build_student_from(config: str) -> nn.Module:
    """The config's student with random weights (seed 0); weights never change speed."""
    from pipeline.config import load_config
    from pipeline.models.student import build_student

    cfg = load_config(config, ["model.backbone.pretrained_path=null"])
    torch.manual_seed(0)
    return build_student(cfg.model, NUM_CLASSES).eval()


def student_label(config: str) -> str:
    from pipeline.config import load_config

    m = load_config(config).model
    return (
        f"student {m.backbone.name}, neck {m.neck.channels}"
        f"{' separable' if m.neck.separable else ''}, {m.head.num_queries} q × "
        f"{m.head.num_stages} st"
    )


class _Eager(nn.Module):
    def __init__(self, *, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> Any:
        return self.student.forward_pixels(images)


class ConvReference(nn.Module):
    """The roofline reference: ``depth`` 3x3 conv -> BatchNorm -> ReLU blocks,
    ``channels -> channels``, dense (:class:`~pipeline.models.neck.ConvNormAct`'s conv with a
    BatchNorm) or depthwise-separable (:class:`~pipeline.models.neck.SeparableConvNormAct`).

    ``[B, channels, h, w] -> [B, channels, h, w]``. Built by :func:`build_reference`, which
    folds the BatchNorms as export does, so what runs is conv (+ bias) -> ReLU, like the
    exported students' neck.
    """

    def __init__(self, *, channels: int, depth: int, separable: bool = False) -> None:
        super().__init__()
        from pipeline.models.neck import SeparableConvNormAct

        blocks: list[nn.Module] = []
        for _ in range(depth):
            if separable:
                blocks.append(SeparableConvNormAct(in_channels=channels, out_channels=channels))
            else:
                blocks.append(
                    nn.Sequential(
                        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                        nn.BatchNorm2d(channels),
                        nn.ReLU(inplace=True),
                    )
                )
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def build_reference(kind: str, seed: int = 0) -> ConvReference:
    """The eval-mode reference of ``kind`` ("dense" or "separable"), BatchNorm folded; the same
    weights in every process (``seed``)."""
    from pipeline.deploy.export import fold_batchnorm

    if kind not in REFERENCE_KINDS:
        raise ValueError(f"reference kind must be one of {REFERENCE_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    model = ConvReference(
        channels=REFERENCE_CHANNELS, depth=REFERENCE_DEPTH, separable=kind == "separable"
    ).eval()
    example = torch.randn(1, REFERENCE_CHANNELS, 8, 8)
    folded = fold_batchnorm(model, example)
    expected = REFERENCE_DEPTH * (2 if kind == "separable" else 1)
    if folded != expected:
        raise RuntimeError(f"folded {folded} BatchNorms of the {kind} reference, not {expected}")
    return model


def reference_shape(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The reference's input ``[1, 128, H / 4, W / 4]`` for an image of ``size = (H, W)``."""
    h, w = size
    return (1, REFERENCE_CHANNELS, h // REFERENCE_STRIDE, w // REFERENCE_STRIDE)


def reference_label(kind: str) -> str:
    c, d = REFERENCE_CHANNELS, REFERENCE_DEPTH
    op = f"3x3 conv {c}→{c}" if kind == "dense" else f"3x3 depthwise {c} + 1x1 conv {c}→{c}"
    return f"reference: {d} × ({op}, BN folded, ReLU) at H/{REFERENCE_STRIDE}×W/{REFERENCE_STRIDE}"


def export_reference_onnx(model: nn.Module, path: Path, opset: int = 18) -> Path:
    """``model`` as ONNX (torch's dynamo exporter, as :func:`pipeline.deploy.export.export_onnx`)
    with free H/W, input ``x``."""
    example = torch.randn(1, REFERENCE_CHANNELS, 16, 16)
    height = torch.export.Dim("height", min=2, max=4096)
    width = torch.export.Dim("width", min=2, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes={"x": {2: height, 3: width}},
        optimize=True,
        external_data=False,
        verbose=False,
    )
    return Path(path)


# ---------------------------------------------------------------------------- setup
def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes: expected HxW such as 640x640, got {text!r}"
        ) from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"--sizes: {text!r} must be positive multiples of 32")
    return h, w


def per_size(values: list[int] | None, n: int, default: list[int], name: str) -> list[int]:
    """One value per size: a single value is broadcast, None takes ``default``."""
    values = values if values else default
    if len(values) == 1:
        values = values * n
    if len(values) < n:
        raise SystemExit(f"{name}: give one value or one per size ({n}), got {values}")
    return values[:n]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="student config(s); four rows each (default: %(default)s)",
    )
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(640, 640), (1024, 2048)])
    p.add_argument(
        "--warmup",
        nargs="+",
        type=int,
        default=None,
        help="untimed forwards per row and process, one value or one per size (default 2 1)",
    )
    p.add_argument(
        "--iters",
        nargs="+",
        type=int,
        default=None,
        help="timed forwards per row and process, one value or one per size (default 7 3)",
    )
    p.add_argument("--rounds", type=int, default=3, help="fresh processes timing all rows")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime CPU threads")
    p.add_argument("--no-peer", action="store_true", help="skip Mask2Former")
    p.add_argument("--no-int8", action="store_true", help="skip the INT8 rows")
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the dense/separable convolution reference rows (and the FLOP-floor table)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler top operators of the first student, eager and folded",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the exported files go (default: a temporary folder)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(
    configs: list[str],
    sizes: list[tuple[int, int]],
    workdir: Path,
    int8: bool,
    peer: bool,
    reference: bool = True,
) -> dict[str, Any]:
    """Build, export and count every model once; the child processes load these files."""
    from pipeline.deploy.export import export_onnx, export_torch, quantize_onnx_dynamic

    students = []
    for i, config in enumerate(configs):
        student = build_student_from(config)
        state = workdir / f"student{i}.pth"
        torch.save(student.state_dict(), state)
        print(f"[bench_model] exporting {config} (ONNX, torch.export)", file=sys.stderr, flush=True)
        onnx = export_onnx(student, workdir / f"student{i}.onnx", sizes[0], dynamic=True)
        pt2 = export_torch(student, workdir / f"student{i}.pt2", sizes[0], dynamic=True)
        int8_path = quantize_onnx_dynamic(onnx, workdir / f"student{i}.int8.onnx") if int8 else None
        eager = _Eager(student=student)
        flops = {f"{h}x{w}": count_flops(eager, (1, 3, h, w)).gmacs for h, w in sizes}
        backbone = {f"{h}x{w}": count_flops(student.backbone, (1, 3, h, w)).gmacs for h, w in sizes}
        students.append(
            {
                "config": config,
                "label": student_label(config),
                "state": str(state),
                "onnx": str(onnx),
                "pt2": str(pt2),
                "int8": str(int8_path) if int8_path else None,
                "params": count_params(student),
                "gmacs": flops,
                "backbone_gmacs": backbone,
            }
        )
    out: dict[str, Any] = {"students": students}
    if reference:
        out["references"] = []
        for kind in REFERENCE_KINDS:
            model = build_reference(kind)
            onnx = export_reference_onnx(model, workdir / f"reference_{kind}.onnx")
            out["references"].append(
                {
                    "kind": kind,
                    "label": reference_label(kind),
                    "onnx": str(onnx),
                    "params": count_params(model),
                    "gmacs": {
                        f"{h}x{w}": count_flops(model, reference_shape((h, w))).gmacs
                        for h, w in sizes
                    },
                }
            )
    if peer:
        model = PeerAdapter(model=build_mask2former_r50().eval())
        out["peer"] = {
            "params": count_params(model),
            "gmacs": {f"{h}x{w}": count_flops(model, (1, 3, h, w)).gmacs for h, w in sizes},
        }
    return out


# ----------------------------------------------------------------------------- child
def _ort_session(path: str, threads: int, providers: list[str] | None = None):
    # spinning off: onnxruntime's idle worker threads otherwise keep spinning after a run,
    # taking the cores from whichever row comes next in the round-robin (measured by
    # check_ort_spinning.py); back to back, one session is as fast either way
    from bench_onnx import ort_session

    return ort_session(path, threads, spinning=False, providers=providers)


def build_rows(spec: dict[str, Any]) -> list[tuple[str, Any]]:
    """(row key, callable on uint8 ``[1, 3, H, W]``) for every row of the spec."""
    rows: list[tuple[str, Any]] = []
    threads = spec["threads"]
    for i, s in enumerate(spec["students"]):
        student = build_student_from(s["config"])
        student.load_state_dict(torch.load(s["state"], weights_only=True))
        rows.append((f"{i}|eager", student.forward_pixels))
        program = torch.export.load(s["pt2"]).module()
        rows.append((f"{i}|torch.export", program))
        fp32 = _ort_session(s["onnx"], threads)
        rows.append(
            (f"{i}|onnxruntime fp32", lambda x, sess=fp32: sess.run(None, {"images": x.numpy()}))
        )
        if s["int8"]:
            int8 = _ort_session(s["int8"], threads)
            rows.append(
                (
                    f"{i}|onnxruntime int8",
                    lambda x, sess=int8: sess.run(None, {"images": x.numpy()}),
                )
            )
    for ref in spec.get("references", []):
        model = build_reference(ref["kind"])
        session = _ort_session(ref["onnx"], threads)
        gen = torch.Generator().manual_seed(0)
        inputs = {  # made here, never inside a timed forward; keyed by the image's (H, W)
            (h, w): torch.randn(reference_shape((h, w)), generator=gen) for h, w in spec["sizes"]
        }
        arrays = {k: v.numpy() for k, v in inputs.items()}
        rows.append(
            (f"ref|{ref['kind']}|eager", lambda x, m=model, i=inputs: m(i[tuple(x.shape[-2:])]))
        )
        rows.append(
            (
                f"ref|{ref['kind']}|onnxruntime fp32",
                lambda x, sess=session, a=arrays: sess.run(None, {"x": a[tuple(x.shape[-2:])]}),
            )
        )
    if spec["peer"]:
        torch.manual_seed(0)
        peer = PeerAdapter(model=build_mask2former_r50().eval())
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
        rows.append(("peer|eager", lambda x: peer((x.float() - mean) / std)))
    return rows


def measure_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """All rows in this process, forwards alternating round-robin; per size and row the median
    of the timed forwards (ms)."""
    torch.set_num_threads(spec["threads"])
    rows = build_rows(spec)
    result: dict[str, Any] = {
        "load_before": load_average(),
        "ms": {},
        "torch_threads": torch.get_num_threads(),
    }
    for (h, w), warmup, iters in zip(spec["sizes"], spec["warmup"], spec["iters"]):
        image = torch.randint(
            0, 256, (1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        times: dict[str, list[float]] = {key: [] for key, _ in rows}
        with torch.inference_mode():
            for it in range(warmup + iters):
                for j in range(len(rows)):
                    key, fn = rows[(it + j) % len(rows)]
                    start = time.perf_counter()
                    fn(image)
                    if it >= warmup:
                        times[key].append(time.perf_counter() - start)
        result["ms"][f"{h}x{w}"] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(
            f"[bench_model] {h}x{w}: "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in result["ms"][f"{h}x{w}"].items()),
            file=sys.stderr,
            flush=True,
        )
    result["load_after"] = load_average()
    return result


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                str(spec_path),
                str(out_path),
            ]
        )
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(
                f"a benchmark process failed (exit code {proc.returncode}); its "
                "traceback is on stderr above"
            )
        return json.loads(out_path.read_text())


# --------------------------------------------------------------------------- profile
def profile_student(config: str, size: tuple[int, int], threads: int, iters: int = 3) -> str:
    """torch.profiler's top operators (self CPU time) of the eager and the BatchNorm-folded
    student at ``size``, as Markdown."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.deploy.export import fold_batchnorm

    torch.set_num_threads(threads)
    student = build_student_from(config)
    image = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8)
    text = []
    for name in ("eager", "BatchNorm folded"):
        if name != "eager":
            fold_batchnorm(student, student.normalize(image))
        with torch.inference_mode():
            student.forward_pixels(image)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(iters):
                    student.forward_pixels(image)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        rows = [
            {
                "operator": e.key,
                "self CPU %": 100 * e.self_cpu_time_total / total,
                "ms per forward": e.self_cpu_time_total / 1e3 / iters,
                "calls": e.count // iters,
            }
            for e in events[:8]
        ]
        text.append(
            f"**{name}** ({total / 1e3 / iters:.0f} ms per forward under the "
            f"profiler)\n\n" + complexity_table(rows, float_format=".1f")
        )
    return "\n".join(text)


def cuda_rows(
    prepared: dict[str, Any], size: tuple[int, int], warmup: int = 10, iters: int = 50
) -> str:
    """fp16-autocast FPS of the eager students and Mask2Former on CUDA at ``size``."""
    from pipeline.evaluation.complexity import measure_latency

    rows = []
    models = [
        (s["label"], lambda s=s: _Eager(student=build_student_from(s["config"])))
        for s in prepared["students"]
    ]
    if "peer" in prepared:
        models.append((PEER, lambda: PeerAdapter(model=build_mask2former_r50())))
    for label, build in models:
        res = measure_latency(build(), (1, 3, *size), "cuda", warmup, iters, dtype=torch.float16)
        rows.append(
            {
                "model": label,
                "runtime": "eager fp16 (autocast)",
                f"ms {size[0]}x{size[1]}": res["median_ms"],
                "FPS": res["fps"],
            }
        )
        torch.cuda.empty_cache()
    return complexity_table(rows, float_format=".2f")


# ----------------------------------------------------------------------------- main
def table(
    prepared: dict[str, Any], runs: list[dict[str, Any]], sizes: list[tuple[int, int]]
) -> str:
    rows = []
    entries = [
        (f"{i}|{r}", s["label"], r, s)
        for i, s in enumerate(prepared["students"])
        for r in STUDENT_ROWS
    ]
    if "peer" in prepared:
        entries.append(("peer|eager", PEER, "", prepared["peer"]))
    entries += [
        (f"ref|{ref['kind']}|{r}", ref["label"], r, ref)
        for ref in prepared.get("references", [])
        for r in REFERENCE_ROWS
    ]
    for key, label, kind, info in entries:
        if not all(key in run["ms"][f"{h}x{w}"] for run in runs for h, w in sizes):
            continue
        row: dict[str, Any] = {
            "model": label,
            "runtime": kind or "eager",
            "params (M)": info["params"] / 1e6,
        }
        for h, w in sizes:
            s = f"{h}x{w}"
            ms = statistics.median(run["ms"][s][key] for run in runs)
            peer_ms = (
                statistics.median(run["ms"][s]["peer|eager"] for run in runs)
                if "peer" in prepared
                else None
            )
            row[f"GMACs {s}"] = info["gmacs"][s]
            row[f"ms {s}"] = ms
            row[f"M2F / row {s}"] = peer_ms / ms if peer_ms and not key.startswith("ref|") else None
            row[f"GMAC/s {s}"] = info["gmacs"][s] / (ms / 1e3)
        rows.append(row)
    return complexity_table(rows, float_format=".2f")


def _median_ms(runs: list[dict[str, Any]], size: str, key: str) -> float | None:
    if not all(key in run["ms"][size] for run in runs):
        return None
    return statistics.median(run["ms"][size][key] for run in runs)


def best_reference(
    prepared: dict[str, Any], runs: list[dict[str, Any]], size: str
) -> tuple[float, str] | None:
    """(GMAC/s, row) of the fastest reference row at ``size`` (median ms over processes), or
    None without reference rows."""
    best: tuple[float, str] | None = None
    for ref in prepared.get("references", []):
        for r in REFERENCE_ROWS:
            ms = _median_ms(runs, size, f"ref|{ref['kind']}|{r}")
            if ms is None:
                continue
            rate = ref["gmacs"][size] / (ms / 1e3)
            if best is None or rate > best[0]:
                best = (rate, f"{ref['kind']}, {r}")
    return best


def floor_table(
    prepared: dict[str, Any], runs: list[dict[str, Any]], sizes: list[tuple[int, int]]
) -> str | None:
    """Per student and size, what its GMACs allow at the best reference GMAC/s: floor ms (the
    GMACs at that rate), the largest ratio to Mask2Former's eager ms any runtime could reach,
    the largest speed-up over the eager student, and the same two ratios for the backbone
    alone. None without reference rows."""
    best = {f"{h}x{w}": best_reference(prepared, runs, f"{h}x{w}") for h, w in sizes}
    if not any(best.values()):
        return None
    rows = []
    for i, student in enumerate(prepared["students"]):
        row: dict[str, Any] = {"model": student["label"]}
        for h, w in sizes:
            s = f"{h}x{w}"
            rate = best[s][0] if best[s] else None
            peer_ms = _median_ms(runs, s, "peer|eager") if "peer" in prepared else None
            eager_ms = _median_ms(runs, s, f"{i}|eager")
            gmacs, backbone = student["gmacs"][s], student["backbone_gmacs"][s]
            floor_ms = 1e3 * gmacs / rate if rate else None
            backbone_ms = 1e3 * backbone / rate if rate else None
            row[f"GMACs {s}"] = gmacs
            row[f"backbone GMACs {s}"] = backbone
            row[f"floor ms {s}"] = floor_ms
            row[f"max M2F / row {s}"] = peer_ms / floor_ms if peer_ms and floor_ms else None
            row[f"max M2F / row, backbone alone {s}"] = (
                peer_ms / backbone_ms if peer_ms and backbone_ms else None
            )
            row[f"max eager / floor {s}"] = eager_ms / floor_ms if eager_ms and floor_ms else None
        rows.append(row)
    lines = [
        "## FLOP floor",
        "",
        "What each student's multiply-adds allow on these cores: floor ms = the student's GMACs / "
        "the best GMAC/s of the reference rows above (dense 3x3 convolutions at stride 4, the "
        "students' dominant operation, BatchNorm folded), i.e. its time if every MAC ran as "
        "fast as the fastest measured convolution; max M2F / row = Mask2Former's eager ms / "
        "floor ms, the largest ratio to Mask2Former any runtime could reach at this FLOP count; "
        "max eager / floor = the eager student's ms / floor ms, the largest speed-up any runtime "
        "(onnxruntime included) could give over eager; backbone alone = the same bound from the "
        "backbone's GMACs (the backbone module counted by itself), which binds every student "
        "with that backbone whatever its neck and head. A measured bound, not a proof: a "
        "runtime whose operators beat the best reference rate would beat it. The separable "
        "reference rows show how close depthwise-separable blocks come to that rate: a student "
        "made partly of them (the separable neck) spends its MACs slower than the floor assumes, "
        "so its floor is further below its reachable time.",
        "",
        "- best reference: "
        + "; ".join(
            f"{s}: {b[0]:.2f} GMAC/s ({b[1]})" if b else f"{s}: not measured"
            for s, b in best.items()
        ),
        "",
        complexity_table(rows, float_format=".2f"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str | None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(measure_interleaved(spec)))
        return None
    torch.set_num_threads(args.threads)
    sizes: list[tuple[int, int]] = args.sizes
    warmups = per_size(args.warmup, len(sizes), [2, 1], "--warmup")
    iters = per_size(args.iters, len(sizes), [7, 3], "--iters")
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_model_files_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        prepared = prepare(
            args.config,
            sizes,
            workdir,
            not args.no_int8,
            not args.no_peer,
            reference=not args.no_reference,
        )
        spec = {
            "students": prepared["students"],
            "references": prepared.get("references", []),
            "peer": "peer" in prepared,
            "sizes": sizes,
            "warmup": warmups,
            "iters": iters,
            "threads": args.threads,
        }
        runs = []
        for k in range(args.rounds):
            print(
                f"[bench_model] process {k + 1}/{args.rounds}: all rows side by side",
                file=sys.stderr,
                flush=True,
            )
            runs.append(run_child(spec))
    profile = profile_student(args.config[0], sizes[0], args.threads) if args.profile else None
    cuda = torch.cuda.is_available()
    gpu = cuda_rows(prepared, sizes[0]) if cuda else None

    timing = ", ".join(
        f"{h}x{w}: {a} warm-up + {b} timed" for (h, w), a, b in zip(sizes, warmups, iters)
    )
    header = [
        "# RegSAM student (eager / torch.export / onnxruntime) vs Mask2Former R50",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}; "
        f"onnxruntime {_ort_version()}",
        f"- device: {device_description(torch.device('cpu'))}; {args.threads} threads "
        f"(torch.set_num_threads and onnxruntime intra-op, onnxruntime's idle spinning off so "
        f"it does not take the cores from the next row; children reported "
        f"{sorted({r['torch_threads'] for r in runs})} torch threads)",
        f"- load average (1/5/15 min): at start {load_start}; per process before/after: "
        + "; ".join(f"{r['load_before']} → {r['load_after']}" for r in runs),
        f"- batch 1, random weights, {NUM_CLASSES} classes, fp32; {args.rounds} fresh processes, "
        f"rows interleaved round-robin ({timing}); ms = median over processes of each "
        "process's median; uint8 input, normalisation inside every row, no panoptic merge",
        '- GMACs = multiply-adds of the eager model (FlopCounterMode; the papers\' "GFLOPs"); '
        "GMAC/s = GMACs / seconds; M2F / row = Mask2Former's ms / the row's ms",
        "- torch.export and onnxruntime rows run the exported graph: BatchNorm folded into the "
        "convolutions at export, dynamic H/W (one file for every size)",
        "- reference rows: "
        + (
            f"{REFERENCE_DEPTH} blocks of 3x3 convolution {REFERENCE_CHANNELS}→"
            f"{REFERENCE_CHANNELS} + ReLU (dense, and depthwise-separable) on a random float [1, "
            f"{REFERENCE_CHANNELS}, H/{REFERENCE_STRIDE}, W/{REFERENCE_STRIDE}] input, BatchNorm "
            "folded, in the same round-robin; no M2F / row; they set the FLOP floor below"
            if not args.no_reference
            else "not measured (--no-reference)"
        ),
        "- GPU rows: "
        + (
            f"eager fp16 FPS on {device_description(torch.device('cuda'))} "
            "below (onnxruntime-gpu / TensorRT rows are not implemented)"
            if cuda
            else "not measured (no CUDA device on this machine)"
        ),
    ]
    report = "\n".join(header) + "\n\n" + table(prepared, runs, sizes)
    floor = floor_table(prepared, runs, sizes)
    if floor:
        report += "\n" + floor
    if gpu:
        report += "\n## CUDA\n\n" + gpu
    if profile:
        report += (
            f"\n## torch.profiler: {args.config[0]} at {sizes[0][0]}x{sizes[0][1]} "
            "(top operators by self CPU time)\n\n" + profile
        )
    print(report)
    write_report(report, args.out, "bench_model")
    return report


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
