"""Command-line entry points (``python -m pipeline <command>`` or ``regsam <command>``).

Every Snakemake rule is a thin call of one of these commands; each validates its config before
doing any work. Heavy modules are imported inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import INPUT_KEYS, Config, ConfigError, load_config, missing_input_files
from pipeline.preflight import (
    MissingInputError,
    check_backbone_weights,
    check_cityscapes_root,
    check_split,
    check_teacher_checkpoint,
    check_unlabeled,
    require,
)

log = logging.getLogger("regsam")


DATA_KEYS = ("data.root", "data.cityscapes_root")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.override)


def _require(cfg: Config, keys: tuple[str, ...]) -> Config:
    """Refuse, before any work, input files among ``keys`` (of
    :data:`pipeline.config.INPUT_KEYS`) that do not exist."""
    missing = missing_input_files(cfg, keys)
    if missing:
        raise ConfigError("\n".join(missing))
    return cfg


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    # the `synthetic` command writes the synthetic dataset's data.root, which may not exist yet
    _require(
        cfg, tuple(k for k in INPUT_KEYS if k != "data.root" or cfg.data.dataset != "synthetic")
    )
    print(json.dumps(cfg.to_dict(), indent=2) if args.print else f"{args.config}: OK")
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from pipeline.data.synthetic import generate_synthetic_coco_panoptic

    cfg = _config(args)
    s = cfg.data.synthetic
    generate_synthetic_coco_panoptic(
        Path(cfg.data.root),
        num_train=s.num_train,
        num_val=s.num_val,
        image_size=tuple(s.image_size),
        num_thing_classes=s.num_thing_classes,
        num_stuff_classes=s.num_stuff_classes,
        seed=s.seed,
        num_tune=s.num_tune,
        num_unlabeled=s.num_unlabeled,
    )
    return 0


def cmd_convert_cityscapes(args: argparse.Namespace) -> int:
    from pipeline.data.cityscapes import convert_cityscapes

    cfg = _config(args)
    require([check_cityscapes_root(cfg)])
    if not cfg.data.cityscapes_root:
        raise ConfigError(
            "data.cityscapes_root is not set; point it at the Cityscapes root "
            "(the folder holding gtFine/ and leftImg8bit/)"
        )
    convert_cityscapes(cfg.data.cityscapes_root, splits=tuple(args.splits))
    return 0


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_adapt_teacher(args: argparse.Namespace) -> int:
    from pipeline.training.adapt_teacher import adapt_teacher

    cfg = _config(args)
    _threads(args)
    if not cfg.teacher_adapt.enabled:
        raise ConfigError(
            f"{args.config}: teacher_adapt.enabled is false; set it to true (or "
            "pass -o teacher_adapt.enabled=true) to adapt the teacher"
        )
    summary = adapt_teacher(
        cfg,
        args.out,
        resume=not args.no_resume,
        progress=not args.no_progress,
        stop_at=args.stop_at,
    )
    print(json.dumps({k: summary.get(k) for k in ("finished", "iterations", "checkpoint")}))
    return 0


def cmd_evaluate_teacher(args: argparse.Namespace) -> int:
    from pipeline.evaluation.teacher_eval import evaluate_teacher
    from pipeline.teacher.adapted import effective_checkpoint

    cfg = _config(args)
    _threads(args)
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
    elif args.which == "base":
        checkpoint = cfg.teacher.checkpoint
    else:  # "effective": the weights the cache is built from
        checkpoint = effective_checkpoint(cfg)
    result = evaluate_teacher(
        cfg,
        checkpoint,
        args.out,
        split=args.split,
        max_images=args.max_images,
        progress=not args.no_progress,
    )
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "miou",
                    "miou_things",
                    "miou_stuff",
                    "miou_class_mean",
                    "iou_pearson",
                    "num_segments",
                )
            }
        )
    )
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from pipeline.cache.runner import build_cache

    cfg = _config(args)
    split_check = check_split(cfg, "train" if args.split == "unlabeled" else args.split)
    require(
        [
            split_check,
            check_teacher_checkpoint(cfg),
            check_unlabeled(cfg) if args.split == "unlabeled" else None,
        ]
    )
    path = build_cache(
        cfg, split=args.split, scheduler_address=args.scheduler_address, n_workers=args.workers
    )
    print(path)
    return 0


def cmd_cache_path(args: argparse.Namespace) -> int:
    from pipeline.cache.fingerprint import cache_dir

    print(cache_dir(_config(args), args.split))
    return 0


def cmd_cache_inspect(args: argparse.Namespace) -> int:
    from pipeline.cache.inspect import inspect_cache, print_inspection

    print_inspection(inspect_cache(Path(args.path)))
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from pipeline.cache.inspect import verify_cache

    problems = verify_cache(Path(args.path))
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.training.trainer import train

    cfg = _config(args)
    require(
        [
            check_split(cfg, "train"),
            check_backbone_weights(cfg),
            check_teacher_checkpoint(cfg) if cfg.model.use_sam_distill else None,
            check_unlabeled(cfg) if cfg.training.unlabeled_ratio > 0 else None,
        ]
    )
    _require(cfg, ("training.init_from",))
    work_dir = Path(args.work_dir or Path(cfg.output_root) / cfg.experiment)
    summary = train(
        cfg,
        work_dir,
        resume=not args.no_resume,
        progress=not args.no_progress,
        stop_at=args.stop_at,
    )
    print(json.dumps(summary))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    require([check_split(cfg, "val")])
    if args.backend == "torch":
        from pipeline.evaluation.run import evaluate_checkpoint

        metrics = evaluate_checkpoint(
            cfg, Path(_model_arg(args, "checkpoint")), Path(args.out), max_images=args.max_images
        )
    else:
        from pipeline.deploy.runner import evaluate_exported

        metrics = evaluate_exported(
            cfg, Path(_model_arg(args, "model")), Path(args.out), max_images=args.max_images
        )
    print(
        json.dumps(
            {k: metrics[k] for k in ("All", "Things", "Stuff") if k in metrics}
            | {
                "AP": (metrics.get("instance") or {}).get("AP"),
                "mIoU": (metrics.get("semantic") or {}).get("mIoU"),
            }
        )
    )
    return 0


def _model_arg(args: argparse.Namespace, which: str) -> str:
    """``--checkpoint`` (PyTorch backend) or ``--model`` (exported file), whichever is needed."""
    value = getattr(args, which)
    if not value:
        need = "--checkpoint final.pth" if which == "checkpoint" else "--model student.onnx/.pt2"
        raise ConfigError(f"--backend {args.backend} needs {need}")
    return value


def cmd_predict(args: argparse.Namespace) -> int:
    if args.backend == "torch":
        from pipeline.evaluation.run import predict_checkpoint

        predict_checkpoint(
            Path(_model_arg(args, "checkpoint")),
            Path(args.input),
            Path(args.out),
            device=args.device,
            test_size=args.test_size,
        )
    else:  # the exported file alone: no timm, no student, no trainer imported
        from pipeline.deploy.runner import predict_exported

        predict_exported(
            Path(_model_arg(args, "model")),
            Path(args.input),
            Path(args.out),
            test_size=args.test_size,
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.deploy.export import export_checkpoint

    result = export_checkpoint(
        Path(args.checkpoint),
        Path(args.out),
        fmt=args.format,
        size=args.size,
        dynamic=args.dynamic,
        quantize=args.quantize,
    )
    print(json.dumps(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report.report import build_report

    build_report(
        [Path(r) for r in args.runs],
        Path(args.out),
        title=args.title,
        teacher_evals=[Path(p) for p in args.teacher_eval],
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regsam", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (default: one short message)",
    )
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        metavar="PID",
        help="stop (with the dask/DataLoader workers) when process PID ends; the "
        "Snakemake rules pass their Snakemake process, so no orphan keeps writing",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", required=True, help="experiment YAML (see configs/)")
        sp.add_argument(
            "--override",
            "-o",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="e.g. -o training.max_iters=100 (repeatable)",
        )
        sp.set_defaults(fn=fn)
        return sp

    sp = with_config("check-config", cmd_check_config, "validate a config and exit")
    sp.add_argument("--print", action="store_true", help="print the resolved config")
    with_config("synthetic", cmd_synthetic, "write the synthetic COCO-panoptic dataset")
    sp = with_config(
        "convert-cityscapes",
        cmd_convert_cityscapes,
        "run cityscapesscripts' csCreatePanopticImgs on data.cityscapes_root",
    )
    sp.add_argument("--splits", nargs="+", default=["train", "val"])
    sp = with_config(
        "adapt-teacher",
        cmd_adapt_teacher,
        "stage zero: fine-tune SAM on the train split (teacher_adapt section)",
    )
    sp.add_argument(
        "--out",
        default=None,
        help="output folder (default: the adapted-teacher "
        "folder the cache and the workflow look in)",
    )
    sp.add_argument("--no-resume", action="store_true")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="checkpoint and exit after this iteration (rerun to resume)",
    )
    sp.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    sp = with_config(
        "evaluate-teacher",
        cmd_evaluate_teacher,
        "prompted-mask mIoU and IoU-head correlation of a SAM teacher",
    )
    sp.add_argument(
        "--which",
        choices=["base", "effective"],
        default="effective",
        help="base = teacher.checkpoint (random weights if null); effective = the "
        "weights the cache uses (the adapted teacher when teacher_adapt is on)",
    )
    sp.add_argument("--checkpoint", default=None, help="evaluate this file instead")
    sp.add_argument("--split", default="val", choices=["train", "val", "tune"])
    sp.add_argument("--out", required=True, help="JSON file to write")
    sp.add_argument("--max-images", type=int, default=None)
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    sp = with_config("cache-teacher", cmd_cache_teacher, "stage one: run SAM once, cache to Zarr")
    sp.add_argument(
        "--split",
        default="train",
        help="train, val, tune, or unlabeled (SAM's automatic segments of the unlabelled "
        "images; needs the finished train cache)",
    )
    sp.add_argument("--scheduler-address", default=None, help="join an existing dask cluster")
    sp.add_argument("--workers", type=int, default=None, help="LocalCluster worker count")
    sp = with_config("cache-path", cmd_cache_path, "print the cache directory of a config")
    sp.add_argument("--split", default="train")
    sp = sub.add_parser("cache-inspect", help="summarise a teacher cache")
    sp.add_argument("path")
    sp.set_defaults(fn=cmd_cache_inspect)
    sp = sub.add_parser("cache-verify", help="check a teacher cache for NaN/inf and gaps")
    sp.add_argument("path")
    sp.set_defaults(fn=cmd_cache_verify)
    sp = with_config("train", cmd_train, "stage two: train the student (resumes by default)")
    sp.add_argument("--work-dir", default=None)
    sp.add_argument("--no-resume", action="store_true")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="checkpoint and exit after this iteration (rerun to resume)",
    )
    sp = with_config(
        "evaluate", cmd_evaluate, "PQ/SQ/RQ, instance AP and mIoU of a trained student on data.val"
    )
    sp.add_argument("--checkpoint", default=None, help="final.pth of a run (--backend torch)")
    sp.add_argument("--backend", choices=["torch", "onnxruntime", "torch-export"], default="torch")
    sp.add_argument("--model", default=None, help="exported .onnx / .pt2 (other backends)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--max-images", type=int, default=None)
    sp = sub.add_parser("predict", help="panoptic PNG + JSON + overlays for a folder of images")
    sp.add_argument("--checkpoint", default=None, help="final.pth of a run (--backend torch)")
    sp.add_argument(
        "--backend",
        choices=["torch", "onnxruntime", "torch-export"],
        default="torch",
        help="torch: final.pth; others: an exported --model",
    )
    sp.add_argument(
        "--model", default=None, help="student.onnx (onnxruntime) or student.pt2 (torch-export)"
    )
    sp.add_argument("--input", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--device", default="auto")
    sp.add_argument("--test-size", type=int, default=None)
    sp.set_defaults(fn=cmd_predict)
    sp = sub.add_parser("export", help="export a student to ONNX or torch.export")
    sp.add_argument("--checkpoint", required=True, help="final.pth of a run")
    sp.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    sp.add_argument(
        "--size",
        type=int,
        nargs=2,
        required=True,
        metavar=("H", "W"),
        help="input size (multiples of the stride, 32); with --dynamic an example",
    )
    sp.add_argument("--dynamic", action="store_true", help="free H and W (multiples of 32)")
    sp.add_argument(
        "--quantize",
        choices=["dynamic"],
        default=None,
        help="also write <out>.int8.onnx (onnxruntime dynamic INT8)",
    )
    sp.add_argument("--out", required=True, help="student.onnx or student.pt2")
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("report", help="ablation report (Markdown + PNG figures)")
    sp.add_argument("--runs", nargs="+", required=True, help="run directories")
    sp.add_argument("--out", required=True)
    sp.add_argument("--title", default="RegSAM ablation")
    sp.add_argument(
        "--teacher-eval",
        nargs="*",
        default=[],
        metavar="JSON",
        help="evaluate-teacher results to show in a Teacher section",
    )
    sp.set_defaults(fn=cmd_report)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's files, each with a message naming the file and what differs."""
    from pipeline.cache.fingerprint import FingerprintMismatchError
    from pipeline.teacher.sam_builder import CheckpointError
    from pipeline.training.checkpoint import CheckpointReadError

    return (
        MissingInputError,
        FileNotFoundError,
        CheckpointError,
        FingerprintMismatchError,
        CheckpointReadError,
    )


def _deploy_errors() -> tuple[type[Exception], ...]:
    """Export/runner errors (imported only if their module already is: keeps --help fast)."""
    errors = []
    for module, name in (
        ("pipeline.deploy.export", "ExportError"),
        ("pipeline.deploy.runner", "RunnerError"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.parent_pid is not None:
        from pipeline.lifeline import watch_parent

        watch_parent(args.parent_pid)
    try:
        return args.fn(args)
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"config error:\n{exc}", file=sys.stderr)
        return 2
    except _user_errors() as exc:  # a file the user must provide or fix: no traceback wall
        if args.debug:
            raise
        print(f"error: {exc}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    except _deploy_errors() as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
