"""Tiny datasets in the official COCO panoptic / Cityscapes layouts, official-layout checkpoints,
and the README's Snakemake commands, for the workflow tests."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# COCO-like categories: non-contiguous ids, things and stuff mixed.
COCO_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60], "supercategory": "person"},
    {"id": 18, "name": "dog", "isthing": 1, "color": [0, 0, 230], "supercategory": "animal"},
    {"id": 119, "name": "wall", "isthing": 0, "color": [102, 102, 156], "supercategory": "wall"},
    {
        "id": 187,
        "name": "sky-other-merged",
        "isthing": 0,
        "color": [70, 130, 180],
        "supercategory": "sky",
    },
]


def _coco_image(index: int, size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(RGB image, panoptic id map, segments_info) of one synthetic-looking COCO image."""
    rng = np.random.default_rng(index)
    ids = np.zeros((size, size), np.int64)
    ids[: size // 2] = 5_000_187  # sky (id uses all three PNG channels)
    ids[size // 2 :] = 7_119  # wall
    segments = [{"id": 5_000_187, "category_id": 187}, {"id": 7_119, "category_id": 119}]
    for k, cat in enumerate((1, 18)):
        y, x = rng.integers(2, size // 2, 2)
        h, w = rng.integers(size // 6, size // 3, 2)
        seg_id = 300 + 17 * k + index
        ids[y : y + h, x : x + w] = seg_id
        segments.append({"id": seg_id, "category_id": cat})
    ids[:2, :2] = 0  # a little void
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for seg in segments:
        image[ids == seg["id"]] = (
            np.array(
                COCO_CATEGORIES[[c["id"] for c in COCO_CATEGORIES].index(seg["category_id"])][
                    "color"
                ]
            )
            * 0.8
            + image[ids == seg["id"]] * 0.2
        ).astype(np.uint8)
    info = []
    for seg in segments:
        ys, xs = np.nonzero(ids == seg["id"])
        bbox = [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ]
        info.append({**seg, "iscrowd": 0, "bbox": bbox, "area": int(len(ys))})
    return image, ids, info


def write_coco_panoptic(root: Path, num_train: int = 4, num_val: int = 2, size: int = 64) -> Path:
    """``root`` in the official COCO panoptic 2017 layout: train2017/, val2017/ (JPEG images),
    annotations/panoptic_{train,val}2017.json and annotations/panoptic_{train,val}2017/ (PNGs,
    id = R + 256 G + 256^2 B)."""
    index = 0
    for split, n in (("train", num_train), ("val", num_val)):
        img_dir, png_dir = root / f"{split}2017", root / "annotations" / f"panoptic_{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        png_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(n):
            index += 1
            image, ids, info = _coco_image(index, size)
            stem = f"{index:012d}"
            Image.fromarray(image).save(img_dir / f"{stem}.jpg", quality=95)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
            Image.fromarray(rgb).save(png_dir / f"{stem}.png")
            images.append({"id": index, "file_name": f"{stem}.jpg", "width": size, "height": size})
            annotations.append(
                {"image_id": index, "file_name": f"{stem}.png", "segments_info": info}
            )
        doc = {
            "info": {"description": "tiny COCO panoptic"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": COCO_CATEGORIES,
        }
        (root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(doc))
    return root


# Cityscapes label ids: 7 road, 23 sky, 26 car (thing, instance ids label * 1000 + k).
def write_cityscapes_raw(root: Path, size: tuple[int, int] = (32, 64)) -> Path:
    """``root`` with the official ``gtFine/<split>/<city>/*_gtFine_instanceIds.png`` and
    ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` files (before csCreatePanopticImgs)."""
    h, w = size
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for k in range(2):
            ids = np.full((h, w), 7, np.uint16)
            ids[: h // 3] = 23
            ids[h // 2 : h // 2 + 6, 4 + 8 * k : 20 + 8 * k] = 26000 + k
            stem = f"{city}_{k:06d}_000019"
            for sub, name, arr in (
                ("gtFine", f"{stem}_gtFine_instanceIds.png", ids),
                (
                    "leftImg8bit",
                    f"{stem}_leftImg8bit.png",
                    np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8),
                ),
            ):
                d = root / sub / split / city
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(d / name)
    return root


def write_sam_checkpoint(path: Path, tiny: dict | None = None) -> Path:
    """An official-layout SAM checkpoint (a flat ``{name: tensor}`` state dict saved with
    ``torch.save``) of a sam_tiny model with the sizes ``tiny``."""
    from pipeline.config import SamTinyConfig
    from pipeline.teacher.sam_builder import build_sam, tiny_spec

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(build_sam(tiny_spec(SamTinyConfig(**(tiny or {})))).state_dict(), path)
    return path


def workspace(tmp: Path) -> Path:
    """A folder that looks like the repository to a README command (configs/, workflow/)."""
    for name in ("configs", "workflow"):
        (tmp / name).symlink_to(ROOT / name)
    return tmp


def readme_commands(section: str) -> list[str]:
    """Every ``snakemake ...`` line of the bash blocks of one README section (comments cut)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"README has no section '## {section}'"
    out = []
    for block in re.findall(r"```bash\n(.*?)```", match.group(1), re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("snakemake"):
                out.append(line)
    return out


def env() -> dict[str, str]:
    """This checkout's `pipeline` and this interpreter for the jobs' `python -m pipeline`."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    return e


def run_snakemake(
    command: str,
    cwd: Path,
    *extra: str,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run a README command (``snakemake ...``) in ``cwd`` with this checkout's Snakefile;
    ``extra`` (e.g. ``-n``) goes right after ``snakemake``, before any ``--config``."""
    argv = shlex.split(command)
    assert argv[0] == "snakemake", command
    argv = [
        sys.executable,
        "-m",
        "snakemake",
        *extra,
        "--snakefile",
        str(ROOT / "Snakefile"),
        *argv[1:],
    ]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env())


def job_counts(out: str) -> dict[str, int]:
    assert "Job stats:" in out, out[-3000:]
    stats = out.split("Job stats:", 1)[1]
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)
        if m.group(1) != "total"
    }
