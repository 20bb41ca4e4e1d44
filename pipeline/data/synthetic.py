"""A small synthetic dataset written in exactly the COCO panoptic format.

Layout under ``root``::

    train/<image_id:012d>.jpg          val/<image_id:012d>.jpg          tune/...  (num_tune > 0)
    annotations/panoptic_train.json    annotations/panoptic_val.json    annotations/panoptic_tune.json
    annotations/panoptic_train/*.png   annotations/panoptic_val/*.png   annotations/panoptic_tune/
    synthetic_meta.json                (parameters; written last)

The optional ``tune`` split (image ids ``2000001..``) is drawn from its own generator stream, so
hyperparameters can be chosen on it while ``val`` stays untouched for the reported figures.

The optional unlabelled split (``num_unlabeled > 0``) is a folder ``unlabeled/`` of plain JPEGs
(stems ``3000001..``) drawn from a fourth generator stream, with no annotation: point
``data.unlabeled`` at it. Adding it changes no byte of the other splits (nor of their JSON, nor of
``synthetic_meta.json`` when it is 0).

Each image has two textured stuff regions split by a wavy boundary, overlapping thing instances
whose class is visible from shape and colour (circle, rectangle, triangle, diamond, ellipse,
cross; one hue per class), sometimes a crowd region (a cluster of small instances of one class,
``iscrowd=1``) and sometimes a void blob (id 0). Category ids are deliberately non-contiguous
(things ``1, 3, 7, 13, ...``, stuff ``100, 103, 106, ...``) and segment ids are
``category_id * 1000 + k``, so stuff ids use all three PNG channels.

Output is a pure function of the parameters: every image draws from its own generator seeded by
``(seed, split, index)`` and all files are written deterministically (byte-identical reruns).
"""

from __future__ import annotations

import colorsys
import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.coco_panoptic import id_to_rgb

__all__ = ["generate_synthetic_coco_panoptic", "synthetic_paths", "synthetic_categories"]

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
META_FILE = "synthetic_meta.json"
SPLITS = ("train", "val", "tune")
UNLABELED_DIR = "unlabeled"
UNLABELED_STREAM = 3  # generator stream of the unlabelled images (after the three splits)
THING_SHAPES = ("circle", "rectangle", "triangle", "diamond", "ellipse", "cross")
THING_TEXTURES = ("solid", "vstripes", "grid", "speckle")
STUFF_NAMES = ("grass", "sky", "sand", "water", "rock", "snow", "wall", "road")
STUFF_TEXTURES = ("noise", "hstripes", "checker", "dots", "waves")
_OWN_FILE = re.compile(r"^\d{12}\.(jpg|png)$")


def synthetic_paths(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """``(image_dir, json_path, png_dir)`` of a split of a generated dataset."""
    root = Path(root)
    return (
        root / split,
        root / "annotations" / f"panoptic_{split}.json",
        root / "annotations" / f"panoptic_{split}",
    )


def _thing_id(k: int) -> int:
    return 1 + k * (k + 1)  # 1, 3, 7, 13, 21, ...


def _stuff_id(k: int) -> int:
    return 100 + 3 * k  # 100, 103, 106, ...


def _rgb(h: float, s: float, v: float) -> list[int]:
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v)]


def synthetic_categories(num_thing_classes: int, num_stuff_classes: int) -> list[dict]:
    """COCO panoptic ``categories`` of the generator: things first, then stuff, each with
    ``id``, ``name``, ``isthing``, ``color``, ``supercategory``; plus private drawing keys
    ``_shape`` / ``_texture`` (stripped before writing the JSON)."""
    cats = []
    for k in range(num_thing_classes):
        shape = THING_SHAPES[k % len(THING_SHAPES)]
        suffix = "" if k < len(THING_SHAPES) else f"_{k // len(THING_SHAPES)}"
        cats.append(
            {
                "id": _thing_id(k),
                "name": shape + suffix,
                "isthing": 1,
                "color": _rgb(k / max(num_thing_classes, 1), 0.85, 0.95),
                "supercategory": "shape",
                "_shape": shape,
                "_texture": THING_TEXTURES[k % len(THING_TEXTURES)],
            }
        )
    for k in range(num_stuff_classes):
        name = STUFF_NAMES[k % len(STUFF_NAMES)]
        suffix = "" if k < len(STUFF_NAMES) else f"_{k // len(STUFF_NAMES)}"
        cats.append(
            {
                "id": _stuff_id(k),
                "name": name + suffix,
                "isthing": 0,
                "color": _rgb((k + 0.5) / max(num_stuff_classes, 1) + 0.08, 0.35, 0.6),
                "supercategory": "background",
                "_texture": STUFF_TEXTURES[k % len(STUFF_TEXTURES)],
            }
        )
    return cats


# ------------------------------------------------------------------------------ drawing
def _shape_mask(
    shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, aspect: float
) -> np.ndarray:
    """Pixels whose centre lies in a shape of radius ``r`` centred at ``(cx, cy)``."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "rectangle":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r * aspect)
    if shape == "triangle":  # apex up
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "ellipse":
        return (dx / r) ** 2 + (dy / (0.5 * r)) ** 2 <= 1
    if shape == "cross":
        a = r / 3
        return ((np.abs(dx) <= r) & (np.abs(dy) <= a)) | ((np.abs(dx) <= a) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(name: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean-ish brightness pattern ``[H, W]`` in roughly ``[-30, 30]``."""
    if name in ("noise", "speckle"):
        return rng.normal(0.0, 14.0 if name == "noise" else 4.0, xx.shape) - (
            40.0 * (rng.random(xx.shape) < 0.06) if name == "speckle" else 0.0
        )
    if name == "hstripes":
        return 22.0 * np.sign(np.sin(2 * np.pi * yy / 6.0))
    if name == "vstripes":
        return 22.0 * np.sign(np.sin(2 * np.pi * xx / 5.0))
    if name == "checker":
        return 22.0 * (2 * ((np.floor(xx / 6) + np.floor(yy / 6)) % 2) - 1)
    if name == "grid":
        return -35.0 * ((np.floor(xx) % 6 == 0) | (np.floor(yy) % 6 == 0))
    if name == "dots":
        return 40.0 * (((xx % 8) - 4) ** 2 + ((yy % 8) - 4) ** 2 < 4)
    if name == "waves":
        return 22.0 * np.sin(2 * np.pi * (xx + yy) / 10.0)
    if name == "solid":
        return np.zeros(xx.shape)
    raise ValueError(f"unknown texture {name!r}")


def _render(
    rng: np.random.Generator, size: tuple[int, int], things: list[dict], stuff: list[dict]
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw one image.

    Returns:
        ``(image uint8 [H, W, 3], ids int64 [H, W], segments_info)``.
    """
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    image = np.zeros((H, W, 3))
    ids = np.zeros((H, W), dtype=np.int64)
    crowd_ids: set[int] = set()
    s = min(H, W)

    # Stuff: two classes split by a wavy boundary.
    picks = rng.choice(len(stuff), size=min(2, len(stuff)), replace=False)
    boundary = H * rng.uniform(0.35, 0.65) + H * rng.uniform(0.03, 0.1) * np.sin(
        2 * np.pi * rng.uniform(1, 3) * xx / W + rng.uniform(0, 2 * np.pi)
    )
    regions = [yy < boundary, yy >= boundary] if len(picks) == 2 else [np.ones((H, W), bool)]
    for cat_idx, region in zip(picks, regions):
        cat = stuff[int(cat_idx)]
        tex = _texture(cat["_texture"], xx, yy, rng)
        image[region] = np.array(cat["color"], float) + tex[region][:, None]
        ids[region] = cat["id"] * 1000

    # Void: an irregular blob of grey noise.
    if rng.random() < 0.5:
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        blob = np.zeros((H, W), bool)
        for _ in range(3):
            r = s * rng.uniform(0.03, 0.07)
            blob |= _shape_mask(
                "circle", xx, yy, cx + rng.normal(0, r), cy + rng.normal(0, r), r, 1
            )
        image[blob] = 128 + rng.normal(0, 30, (int(blob.sum()), 1))
        ids[blob] = 0

    def paint(cat: dict, mask: np.ndarray, seg_id: int) -> None:
        color = np.array(cat["color"], float) * rng.uniform(0.9, 1.05)
        tex = _texture(cat["_texture"], xx, yy, rng)
        image[mask] = color + tex[mask][:, None]
        ids[mask] = seg_id

    # Crowd: a cluster of small instances of one class, annotated as one crowd segment.
    if things and rng.random() < 0.35:
        cat = things[int(rng.integers(len(things)))]
        cx, cy = rng.uniform(0.2 * W, 0.8 * W), rng.uniform(0.2 * H, 0.8 * H)
        mask = np.zeros((H, W), bool)
        for _ in range(int(rng.integers(4, 8))):
            mask |= _shape_mask(
                cat["_shape"],
                xx,
                yy,
                cx + rng.uniform(-0.12, 0.12) * s,
                cy + rng.uniform(-0.12, 0.12) * s,
                max(2.0, s * rng.uniform(0.025, 0.045)),
                0.8,
            )
        paint(cat, mask, cat["id"] * 1000 + 999)
        crowd_ids.add(cat["id"] * 1000 + 999)

    # Things: overlapping instances of varied size; later ones occlude earlier ones.
    counts: dict[int, int] = {}
    for _ in range(int(rng.integers(2, 6)) if things else 0):
        cat = things[int(rng.integers(len(things)))]
        r = s * rng.uniform(0.08, 0.22)
        cx, cy = rng.uniform(0.1 * W, 0.9 * W), rng.uniform(0.1 * H, 0.9 * H)
        mask = _shape_mask(cat["_shape"], xx, yy, cx, cy, r, rng.uniform(0.5, 0.9))
        counts[cat["id"]] = counts.get(cat["id"], 0) + 1
        paint(cat, mask, cat["id"] * 1000 + counts[cat["id"]])

    image += rng.normal(0, 3.0, image.shape)
    segments = []
    for seg_id in np.unique(ids).tolist():
        if seg_id == 0:
            continue
        m = ids == seg_id
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        cat_id = seg_id // 1000
        segments.append(
            {
                "id": int(seg_id),
                "category_id": int(cat_id),
                "iscrowd": int(seg_id in crowd_ids),
                "area": int(m.sum()),
                "bbox": [
                    int(cols[0]),
                    int(rows[0]),
                    int(cols[-1] - cols[0] + 1),
                    int(rows[-1] - rows[0] + 1),
                ],
            }
        )
    return np.clip(np.round(image), 0, 255).astype(np.uint8), ids, segments


# ------------------------------------------------------------------------------ writing
def _expected_files(root: Path, meta: dict) -> list[Path]:
    files = [root / META_FILE]
    for split_idx, split in enumerate(SPLITS):
        if not meta.get(f"num_{split}"):
            continue
        image_dir, json_path, png_dir = synthetic_paths(root, split)
        files.append(json_path)
        for i in range(meta[f"num_{split}"]):
            stem = f"{split_idx * 1_000_000 + i + 1:012d}"
            files += [image_dir / f"{stem}.jpg", png_dir / f"{stem}.png"]
    for i in range(meta.get("num_unlabeled", 0)):
        files.append(root / UNLABELED_DIR / f"{UNLABELED_STREAM * 1_000_000 + i + 1:012d}.jpg")
    return files


def generate_synthetic_coco_panoptic(
    root: str | Path,
    num_train: int,
    num_val: int,
    image_size: tuple[int, int] = (256, 256),
    num_thing_classes: int = 3,
    num_stuff_classes: int = 2,
    seed: int = 0,
    progress: bool = True,
    num_tune: int = 0,
    num_unlabeled: int = 0,
) -> dict[str, tuple[Path, Path, Path]]:
    """Write (or reuse) a synthetic COCO panoptic dataset.

    Arguments:
        root: output folder.
        num_train, num_val: number of images per split (image ids ``1..`` and ``1000001..``).
        num_tune: images of the tuning split (ids ``2000001..``); 0 writes none.
        num_unlabeled: plain JPEGs in ``root/unlabeled/`` (stems ``3000001..``), no annotation.
        image_size: ``(H, W)`` of every image.
        num_thing_classes, num_stuff_classes: number of categories of each kind.
        seed: generator seed; the output is byte-identical for identical arguments.
        progress: show a tqdm bar.

    Returns:
        ``{split: (image_dir, json_path, png_dir)}`` for ``train`` and ``val``.

    If ``root/synthetic_meta.json`` records the same parameters and every file exists, nothing is
    written. Otherwise the dataset is (re)generated, removing images/PNGs of an earlier run that the
    new one does not produce.
    """
    H, W = (int(v) for v in image_size)
    if H < 16 or W < 16:
        raise ValueError(f"image_size must be at least 16x16, got {image_size}")
    if num_unlabeled < 0:
        raise ValueError(f"num_unlabeled must be >= 0, got {num_unlabeled}")
    if num_train < 1 or num_val < 1 or num_tune < 0:
        raise ValueError(
            f"num_train and num_val must be >= 1 and num_tune >= 0, got {num_train}, "
            f"{num_val}, {num_tune}"
        )
    if not (1 <= num_thing_classes <= 10 and 1 <= num_stuff_classes <= 100):
        raise ValueError(
            "num_thing_classes must lie in [1, 10] and num_stuff_classes in [1, 100] "
            f"(thing ids stay below the stuff ids 100+), got {num_thing_classes}, "
            f"{num_stuff_classes}"
        )
    root = Path(root)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_tune": int(num_tune),
        "image_size": [H, W],
        "num_thing_classes": int(num_thing_classes),
        "num_stuff_classes": int(num_stuff_classes),
        "seed": int(seed),
    }
    split_meta = dict(meta)  # what the splits' JSON records (unchanged by the unlabelled split)
    if num_unlabeled:
        meta["num_unlabeled"] = int(num_unlabeled)
    splits = [split for split in SPLITS if meta[f"num_{split}"] > 0]
    paths = {split: synthetic_paths(root, split) for split in splits}
    meta_path = root / META_FILE
    expected = _expected_files(root, meta)
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old == meta and all(p.is_file() for p in expected):
            log.info("synthetic dataset at %s is up to date", root)
            return paths
        log.info("regenerating synthetic dataset at %s (parameters or files changed)", root)
        meta_path.unlink()

    cats = synthetic_categories(num_thing_classes, num_stuff_classes)
    things = [c for c in cats if c["isthing"]]
    stuff = [c for c in cats if not c["isthing"]]
    public_cats = [{k: v for k, v in c.items() if not k.startswith("_")} for c in cats]
    keep = set(expected)
    for split_idx, split in enumerate(SPLITS):
        if split not in paths:
            continue
        image_dir, json_path, png_dir = paths[split]
        image_dir.mkdir(parents=True, exist_ok=True)
        png_dir.mkdir(parents=True, exist_ok=True)
        for folder in (image_dir, png_dir):
            for f in folder.iterdir():
                if _OWN_FILE.match(f.name) and f not in keep:
                    f.unlink()
        images, annotations = [], []
        n = meta[f"num_{split}"]
        for i in tqdm(range(n), desc=f"synthetic {split}", disable=not progress):
            image_id = split_idx * 1_000_000 + i + 1
            rng = np.random.default_rng([int(seed), split_idx, i])
            image, ids, segments = _render(rng, (H, W), things, stuff)
            stem = f"{image_id:012d}"
            Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95)
            Image.fromarray(id_to_rgb(ids)).save(png_dir / f"{stem}.png")
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": W, "height": H})
            annotations.append(
                {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments}
            )
        doc = {
            "info": {"description": "RegSAM synthetic COCO panoptic", **split_meta},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": public_cats,
        }
        json_path.write_text(json.dumps(doc, sort_keys=True, indent=1))
    unlabeled_dir = root / UNLABELED_DIR
    if num_unlabeled or unlabeled_dir.is_dir():
        unlabeled_dir.mkdir(parents=True, exist_ok=True)
        for f in unlabeled_dir.iterdir():
            if _OWN_FILE.match(f.name) and f not in keep:
                f.unlink()
        for i in tqdm(range(num_unlabeled), desc="synthetic unlabeled", disable=not progress):
            rng = np.random.default_rng([int(seed), UNLABELED_STREAM, i])
            image, _ids, _segments = _render(rng, (H, W), things, stuff)
            stem = f"{UNLABELED_STREAM * 1_000_000 + i + 1:012d}"
            Image.fromarray(image).save(unlabeled_dir / f"{stem}.jpg", quality=95)
    meta_path.write_text(json.dumps(meta, sort_keys=True, indent=1))
    return paths
