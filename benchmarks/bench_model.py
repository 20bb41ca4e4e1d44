"""Benchmark the RegSAM student against a Mask2Former (ResNet-50) peer on the same machine.

Both models are measured in one run, side by side, at the same batch-1 input sizes:

* the RegSAM student built from one or more configs (inference model only: backbone, neck and
  head; the training-only distillation modules are not part of it), ``num_classes = 133``
  (COCO panoptic), random weights;
* Mask2Former with a ResNet-50 backbone from ``transformers`` (depths [3, 4, 6, 3], hidden sizes
  [256, 512, 1024, 2048], 100 queries, 133 classes, the library's default pixel decoder and
  transformer decoder), built from config objects only: random weights, nothing downloaded.

Reported: parameters, GMACs and GFLOPs (FlopCounterMode; GFLOPs = 2 x GMACs, papers quote
GMACs as "GFLOPs"), median fp32 latency per input size, the speed ratio
``peer latency / student latency`` at equal size (issue goal: >= 5x) and, where CUDA is
available, fp16-autocast FPS at the first size (goal >= 100 FPS). Neither model's timing
includes pre-processing or the panoptic merge.

Example (from the repository root)::

    python benchmarks/bench_model.py --config configs/reg_sam/regnet_distill.yaml \
        configs/coco/regnet_distill.yaml --sizes 640x640 1024x2048 --warmup 3 1 --iters 5 3 \
        --out benchmarks/results/bench_model.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import load_config
from pipeline.device import resolve_device
from pipeline.evaluation.complexity import (
    complexity_table,
    count_flops,
    count_params,
    device_description,
    load_average,
    measure_latency,
    write_report,
)
from pipeline.models.student import build_student

NUM_CLASSES = 133  # COCO panoptic: 80 things + 53 stuff
PEER_NAME = "Mask2Former R50 (transformers)"


# --------------------------------------------------------------------------- models
class InferenceAdapter(nn.Module):
    """Calls a model as ``model(images)`` and optionally feeds it channels-last input.

    Arguments:
        model: the wrapped module.
        keyword: if set, the image tensor is passed as this keyword argument
            (``pixel_values`` for transformers models).
        channels_last: convert the input ``[B, 3, H, W]`` to channels-last memory format.
    """

    def __init__(self, model: nn.Module, keyword: str | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.keyword = keyword
        self.channels_last = channels_last

    def forward(self, images: Tensor) -> Any:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.keyword is None:
            return self.model(images)
        return self.model(**{self.keyword: images})


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


def student_label(path: str, model_cfg: Any) -> str:
    bb, nk, hd = model_cfg.backbone, model_cfg.neck, model_cfg.head
    return (f"RegSAM student {bb.name}, neck {nk.channels}, {hd.num_queries} q x "
            f"{hd.num_stages} st ({path})")


# ---------------------------------------------------------------------------- setup
def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes: expected HxW such as 640x640, got {text!r}") from None
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", default=["configs/reg_sam/regnet_distill.yaml"],
                   help="student config(s); one student row each")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every student config")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(640, 640), (1024, 2048)],
                   help="batch-1 input sizes HxW (the first one also gets fp16 FPS on CUDA)")
    p.add_argument("--warmup", nargs="+", type=int, default=None,
                   help="untimed forwards, one value or one per size "
                        "(default: 3 1 on CPU, 10 on CUDA)")
    p.add_argument("--iters", nargs="+", type=int, default=None,
                   help="timed forwards, one value or one per size "
                        "(default: 5 3 on CPU, 50 on CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--channels-last", action="store_true",
                   help="run both models in channels-last memory format")
    p.add_argument("--no-peer", action="store_true", help="skip Mask2Former")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    on_cuda = device.type == "cuda"
    sizes: list[tuple[int, int]] = args.sizes
    warmups = per_size(args.warmup, len(sizes), [10] if on_cuda else [3, 1], "--warmup")
    iters = per_size(args.iters, len(sizes), [50] if on_cuda else [5, 3], "--iters")
    torch.manual_seed(0)

    models: list[tuple[str, nn.Module, bool]] = []  # (label, model, is_peer)
    for path in args.config:
        # weights do not change complexity or speed: never load a pretrained file here
        cfg = load_config(path, [*args.set, "model.backbone.pretrained_path=null"])
        student = build_student(cfg.model, NUM_CLASSES).eval()
        models.append((student_label(path, cfg.model), student, False))
    if not args.no_peer:
        models.append((PEER_NAME, build_mask2former_r50().eval(), True))

    load_before = load_average()
    results: dict[str, dict[str, Any]] = {}
    for label, model, is_peer in models:
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        net = InferenceAdapter(model, "pixel_values" if is_peer else None, args.channels_last)
        res: dict[str, Any] = {"params": count_params(model)}
        for (h, w), n_warm, n_iter in zip(sizes, warmups, iters):
            shape = (1, 3, h, w)
            print(f"[bench] {label} @ {h}x{w}: FLOPs, {n_warm} warm-up + {n_iter} timed",
                  file=sys.stderr, flush=True)
            res[(h, w, "flops")] = count_flops(net, shape, device)
            res[(h, w, "fp32")] = measure_latency(net, shape, device, n_warm, n_iter)
        if on_cuda:
            h, w = sizes[0]
            res["fp16"] = measure_latency(net, (1, 3, h, w), device, warmups[0], iters[0],
                                          dtype=torch.float16)
        results[label] = res
        model.cpu()
        if on_cuda:
            torch.cuda.empty_cache()

    peer = results.get(PEER_NAME)
    comp_rows, speed_rows = [], []
    for label, _, _ in models:
        res = results[label]
        comp = {"Model": label, "Params (M)": res["params"] / 1e6}
        speed: dict[str, Any] = {"Model": label}
        for h, w in sizes:
            fc = res[(h, w, "flops")]
            comp[f"GMACs {h}x{w}"] = fc.gmacs
            comp[f"GFLOPs {h}x{w}"] = fc.gflops
            ms = res[(h, w, "fp32")]["median_ms"]
            speed[f"ms {h}x{w}"] = ms
            speed[f"p90 ms {h}x{w}"] = res[(h, w, "fp32")]["p90_ms"]
            speed[f"peer/student {h}x{w}"] = (
                peer[(h, w, "fp32")]["median_ms"] / ms if peer and res is not peer else None)
        if on_cuda:
            speed[f"fp16 FPS {sizes[0][0]}x{sizes[0][1]}"] = res["fp16"]["fps"]
        comp_rows.append(comp)
        speed_rows.append(speed)

    timing = ", ".join(f"{h}x{w}: {a} warm-up + {b} timed" for (h, w), a, b in
                       zip(sizes, warmups, iters))
    header = [
        "# RegSAM student vs Mask2Former R50: complexity and speed",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- device: {device_description(device)}; torch {torch.__version__}; "
        f"threads {torch.get_num_threads()}; channels_last {args.channels_last}",
        f"- load average (1/5/15 min) before: {load_before}; after: {load_average()}",
        f"- batch 1, random weights, {NUM_CLASSES} classes; {timing}; "
        "latency = median of the timed forwards, inference_mode, no pre/post-processing",
        "- GMACs = multiply-adds (the \"GFLOPs\" of Mask2Former/MaskConver papers); "
        "GFLOPs = FlopCounterMode's count, 2 per multiply-add; convolutions and matrix "
        "products only",
        "- peer/student = peer latency / student latency at equal input size "
        "(issue goal: >= 5)" + ("; fp16 FPS = autocast float16, goal >= 100" if on_cuda else ""),
    ]
    report = "\n".join(header) + "\n\n## Complexity\n\n" + complexity_table(comp_rows) \
        + "\n## Latency (fp32" + (", fp16 FPS" if on_cuda else "") + ")\n\n" \
        + complexity_table(speed_rows)
    print(report)
    write_report(report, args.out, "bench_model")
    return report


if __name__ == "__main__":
    main()
