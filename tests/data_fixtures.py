"""A tiny COCO-panoptic split written literally (not with the project's generator or encoder).

Image: 6 rows x 8 cols. Categories have non-contiguous ids listed out of order:
dog 2 (thing) -> train id 0, cat 5 (thing) -> 1, sky 17 (stuff) -> 2, grass 40 (stuff) -> 3.
Segment ids use all three PNG channels (70000 = 112 + 256 * 17 + 65536 * 1).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

SKY, GRASS, CAT_A, CAT_B, DOG_CROWD, DOG = 70000, 300, 5, 6, 9, 513

IDS = np.array(
    [
        [70000, 70000, 70000, 70000, 70000, 70000, 70000, 70000],
        [70000, 5, 5, 70000, 0, 0, 70000, 70000],
        [300, 5, 5, 300, 6, 6, 6, 300],
        [300, 300, 300, 300, 6, 6, 6, 300],
        [9, 9, 300, 513, 513, 300, 0, 300],
        [9, 9, 300, 513, 513, 300, 300, 300],
    ],
    dtype=np.int64,
)

# void (id 0) and the crowd segment 9
IGNORE = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
    ],
    dtype=bool,
)

# non-crowd segments in segments_info order, with their train ids
EXPECTED_SEGMENT_IDS = [CAT_B, SKY, GRASS, CAT_A, DOG]
EXPECTED_LABELS = [1, 2, 3, 1, 0]

JSON = {
    "images": [{"id": 42, "file_name": "img42.png", "width": 8, "height": 6}],
    "annotations": [
        {
            "image_id": 42,
            "file_name": "img42_pan.png",
            "segments_info": [
                {"id": 6, "category_id": 5, "iscrowd": 0},
                {"id": 70000, "category_id": 17, "iscrowd": 0},
                {"id": 9, "category_id": 2, "iscrowd": 1},
                {"id": 300, "category_id": 40, "iscrowd": 0},
                {"id": 5, "category_id": 5, "iscrowd": 0},
                {"id": 513, "category_id": 2, "iscrowd": 0},
            ],
        }
    ],
    "categories": [
        {"id": 40, "name": "grass", "isthing": 0, "color": [0, 128, 0]},
        {"id": 5, "name": "cat", "isthing": 1, "color": [200, 0, 0]},
        {"id": 17, "name": "sky", "isthing": 0, "color": [0, 0, 200]},
        {"id": 2, "name": "dog", "isthing": 1, "color": [200, 200, 0]},
    ],
}


def ids_to_png_rgb(ids: np.ndarray) -> np.ndarray:
    """The COCO panoptic encoding, written out independently of the project's id_to_rgb."""
    r = ids % 256
    g = (ids // 256) % 256
    b = ids // (256 * 256)
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def image_pixels(height: int = 6, width: int = 8) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_split(
    root: Path, ids: np.ndarray = IDS, doc: dict | None = None, image: np.ndarray | None = None
) -> tuple[Path, Path, Path]:
    """Write images/, pan/ and panoptic.json under ``root``; returns (image_dir, json, png_dir)."""
    doc = copy.deepcopy(JSON if doc is None else doc)
    image_dir, png_dir, json_path = root / "images", root / "pan", root / "panoptic.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_pixels() if image is None else image).save(image_dir / "img42.png")
    Image.fromarray(ids_to_png_rgb(ids)).save(png_dir / "img42_pan.png")
    json_path.write_text(json.dumps(doc))
    return image_dir, json_path, png_dir
