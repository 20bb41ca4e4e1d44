"""Cityscapes -> COCO panoptic, through cityscapesscripts' ``csCreatePanopticImgs``.

The converter reads ``gtFine/<split>/<city>/*_gtFine_instanceIds.png`` and writes
``gtFine/cityscapes_panoptic_<split>.json`` and ``gtFine/cityscapes_panoptic_<split>/*.png``
with the original Cityscapes label ids as category ids (``useTrainId=False``; categories that are
ignored in evaluation become void). :class:`~pipeline.data.coco_panoptic.PanopticDataset` maps
those 19 ids to train ids 0..18 in id order (the official Cityscapes train ids) and finds the
images in ``leftImg8bit/<split>/<city>/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

__all__ = ["convert_cityscapes", "cityscapes_paths"]

log = logging.getLogger(__name__)


def cityscapes_paths(root: str | Path, split: str) -> tuple[Path, Path, Path]:
    """``(image_dir, json_path, png_dir)`` of a converted Cityscapes split under ``root``."""
    root = Path(root)
    gt = root / "gtFine"
    return (
        root / "leftImg8bit" / split,
        gt / f"cityscapes_panoptic_{split}.json",
        gt / f"cityscapes_panoptic_{split}",
    )


def convert_cityscapes(
    cityscapes_root: str | Path,
    splits: Sequence[str] = ("train", "val"),
    overwrite: bool = False,
) -> dict[str, tuple[Path, Path, Path]]:
    """Convert Cityscapes ``gtFine`` instance annotations to COCO panoptic format.

    Arguments:
        cityscapes_root: folder holding ``gtFine/`` and ``leftImg8bit/``.
        splits: splits to convert.
        overwrite: convert again even if the split's JSON already exists.

    Returns:
        ``{split: (image_dir, json_path, png_dir)}``.

    Raises:
        ImportError: ``cityscapesscripts`` is not installed.
        FileNotFoundError: a split has no ``*_gtFine_instanceIds.png`` or no image folder.
    """
    try:
        from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic
    except ImportError as e:
        raise ImportError(
            "Cityscapes conversion needs the 'cityscapesscripts' package "
            "(pip install cityscapesscripts)"
        ) from e
    root = Path(cityscapes_root)
    gt = root / "gtFine"
    out: dict[str, tuple[Path, Path, Path]] = {}
    todo = []
    for split in splits:
        paths = cityscapes_paths(root, split)
        out[split] = paths
        if not any((gt / split).glob("*/*_instanceIds.png")):
            raise FileNotFoundError(
                f"{gt / split}: no <city>/*_gtFine_instanceIds.png found; "
                "expected the official Cityscapes gtFine layout"
            )
        if not paths[0].is_dir():
            raise FileNotFoundError(f"{paths[0]}: Cityscapes image folder not found")
        if paths[1].is_file() and not overwrite:
            log.info("%s exists; skipping conversion of %s", paths[1], split)
            continue
        todo.append(split)
    if todo:
        convert2panoptic(
            cityscapesPath=str(gt), outputFolder=str(gt), useTrainId=False, setNames=list(todo)
        )
    return out
