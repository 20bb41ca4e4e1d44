"""Export a trained student (``final.pth``) to ONNX or a torch.export program.

The exported graph is :class:`DeployStudent`: uint8 (or float 0-255) RGB ``[1, 3, H, W]`` in,
the student's own normalisation inside (its backbone's timm pretrained mean/std), the last
stage's ``pred_logits [1, Q, K + 1]``, ``pred_masks [1, Q, H / r, W / r]`` and
``pred_iou [1, Q]`` out (no deep-supervision outputs). Before export the copy being exported is
put in its inference form (:func:`pipeline.deploy.fold.inference_form`): every BatchNorm that
directly follows a convolution is folded into it, the neck's fusion weights are folded into its
levels and its coordinate conv is split, so the exported model computes the same outputs with
fewer and better-shaped operations.

Everything :mod:`pipeline.deploy.runner` needs to reproduce the PyTorch predictions travels
in the file (ONNX ``metadata_props`` / the ``.pt2``'s extra file ``regsam.json``): categories,
test size, size divisibility, merge thresholds, input size, whether H/W are dynamic.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from pipeline.deploy.fold import fold_batchnorm, inference_form
from pipeline.evaluation.predict import categories_to_json
from pipeline.models.student import RegSAMStudent

__all__ = [
    "DeployStudent",
    "ExportError",
    "fold_batchnorm",
    "check_input_size",
    "load_student_for_export",
    "export_onnx",
    "export_torch",
    "quantize_onnx_dynamic",
    "export_checkpoint",
    "METADATA_KEY",
    "OUTPUT_NAMES",
]

log = logging.getLogger(__name__)

METADATA_KEY = "regsam"  # ONNX metadata_props key / name of the .pt2 extra file (+ ".json")
OUTPUT_NAMES = ("pred_logits", "pred_masks", "pred_iou")
MAX_DYNAMIC_SIDE = 8192  # upper bound of a dynamic H / W


class ExportError(ValueError):
    """A bad export request (not a student, bad size, missing exporter package)."""


class DeployStudent(nn.Module):
    """The student as deployed: raw RGB in, the last stage's three outputs out."""

    def __init__(self, *, student: RegSAMStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """
        Arguments:
            images: uint8 (or float 0-255) RGB ``[B, 3, H, W]``, H and W multiples of 32.

        Returns:
            ``pred_logits [B, Q, K + 1]``, ``pred_masks [B, Q, H / r, W / r]``, ``pred_iou [B, Q]``.
        """
        out = self.student.forward_pixels(images)
        return out["pred_logits"], out["pred_masks"], out["pred_iou"]


def check_input_size(size: Sequence[int], stride: int) -> tuple[int, int]:
    """``(H, W)`` as ints, or :class:`ExportError` unless both are positive multiples of ``stride``."""
    if len(size) != 2:
        raise ExportError(f"--size needs two numbers H W, got {list(size)}")
    height, width = (int(s) for s in size)
    if height <= 0 or width <= 0 or height % stride or width % stride:
        raise ExportError(
            f"--size {height} {width}: both sides must be positive multiples of the model's "
            f"stride {stride} (its coarsest backbone level), e.g. "
            f"{max(stride, round(height / stride) * stride)} "
            f"{max(stride, round(width / stride) * stride)}"
        )
    return height, width


def load_student_for_export(path: Path) -> tuple[RegSAMStudent, Any, list]:
    """(eval student, config, categories) from a run's ``final.pth`` (or the student part of
    its ``checkpoints/last.pth``), or :class:`ExportError` naming the file when it is not a
    RegSAM student."""
    from pipeline.evaluation.run import load_student

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"--checkpoint {path}: no such file (pass a run's final.pth)")
    try:
        return load_student(path, "cpu")
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ExportError(
            f"--checkpoint {path} is not a RegSAM student (pass a run's final.pth written by "
            f"`python -m pipeline train`, or its checkpoints/last.pth): {exc}"
        ) from exc


def _deploy_module(student: RegSAMStudent, example: Tensor, fold: bool) -> DeployStudent:
    module = DeployStudent(
        student=copy.deepcopy(student)
    ).eval()  # the wrapper too: no train-mode export
    if fold:
        done = inference_form(module.student, module.student.normalize(example))
        log.info(
            "inference form: %d BatchNorm layers folded into their convolutions, %d fusion "
            "weights folded into the levels, %d coordinate conv split",
            done["batchnorms_folded"],
            done["fusion_levels_folded"],
            done["coord_convs_split"],
        )
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _example_and_shapes(
    size: tuple[int, int], dynamic: bool, stride: int
) -> tuple[Tensor, dict | None]:
    example = torch.randint(
        0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    if not dynamic:
        return example, None
    height = torch.export.Dim("height", min=1, max=MAX_DYNAMIC_SIDE // stride)
    width = torch.export.Dim("width", min=1, max=MAX_DYNAMIC_SIDE // stride)
    return example, {"images": {2: stride * height, 3: stride * width}}


def export_torch(
    student: RegSAMStudent,
    path: Path,
    size: tuple[int, int],
    *,
    dynamic: bool = False,
    metadata: dict[str, Any] | None = None,
    fold: bool = True,
) -> Path:
    """``torch.export`` program of :class:`DeployStudent` saved as ``path`` (``.pt2``)."""
    stride = max(student.strides)
    size = check_input_size(size, stride)
    example, shapes = _example_and_shapes(size, dynamic, stride)
    module = _deploy_module(student, example, fold)
    program = torch.export.export(module, (example,), dynamic_shapes=shapes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(
        program, path, extra_files={f"{METADATA_KEY}.json": json.dumps(metadata or {})}
    )
    return path


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(
            f"{what} needs the package {module!r}, which is not installed: "
            f'pip install -e ".[deploy]" (onnx, onnxscript, onnxruntime)'
        ) from exc


def export_onnx(
    student: RegSAMStudent,
    path: Path,
    size: tuple[int, int],
    *,
    dynamic: bool = False,
    metadata: dict[str, Any] | None = None,
    fold: bool = True,
    opset: int = 18,
) -> Path:
    """ONNX file of :class:`DeployStudent` (torch's dynamo exporter), metadata attached.

    The batch is 1 (the head's per-query grouped convolutions fix ``B * Q`` as ONNX ``group``);
    with ``dynamic`` H and W are free multiples of the stride.
    """
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    stride = max(student.strides)
    size = check_input_size(size, stride)
    example, shapes = _example_and_shapes(size, dynamic, stride)
    module = _deploy_module(student, example, fold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=["images"],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=shapes,
        optimize=True,
        external_data=False,
        verbose=False,
    )
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata or {})})
    onnx.save(model, str(path))
    return path


def quantize_onnx_dynamic(src: Path, dst: Path) -> Path:
    """onnxruntime's dynamic INT8 quantisation of ``src`` (weights int8, activations quantised
    at run time) written to ``dst``; the metadata is kept."""
    quantization = _require("onnxruntime.quantization", "--quantize dynamic")
    onnx = _require("onnx", "--quantize dynamic")
    quantization.quantize_dynamic(str(src), str(dst), weight_type=quantization.QuantType.QInt8)
    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    model = onnx.load(str(dst))
    if METADATA_KEY in meta:
        info = json.loads(meta[METADATA_KEY])
        info["quantize"] = "dynamic"
        onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(info)})
    onnx.save(model, str(dst))
    return Path(dst)


def deploy_metadata(
    student: RegSAMStudent,
    cfg: Any,
    categories: Sequence[Any],
    size: tuple[int, int],
    dynamic: bool,
) -> dict[str, Any]:
    """What the runner needs to reproduce ``predict``'s output from the exported file alone."""
    return {
        "format": "regsam-student/1",
        "categories": categories_to_json(categories),
        "test_size": cfg.data.test_size,
        "size_divisibility": cfg.data.size_divisibility,
        "object_mask_threshold": cfg.evaluation.object_mask_threshold,
        "overlap_threshold": cfg.evaluation.overlap_threshold,
        "input_size": list(size),
        "dynamic": bool(dynamic),
        "stride": max(student.strides),
        "mask_stride": student.mask_stride,
        "backbone": cfg.model.backbone.name,
        "pixel_mean": student.pixel_mean.flatten().tolist(),
        "pixel_std": student.pixel_std.flatten().tolist(),
        "quantize": None,
    }


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    *,
    fmt: Literal["onnx", "torch-export"],
    size: Sequence[int],
    dynamic: bool = False,
    quantize: Literal["dynamic"] | None = None,
) -> dict[str, Any]:
    """``python -m pipeline export``: the student of ``checkpoint`` written to ``out``.

    Returns:
        ``{"path": ..., "quantized": path or None, "max_abs_diff": {output: float}}``: the
        largest difference between the exported model and the eager student on one random
        image of ``size`` (fp32 file only).
    """
    if fmt not in ("onnx", "torch-export"):
        raise ExportError(f"--format must be onnx or torch-export, got {fmt!r}")
    if quantize not in (None, "dynamic"):
        raise ExportError(f"--quantize must be 'dynamic', got {quantize!r}")
    if quantize and fmt != "onnx":
        raise ExportError("--quantize dynamic needs --format onnx (onnxruntime's quantiser)")
    if fmt == "onnx":  # fail before the (slow) checkpoint load and tracing
        _require("onnxruntime", "checking the exported ONNX file")
        _require("onnxscript", "ONNX export")
    student, cfg, categories = load_student_for_export(Path(checkpoint))
    stride = max(student.strides)
    size = check_input_size(size, stride)
    meta = deploy_metadata(student, cfg, categories, size, dynamic)
    out = Path(out)
    if fmt == "onnx":
        export_onnx(student, out, size, dynamic=dynamic, metadata=meta)
    else:
        export_torch(student, out, size, dynamic=dynamic, metadata=meta)
    from pipeline.deploy.runner import load_exported

    runner = load_exported(out)
    example = torch.randint(
        0, 256, (1, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ref = student.forward_pixels(example)
    got = runner.forward_pixels(example)
    diffs = {k: float((got[k] - ref[k]).abs().max()) for k in OUTPUT_NAMES}
    result = {
        "path": str(out),
        "format": fmt,
        "size": list(size),
        "dynamic": dynamic,
        "max_abs_diff": diffs,
        "quantized": None,
    }
    log.info("exported %s (%s); max |exported - eager| on a random image: %s", out, fmt, diffs)
    if quantize:
        qpath = out.with_name(out.stem + ".int8" + out.suffix)
        quantize_onnx_dynamic(out, qpath)
        result["quantized"] = str(qpath)
    return result
