"""What unlabelled images cost: cache bytes and caching time per image, training-step overhead.

Three measurements on one config (default: the label-scarce regime of the embedded default,
``configs/reg_sam/label_scarce.yaml``):

1. **Cache bytes per unlabelled image**: the finished unlabelled cache's size on disk divided by
   its done images (``COMPLETE.json``), beside the train cache's figure, and the mean number of
   automatic segments stored per image.
2. **Caching time per image**: the teacher's automatic mode plus the record (features, pseudo
   labels) for ``--images`` unlabelled images in this process (one worker, ``--threads``
   threads), beside the prompted pass of as many labelled train images; the ratio.
3. **Training-step overhead**: two trainers built side by side from the same config, one on
   labelled batches (SAM distillation on, ``unlabeled_ratio 0``) and one on mixed batches (the
   same labelled images plus ``--unlabeled-per-batch`` unlabelled ones); their steps are
   interleaved (labelled, mixed, labelled, ...) for ``--iters`` iterations after ``--warmup``,
   so machine load hits both alike. Data time and step time are reported separately, with the
   ratios mixed / labelled.

The caches are built first when missing (``cache_teacher`` for the train and unlabelled splits).

    python benchmarks/bench_unlabeled.py --out benchmarks/results/unlabeled.md
    python benchmarks/bench_unlabeled.py --tiny --out /tmp/unlabeled.md     # a check, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = [
    "data.synthetic={num_train: 8, num_val: 2, num_tune: 0, num_unlabeled: 4, "
    "image_size: [64, 64], num_thing_classes: 3, num_stuff_classes: 2, seed: 0}",
    "teacher_adapt.enabled=false",
    "teacher.tiny={img_size: 64, embed_dim: 32, depth: 4, num_heads: 2, "
    "global_attn_indexes: [1, 3], window_size: 4}",
    "teacher.automatic={points_per_side: 4, points_per_batch: 16, pred_iou_thresh: 0.0, "
    "stability_score_thresh: 0.0, stability_score_offset: 1.0, box_nms_thresh: 0.99}",
    "cache.pca_samples=4",
    "cache.channels=16",
    "cache.mask_size=16",
    "cache.max_segments=8",
    "data.crop_size=[64, 64]",
    "data.test_size=64",
    "model.neck.channels=16",
    "model.head.num_queries=6",
    "model.head.num_stages=1",
    "model.head.ffn_dim=32",
    "model.loss.num_points=256",
    "model.sam_distill.num_points=64",
    "model.sam_distill.distill_feat_layers=[0, 1]",
    "model.sam_distill.unlabeled_min_confidence=0.0",
    "training.batch_size=2",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/reg_sam/label_scarce.yaml"))
    p.add_argument("-o", "--override", action="append", default=[], help="key=value")
    p.add_argument("--tiny", action="store_true", help="tiny data, teacher and student (a check)")
    p.add_argument(
        "--root", default=None, help="data.root and cache.root parent (default: config's)"
    )
    p.add_argument("--images", type=int, default=8, help="images timed per caching mode")
    p.add_argument(
        "--unlabeled-per-batch",
        type=int,
        default=None,
        help="unlabelled images added to each labelled batch (default: batch / 2)",
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="markdown file (a .json beside it)")
    return p.parse_args(argv)


def load(args: argparse.Namespace, *extra: str):
    from pipeline.config import load_config

    ov = list(TINY) if args.tiny else []
    if args.root:
        ov += [f"data.root={Path(args.root) / 'data'}", f"cache.root={Path(args.root) / 'cache'}"]
    return load_config(args.config, [*ov, *args.override, *extra])


def ensure_data_and_caches(cfg) -> tuple[Path, Path]:
    from pipeline.cache.runner import build_cache
    from pipeline.data.synthetic import generate_synthetic_coco_panoptic

    if cfg.data.dataset == "synthetic":
        s = cfg.data.synthetic
        generate_synthetic_coco_panoptic(
            cfg.data.root,
            s.num_train,
            s.num_val,
            tuple(s.image_size),
            s.num_thing_classes,
            s.num_stuff_classes,
            s.seed,
            progress=False,
            num_tune=s.num_tune,
            num_unlabeled=s.num_unlabeled,
        )
    if cfg.teacher_adapt.enabled:
        from pipeline.teacher.adapted import effective_checkpoint

        effective_checkpoint(cfg)  # refuses with "run adapt_teacher" when it is missing
    train = build_cache(cfg, "train", n_workers=1, progress=False)
    unlabeled = build_cache(cfg, "unlabeled", n_workers=1, progress=False)
    return train, unlabeled


def cache_sizes(train: Path, unlabeled: Path) -> dict:
    from pipeline.cache.store import CacheStore, STATUS_DONE

    out = {}
    for name, path in (("train", train), ("unlabeled", unlabeled)):
        summary = json.loads((path / "COMPLETE.json").read_text())
        store = CacheStore.open(path)
        status = store.status()
        ids = store.array("segments/segment_ids")
        counts = [int((ids[i] >= 0).sum()) for i in range(len(status)) if status[i] == STATUS_DONE]
        out[name] = {
            "path": str(path),
            "done": summary["done"],
            "bytes_per_done_image": summary["bytes_per_done_image"],
            "segments_per_image": statistics.fmean(counts) if counts else 0.0,
        }
    return out


def caching_times(cfg, num: int, threads: int) -> dict:
    import torch

    from pipeline.cache.fingerprint import TEACHER_INIT_SEED, resolve_layers
    from pipeline.cache.record import sample_record
    from pipeline.data.coco_panoptic import PanopticDataset
    from pipeline.data.unlabeled import UnlabeledDataset, unlabeled_images
    from pipeline.teacher.adapted import effective_teacher
    from pipeline.teacher.extractor import TeacherExtractor
    from pipeline.teacher.sam_builder import build_teacher

    torch.set_num_threads(threads)
    t = effective_teacher(cfg)
    sam = build_teacher(t.type, t.checkpoint, t.tiny, seed=TEACHER_INIT_SEED)
    ex = TeacherExtractor(
        sam,
        resolve_layers(t),
        mask_size=cfg.cache.mask_size,
        points_per_stuff=t.points_per_stuff,
        device=t.device,
    )
    train = PanopticDataset(*cfg.split_paths("train"), on_bad_sample="skip")
    isthing = [c.isthing for c in train.categories]
    unl = UnlabeledDataset(unlabeled_images(cfg), on_bad_sample="skip")
    from pipeline.cache.record import image_hwc

    def timed(fn, samples) -> list[float]:
        out = []
        for s in samples:
            start = time.perf_counter()
            fn(s)
            out.append(time.perf_counter() - start)
        return out

    lab = [s for s in (train[i] for i in range(min(num + 1, len(train)))) if "skip_reason" not in s]
    unl_s = [s for s in (unl[i] for i in range(min(num + 1, len(unl)))) if "skip_reason" not in s]
    bases = [None] * len(ex.layers)
    timed(lambda s: sample_record(ex, s, isthing, bases), lab[:1])  # warm-up
    prompted = timed(lambda s: sample_record(ex, s, isthing, bases), lab[1 : num + 1])
    auto = timed(
        lambda s: ex.extract_automatic(image_hwc(s["image"]), t.automatic, cfg.cache.max_segments),
        unl_s[1 : num + 1],
    )
    return {
        "labelled_prompted_s_per_image": statistics.fmean(prompted),
        "unlabelled_automatic_s_per_image": statistics.fmean(auto),
        "ratio": statistics.fmean(auto) / statistics.fmean(prompted),
        "images": [len(prompted), len(auto)],
        "points_per_side": t.automatic.points_per_side,
    }


def step_overhead(args: argparse.Namespace, cfg_l, cfg_m) -> dict:
    import tempfile

    from pipeline.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainers = [
            Trainer(c, Path(tmp) / n, progress=False) for c, n in ((cfg_l, "l"), (cfg_m, "m"))
        ]
        loaders = []
        for tr in trainers:
            tr.build()
            tr.step_module.train()
            loaders.append(iter(tr._loader(0)))
        times: dict[str, list[float]] = {"l_data": [], "l_step": [], "m_data": [], "m_step": []}
        for it in range(args.warmup + args.iters):
            for key, tr, loader in zip("lm", trainers, loaders):  # interleaved, one after the other
                t0 = time.perf_counter()
                batch = next(loader)
                t1 = time.perf_counter()
                tr.step(batch, it)
                t2 = time.perf_counter()
                if it >= args.warmup:
                    times[f"{key}_data"].append(t1 - t0)
                    times[f"{key}_step"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    b_l = cfg_l.training.batch_size
    b_m = cfg_m.training.batch_size
    return {
        "labelled_batch": b_l,
        "mixed_batch": f"{b_l} labelled + {b_m - b_l} unlabelled",
        "median_s": med,
        "ratio_step": med["m_step"] / med["l_step"],
        "ratio_data": med["m_data"] / max(med["l_data"], 1e-9),
        "ratio_total": (med["m_step"] + med["m_data"]) / (med["l_step"] + med["l_data"]),
        "ratio_total_per_image": ((med["m_step"] + med["m_data"]) / b_m)
        / ((med["l_step"] + med["l_data"]) / b_l),
        "iters": args.iters,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    common = [
        f"training.num_threads={args.threads}",
        "data.num_workers=0",
        "training.tensorboard=false",
        "model.use_sam_distill=true",
    ]
    cfg_l = load(args, *common)
    b_l = cfg_l.training.batch_size
    b_u = args.unlabeled_per_batch or max(1, b_l // 2)
    b_m = b_l + b_u
    cfg_m = load(
        args,
        *common,
        f"training.batch_size={b_m}",
        f"training.unlabeled_ratio={(b_u + 0.25) / b_m}",
    )
    assert round(cfg_m.training.unlabeled_ratio * b_m) == b_u
    train, unlabeled = ensure_data_and_caches(cfg_l)
    result = {
        "config": args.config,
        "overrides": args.override + (["--tiny"] if args.tiny else []),
        "threads": args.threads,
        "cache": cache_sizes(train, unlabeled),
        "caching": caching_times(cfg_l, args.images, args.threads),
        "training": step_overhead(args, cfg_l, cfg_m),
    }
    c, k, tr = result["cache"], result["caching"], result["training"]
    lines = [
        "# Unlabelled images: cost",
        "",
        f"config `{args.config}` {' '.join(result['overrides'])}, {args.threads} thread(s)",
        "",
        "| measure | labelled | unlabelled | ratio |",
        "| :--- | ---: | ---: | ---: |",
        f"| cache bytes per image | {c['train']['bytes_per_done_image']:.0f} | "
        f"{c['unlabeled']['bytes_per_done_image']:.0f} | "
        f"{c['unlabeled']['bytes_per_done_image'] / c['train']['bytes_per_done_image']:.2f} |",
        f"| segments per image | {c['train']['segments_per_image']:.1f} | "
        f"{c['unlabeled']['segments_per_image']:.1f} | – |",
        f"| caching s per image (prompted vs automatic, {k['points_per_side']}² points) | "
        f"{k['labelled_prompted_s_per_image']:.3f} | {k['unlabelled_automatic_s_per_image']:.3f} | "
        f"{k['ratio']:.2f} |",
        "",
        f"Training step, interleaved, median of {tr['iters']} (labelled batch {tr['labelled_batch']}"
        f" vs mixed batch {tr['mixed_batch']}):",
        "",
        "| | labelled only | mixed | ratio |",
        "| :--- | ---: | ---: | ---: |",
        f"| data s/step | {tr['median_s']['l_data']:.3f} | {tr['median_s']['m_data']:.3f} | "
        f"{tr['ratio_data']:.2f} |",
        f"| step s | {tr['median_s']['l_step']:.3f} | {tr['median_s']['m_step']:.3f} | "
        f"{tr['ratio_step']:.2f} |",
        f"| total per image | – | – | {tr['ratio_total_per_image']:.2f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
