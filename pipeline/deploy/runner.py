"""Run an exported student (ONNX through onnxruntime, or a torch.export ``.pt2``).

:class:`ExportedStudent` has the student's ``forward_pixels`` contract (uint8 RGB
``[B, 3, H, W]`` -> ``pred_logits`` / ``pred_masks`` / ``pred_iou``), so
:func:`pipeline.evaluation.inference.run_panoptic_inference` — the one panoptic merge — and
everything above it (:func:`~pipeline.evaluation.predict.predict_folder`,
:func:`~pipeline.evaluation.evaluate.evaluate_model`) run it unchanged and write the same PNG /
JSON / overlays as the PyTorch path. This module imports neither timm nor the student nor the
trainer: a deploy machine needs torch (CPU) for the pre/post-processing and onnxruntime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ExportedStudent",
    "RunnerError",
    "load_exported",
    "predict_exported",
    "evaluate_exported",
]

log = logging.getLogger(__name__)

METADATA_KEY = "regsam"
OUTPUT_NAMES = ("pred_logits", "pred_masks", "pred_iou")
Backend = Literal["onnxruntime", "torch-export"]


class RunnerError(RuntimeError):
    """The exported file cannot be run (missing onnxruntime, not a RegSAM export, bad input)."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RunnerError(
            "--backend onnxruntime needs onnxruntime, which is not installed: "
            'pip install -e ".[deploy]" (or pip install onnxruntime)'
        ) from exc
    return onnxruntime


def _backend_of(path: Path) -> Backend:
    return "onnxruntime" if path.suffix == ".onnx" else "torch-export"


class ExportedStudent(nn.Module):
    """An exported student behind the eager student's ``forward_pixels`` contract.

    Static exports (fixed ``input_size``) get each view zero-padded bottom/right to that size
    and the mask logits cropped back to the view, as the eager path pads to the batch size;
    results then equal the eager model's on inputs of exactly that size. Dynamic exports run
    every view as is.
    """

    def __init__(
        self,
        *,
        path: Path,
        backend: Backend,
        metadata: dict[str, Any],
        session: Any = None,
        program: Any = None,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.backend = backend
        self.metadata = metadata
        self.session = session
        # not a registered submodule: torch.export's module refuses .train()/.eval()
        object.__setattr__(self, "program", program)
        self.mask_stride = int(metadata["mask_stride"])
        self.stride = int(metadata["stride"])
        self.dynamic = bool(metadata["dynamic"])
        self.input_size = tuple(int(s) for s in metadata["input_size"])

    @property
    def categories(self) -> list[SimpleNamespace]:
        """Dataset categories ordered by train id (``id``, ``name``, ``isthing``, ``color``)."""
        return [SimpleNamespace(**c) for c in self.metadata["categories"]]

    def _run_one(self, image: Tensor) -> list[Tensor]:
        """uint8 ``[1, 3, H, W]`` at a size the file accepts -> the three outputs."""
        if self.session is not None:
            outputs = self.session.run(list(OUTPUT_NAMES), {"images": image.cpu().numpy()})
            return [torch.from_numpy(np.asarray(o)) for o in outputs]
        with torch.no_grad():
            return list(self.program(image.cpu()))

    def forward_pixels(self, images: Tensor) -> dict[str, Tensor]:
        """
        Arguments:
            images: uint8 (or float 0-255) RGB ``[B, 3, H, W]``; H, W multiples of the stride
                (dynamic export) or at most the exported size (static export).

        Returns:
            ``pred_logits [B, Q, K + 1]``, ``pred_masks [B, Q, H / r, W / r]``, ``pred_iou [B, Q]``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise RunnerError(f"images must be RGB [B, 3, H, W], got {tuple(images.shape)}")
        height, width = (int(s) for s in images.shape[-2:])
        if images.dtype != torch.uint8:  # the graph's input type; 0-255 floats are rounded
            images = images.round().clamp(0, 255).to(torch.uint8)
        if self.dynamic:
            if height % self.stride or width % self.stride:
                raise RunnerError(
                    f"{self.path}: input {height}x{width} is not a multiple of the "
                    f"model's stride {self.stride}; pad it (EvalTransform does)"
                )
        else:
            in_h, in_w = self.input_size
            if height > in_h or width > in_w:
                raise RunnerError(
                    f"{self.path} was exported for a fixed {in_h}x{in_w} input and cannot take "
                    f"{height}x{width}; export with --dynamic or a larger --size (or lower "
                    f"--test-size)"
                )
            if (height, width) != (in_h, in_w):
                padded = images.new_zeros((images.shape[0], 3, in_h, in_w))
                padded[:, :, :height, :width] = images
                images = padded
        rows = [self._run_one(images[b : b + 1]) for b in range(images.shape[0])]
        logits, masks, iou = (torch.cat(parts, 0) for parts in zip(*rows))
        r = self.mask_stride
        masks = masks[..., : -(-height // r), : -(-width // r)]
        return {"pred_logits": logits, "pred_masks": masks, "pred_iou": iou}

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        raise RunnerError("an exported student takes raw RGB: call forward_pixels(images)")


def load_exported(
    path: Path, *, threads: int | None = None, providers: list[str] | None = None
) -> ExportedStudent:
    """Open an exported student: ``.onnx`` through onnxruntime, ``.pt2`` through torch.export.

    Arguments:
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        providers: onnxruntime execution providers (default: CPU).
    """
    path = Path(path)
    if not path.is_file():
        raise RunnerError(
            f"--model {path}: no such file (write it with `python -m pipeline export`)"
        )
    backend = _backend_of(path)
    if backend == "onnxruntime":
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001
            raise RunnerError(f"--model {path} is not a readable ONNX file: {exc}") from exc
        raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        program = None
    else:
        extra = {f"{METADATA_KEY}.json": ""}
        try:
            program = torch.export.load(str(path), extra_files=extra).module()
        except Exception as exc:  # noqa: BLE001
            raise RunnerError(
                f"--model {path} is not a torch.export program (.pt2): {exc}"
            ) from exc
        raw, session = extra[f"{METADATA_KEY}.json"] or None, None
    if not raw:
        raise RunnerError(
            f"--model {path} has no RegSAM metadata: export it with `python -m pipeline export`"
        )
    return ExportedStudent(
        path=path, backend=backend, metadata=json.loads(raw), session=session, program=program
    )


def predict_exported(
    model_path: Path,
    image_dir: Path,
    out_dir: Path,
    *,
    test_size: int | None = None,
    threads: int | None = None,
):
    """``predict --backend onnxruntime|torch-export``: PNG + JSON + overlays as the PyTorch path."""
    from pipeline.evaluation.predict import predict_folder

    runner = load_exported(model_path, threads=threads)
    meta = runner.metadata
    return predict_folder(
        runner,
        image_dir,
        out_dir,
        runner.categories,
        test_size=test_size or meta["test_size"],
        device="cpu",
        size_divisibility=meta["size_divisibility"],
        object_mask_threshold=meta["object_mask_threshold"],
        overlap_threshold=meta["overlap_threshold"],
    )


def evaluate_exported(
    cfg: Any, model_path: Path, out_dir: Path, max_images: int | None = None
) -> dict[str, Any]:
    """PQ/SQ/RQ of an exported student on ``cfg``'s val split (``evaluate --backend ...``),
    with ``cfg.evaluation``'s merge thresholds, as ``evaluate_checkpoint`` uses them."""
    from pipeline.data.coco_panoptic import PanopticDataset
    from pipeline.data.transforms import EvalTransform
    from pipeline.evaluation.evaluate import evaluate_model

    runner = load_exported(model_path)
    meta = runner.metadata
    image_dir, json_path, png_dir = cfg.split_paths("val")
    dataset = PanopticDataset(
        image_dir,
        json_path,
        png_dir,
        transform=EvalTransform(meta["test_size"], meta["size_divisibility"]),
        on_bad_sample=cfg.data.on_bad_sample,
        seed=cfg.seed,
        require_segments=False,
    )
    names = [(c.id, c.isthing) for c in dataset.categories]
    if names != [(c["id"], bool(c["isthing"])) for c in meta["categories"]]:
        raise RunnerError(f"--model {model_path} was trained on other categories than {json_path}")
    ev = cfg.evaluation
    return evaluate_model(
        runner,
        dataset,
        dataset.categories,
        "cpu",
        out_dir=out_dir,
        max_images=max_images or ev.max_images,
        object_mask_threshold=ev.object_mask_threshold,
        overlap_threshold=ev.overlap_threshold,
        write_predictions=True,
        num_visualize=ev.num_visualize,
        num_workers=0,
    )
