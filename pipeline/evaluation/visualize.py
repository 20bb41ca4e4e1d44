"""Coloured panoptic overlays and image | ground truth | prediction panels.

Everything here works in the dataset's original category ids (the ids of a COCO panoptic
``segments_info``, i.e. GT annotations and :func:`~pipeline.evaluation.inference.to_coco_panoptic`
outputs). Images are uint8 ``[H, W, 3]`` numpy arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.evaluation.pq import CategoryLike

__all__ = [
    "category_color",
    "segment_color",
    "find_boundaries",
    "colorize_panoptic",
    "overlay_panoptic",
    "side_by_side",
    "save_image",
]

THING_JITTER = 48  # max per-channel colour offset between instances of one thing class


def category_color(category: CategoryLike) -> tuple[int, int, int]:
    """The category's ``color`` or, if it has none, a fixed colour derived from its id."""
    color = getattr(category, "color", None)
    if color is not None and len(color) == 3:
        return tuple(int(c) for c in color)  # type: ignore[return-value]
    rng = np.random.default_rng(int(category.id) + 7919)
    return tuple(int(c) for c in rng.integers(40, 256, size=3))  # type: ignore[return-value]


def segment_color(base: tuple[int, int, int], segment_id: int, isthing: bool) -> np.ndarray:
    """Stuff keeps the category colour; thing instances get a deterministic per-id jitter."""
    color = np.asarray(base, dtype=np.int64)
    if isthing:
        rng = np.random.default_rng(int(segment_id))
        color = color + rng.integers(-THING_JITTER, THING_JITTER + 1, size=3)
    return np.clip(color, 0, 255).astype(np.uint8)


def find_boundaries(id_map: np.ndarray) -> np.ndarray:
    """bool ``[H, W]``: pixels whose right or lower 4-neighbour has a different id."""
    ids = np.asarray(id_map)
    edge = np.zeros(ids.shape, dtype=bool)
    diff_x = ids[:, 1:] != ids[:, :-1]
    diff_y = ids[1:, :] != ids[:-1, :]
    edge[:, :-1] |= diff_x
    edge[:-1, :] |= diff_y
    return edge


def colorize_panoptic(
    id_map: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    categories: Sequence[CategoryLike],
) -> tuple[np.ndarray, np.ndarray]:
    """Colour every segment; returns (uint8 ``[H, W, 3]``, bool ``[H, W]`` coloured pixels).

    Pixels of ids missing from ``segments_info`` (void) stay black and uncoloured.
    """
    by_id = {int(c.id): c for c in categories}
    ids = np.asarray(id_map).astype(np.int64)
    colors = np.zeros((*ids.shape, 3), dtype=np.uint8)
    painted = np.zeros(ids.shape, dtype=bool)
    for i, seg in enumerate(segments_info):
        cat_id = int(seg["category_id"])
        if cat_id not in by_id:
            raise ValueError(f"segments_info[{i}] has unknown category_id {cat_id}")
        cat = by_id[cat_id]
        mask = ids == int(seg["id"])
        colors[mask] = segment_color(category_color(cat), int(seg["id"]), bool(cat.isthing))
        painted |= mask
    return colors, painted


def overlay_panoptic(
    image: np.ndarray,
    id_map: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    categories: Sequence[CategoryLike],
    alpha: float = 0.55,
    boundary_color: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """Alpha-blend segment colours over ``image`` and draw segment boundaries.

    Arguments:
        image: uint8 ``[H, W, 3]``.
        id_map: integer ``[H, W]`` segment ids of the same size.
        alpha: weight of the segment colour; void pixels keep the image.

    Returns:
        uint8 ``[H, W, 3]``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    if image.shape[:2] != np.shape(id_map):
        raise ValueError(f"image {image.shape[:2]} and id_map {np.shape(id_map)} differ in size")
    colors, painted = colorize_panoptic(id_map, segments_info, categories)
    out = image.astype(np.float32)
    out[painted] = (1 - alpha) * out[painted] + alpha * colors[painted].astype(np.float32)
    out = np.round(out).clip(0, 255).astype(np.uint8)
    out[find_boundaries(id_map)] = boundary_color
    return out


def side_by_side(
    panels: Sequence[np.ndarray],
    titles: Sequence[str] = ("image", "ground truth", "prediction"),
    gap: int = 4,
    title_height: int = 14,
) -> np.ndarray:
    """Panels uint8 ``[H, W_i, 3]`` of one height in a row, a title strip above each."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    height = panels[0].shape[0]
    for i, p in enumerate(panels):
        if p.ndim != 3 or p.shape[0] != height or p.shape[-1] != 3:
            raise ValueError(f"panel {i} has shape {p.shape}; expected [{height}, W, 3]")
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.full((height + title_height, width, 3), 255, dtype=np.uint8)
    x = 0
    offsets = []
    for p in panels:
        canvas[title_height:, x : x + p.shape[1]] = p
        offsets.append(x)
        x += p.shape[1] + gap
    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    for x0, title in zip(offsets, titles):
        draw.text((x0 + 2, 1), title, fill=(0, 0, 0))
    return np.asarray(pil)


def save_image(array: np.ndarray, path: str | Path, quality: int = 90) -> None:
    """Write uint8 ``[H, W, 3]`` as PNG or JPEG (by suffix), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"quality": quality} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **kwargs)
