"""Benchmark stage one's teacher cache against running the teacher live, on one machine in one run.

What is measured (Markdown table on stdout, and in ``--out`` if given):

(a) **speed**: fetching one image's cached targets (``TeacherCache.get``: read, decompress,
    dequantise, ``cls_logits``) against running the teacher inline on it (``LiveTeacher``: the
    official ``vit_b`` architecture with random weights, SAM preprocessing, image encoder, one
    prompt per segment through the mask decoder, PCA projection). Goal: cached >= 500x faster.
(b) **size and fidelity** at the default cache settings (64 channels per level, 64 x 64 mask
    logits) on 1024-pixel inputs: a cache is built over ``--images`` synthetic images, half
    1024 x 1024 and half 768 x 1024 (H x W), once with float16 and once with int8 storage.
    Reported: bytes per image on disk, the uncompressed figure, the cosine between the stored
    (dequantised) features and the float32 values before quantisation (goal >= 0.999 float16,
    >= 0.99 int8), and the PCA explained variance per level. The analytic per-image size of the
    default vit_h layout (4 levels, 1280/256 -> 64 channels, 64 x 64 maps) is printed as well.
(c) **read throughput** of ``TeacherCache.get`` through a ``DataLoader`` with 0, 2 and 4 workers.

Example (from the repository root; about 5 minutes on 2 CPU cores)::

    python benchmarks/bench_cache.py --out benchmarks/results/bench_cache.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.cache.inspect import inspect_cache
from pipeline.cache.live import LiveTeacher
from pipeline.cache.reader import TeacherCache
from pipeline.cache.runner import build_cache, raw_bytes_per_image
from pipeline.cache.store import CacheLayout, CacheStore
from pipeline.config import load_config
from pipeline.data.coco_panoptic import PanopticDataset, id_to_rgb, load_panoptic_png
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.evaluation.complexity import write_report

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base.yaml"


# ------------------------------------------------------------------------------ data
def make_dataset(root: Path, num_images: int) -> None:
    """Synthetic 1024 x 1024 images; every second one cropped to 768 x 1024 (H x W)."""
    paths = generate_synthetic_coco_panoptic(
        root, num_train=num_images, num_val=1, image_size=(1024, 1024), progress=False
    )
    image_dir, json_path, png_dir = paths["train"]
    doc = json.loads(json_path.read_text())
    for k in range(1, num_images, 2):
        info, ann = doc["images"][k], doc["annotations"][k]
        with Image.open(image_dir / info["file_name"]) as im:
            im.crop((0, 0, 1024, 768)).save(image_dir / info["file_name"], quality=95)
        ids = load_panoptic_png(png_dir / ann["file_name"])[:768]
        Image.fromarray(id_to_rgb(ids)).save(png_dir / ann["file_name"])
        present = set(np.unique(ids).tolist())
        ann["segments_info"] = [s for s in ann["segments_info"] if s["id"] in present]
        info["height"] = 768
    json_path.write_text(json.dumps(doc))


def config(root: Path, teacher: str, dtype: str, threads: int, num_images: int):
    return load_config(
        BASE,
        [
            f"teacher.type={teacher}",
            "data.dataset=coco_panoptic",
            f"data.root={root / 'data'}",
            f"cache.root={root / 'cache'}",
            f"cache.dtype={dtype}",
            f"cache.pca_samples={num_images}",
            "cache.channels=64",
            "cache.mask_size=64",
            f"cache.threads_per_worker={threads}",
        ],
    )


# ------------------------------------------------------------------------------ helpers
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


class _Fetch(Dataset):
    def __init__(self, cache: TeacherCache, ids: list[str], repeats: int):
        self.cache, self.ids = cache, ids * repeats

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return self.cache.get(self.ids[i])


def read_throughput(cache: TeacherCache, ids: list[str], workers: int, repeats: int) -> float:
    """Images per second over a DataLoader pass, timed from the first item (worker start-up
    excluded)."""
    loader = DataLoader(
        _Fetch(cache, ids, repeats), batch_size=None, num_workers=workers, shuffle=False
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - start)


def default_vit_h_layout() -> CacheLayout:
    return CacheLayout(
        image_ids=["x"],
        level_names=["block7", "block15", "block23", "neck"],
        teacher_channels=[1280, 1280, 1280, 256],
        level_channels=[64] * 4,
        grid_sizes=[(64, 64)] * 4,
        input_size=1024,
        mask_size=64,
        max_segments=200,
        embed_dim=256,
        dtype="float16",
        compressor="zstd",
        clevel=5,
    )


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="vit_b", choices=["sam_tiny", "vit_b", "vit_l", "vit_h"])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    p.add_argument("--fetch-repeats", type=int, default=25)
    p.add_argument("--loader-repeats", type=int, default=50)
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--device", default="cpu", help="device of the live teacher")
    p.add_argument("--workdir", default=None, help="keep the caches here (default: a temp dir)")
    p.add_argument("--out", default=None, help="also write the Markdown here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        make_dataset(root / "data", args.images)
        rows: dict[str, dict] = {}
        caches: dict[str, Path] = {}
        for dtype in ("float16", "int8"):
            cfg = config(root, args.teacher, dtype, args.threads, args.images)
            start = time.perf_counter()
            caches[dtype] = build_cache(cfg, n_workers=1, progress=False)
            rows[dtype] = {"build_s": time.perf_counter() - start, "cfg": cfg}
        pca16 = CacheStore.open(caches["float16"]).manifest["pca"]
        pca8 = CacheStore.open(caches["int8"]).manifest["pca"]
        assert pca16["sha256"] == pca8["sha256"], "the two builds fitted different PCA bases"

        # live teacher: the float32 targets before quantisation, and its latency
        live = LiveTeacher(rows["float16"]["cfg"], caches["float16"], device=args.device)
        dataset = PanopticDataset(*rows["float16"]["cfg"].split_paths("train"))
        samples = [dataset.load_original(i) for i in range(len(dataset))]
        live_times, references = [], []
        for s in samples:
            start = time.perf_counter()
            references.append(live(s))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            live_times.append(time.perf_counter() - start)
        ids = [s["image_id"] for s in samples]

        for dtype, path in caches.items():
            cache = TeacherCache(path)
            fetch = []
            for _ in range(args.fetch_repeats):
                for i in ids:
                    start = time.perf_counter()
                    cache.get(i)
                    fetch.append(time.perf_counter() - start)
            cos = {name: [] for name in cache.level_names}
            mask_cos = []
            for i, ref in zip(ids, references):
                item = cache.get(i)
                for name, a, b in zip(cache.level_names, item["features"], ref["features"]):
                    cos[name].append(cosine(a, b))
                mask_cos.append(cosine(item["mask_logits"], ref["mask_logits"]))
            info = inspect_cache(path)
            rows[dtype].update(
                fetch_ms=1e3 * statistics.median(fetch),
                bytes_mean=info["bytes_per_image"]["mean"],
                bytes_max=info["bytes_per_image"]["max"],
                cos_min=min(min(v) for v in cos.values()),
                cos_mean=statistics.mean(x for v in cos.values() for x in v),
                cos_levels={k: min(v) for k, v in cos.items()},
                mask_cos=min(mask_cos),
                segments=statistics.mean(len(r["segment_ids"]) for r in references),
                throughput={
                    w: read_throughput(cache, ids, w, args.loader_repeats)
                    for w in args.loader_workers
                },
            )
        live_s = statistics.median(live_times)
        layout = CacheStore.open(caches["float16"]).layout
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    default = default_vit_h_layout()
    segs = rows["float16"]["segments"]
    lines = [
        f"# Teacher cache benchmark ({dt.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {args.threads} threads; live teacher on `{args.device}`. "
        f"Teacher `{args.teacher}` (official architecture, random weights), {args.images} "
        f"images (half 1024x1024, half 768x1024), {segs:.1f} segments per image on average; "
        f"cache: {len(layout.level_names)} levels {layout.level_names} x "
        f"{layout.level_channels[0]} channels x {layout.grid_sizes[0][0]}x{layout.grid_sizes[0][1]}, "
        f"masks {layout.mask_size}x{layout.mask_size}, Blosc zstd clevel {layout.clevel}.",
        "",
        "## (a) cached fetch vs live teacher",
        "",
        "| | median latency per image | speed-up vs live |",
        "|---|---:|---:|",
        f"| live `{args.teacher}` teacher (`LiveTeacher`) | {live_s * 1e3:,.0f} ms | 1x |",
    ]
    for dtype in ("float16", "int8"):
        r = rows[dtype]
        lines.append(
            f"| cached `TeacherCache.get` ({dtype}) | {r['fetch_ms']:.2f} ms | "
            f"{live_s * 1e3 / r['fetch_ms']:,.0f}x |"
        )
    lines += [
        "",
        "## (b) size and fidelity",
        "",
        "| storage | bytes/image on disk (mean / max) | uncompressed at this M | feature cosine vs fp32 (min / mean) | mask-logit cosine (min) | build time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for dtype in ("float16", "int8"):
        r = rows[dtype]
        lay = dataclasses.replace(layout, dtype=dtype)
        lines.append(
            f"| {dtype} | {r['bytes_mean'] / 1e6:.3f} MB / {r['bytes_max'] / 1e6:.3f} MB | "
            f"{raw_bytes_per_image(lay, round(segs)) / 1e6:.3f} MB | "
            f"{r['cos_min']:.6f} / {r['cos_mean']:.6f} | {r['mask_cos']:.6f} | "
            f"{r['build_s']:.0f} s |"
        )
    lines += [
        "",
        "Per-level minimum feature cosine: "
        + "; ".join(
            f"{d}: " + ", ".join(f"{k} {v:.6f}" for k, v in rows[d]["cos_levels"].items())
            for d in ("float16", "int8")
        ),
        "",
        "PCA explained variance (fitted on the same images): "
        + ", ".join(
            f"{k} {100 * v['explained_variance_ratio']:.1f}%" for k, v in pca16["levels"].items()
        )
        + ".",
        "",
        "Default settings, vit_h widths (4 levels of 64 channels at 64x64, 64x64 masks), "
        "uncompressed per image: "
        + ", ".join(
            f"{m} segments {raw_bytes_per_image(default, m) / 1e6:.3f} MB"
            for m in (11, 50, default.max_segments)
        )
        + f" (float16; the padded capacity is max_segments = {default.max_segments}). "
        "Budget: 4 MB.",
        "",
        "## (c) read throughput (`TeacherCache.get` through a DataLoader)",
        "",
        "| DataLoader workers | " + " | ".join(str(w) for w in args.loader_workers) + " |",
        "|---|" + "---:|" * len(args.loader_workers),
    ]
    for dtype in ("float16", "int8"):
        tp = rows[dtype]["throughput"]
        lines.append(
            f"| {dtype} images/s | "
            + " | ".join(f"{tp[w]:.0f}" for w in args.loader_workers)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(text, args.out, "bench_cache")


if __name__ == "__main__":
    main()
