"""Cityscapes conversion end to end on a tiny fake tree in the official layout."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.cityscapes import cityscapes_paths, convert_cityscapes
from pipeline.data.coco_panoptic import PanopticDataset

# Cityscapes label ids: 0 unlabeled (ignored in eval), 7 road, 23 sky, 24 person, 26 car.
# Instance ids: label * 1000 + k; a bare label id of a thing class (24) is a crowd region.
INSTANCE_IDS = np.array(
    [
        [23, 23, 23, 23, 23, 23, 23, 23, 23, 23],
        [23, 23, 26000, 26000, 23, 23, 26001, 26001, 26001, 23],
        [7, 7, 26000, 26000, 7, 7, 26001, 26001, 26001, 0],
        [24, 24, 7, 7, 7, 7, 7, 7, 0, 0],
        [24, 24, 7, 7, 24002, 24002, 7, 7, 7, 7],
        [7, 7, 7, 7, 24002, 24002, 7, 7, 7, 7],
    ],
    dtype=np.uint16,
)

# Cityscapes train ids of the 19 evaluated classes, in label-id order.
ROAD, SKY, PERSON, CAR = 0, 10, 11, 13


def _write_tree(root, split: str, city: str, frame: str, seed: int) -> np.ndarray:
    gt_dir = root / "gtFine" / split / city
    img_dir = root / "leftImg8bit" / split / city
    gt_dir.mkdir(parents=True)
    img_dir.mkdir(parents=True)
    stem = f"{city}_000000_{frame}"
    Image.fromarray(INSTANCE_IDS).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    image = np.random.default_rng(seed).integers(0, 256, (*INSTANCE_IDS.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
    return image


def test_convert_and_read(tmp_path):
    image = _write_tree(tmp_path, "train", "aachen", "000019", 0)
    _write_tree(tmp_path, "val", "frankfurt", "000294", 1)
    out = convert_cityscapes(tmp_path, splits=("train", "val"))
    assert out["train"] == cityscapes_paths(tmp_path, "train")
    image_dir, json_path, png_dir = out["train"]
    assert json_path.is_file() and png_dir.is_dir() and out["val"][1].is_file()

    ds = PanopticDataset(image_dir, json_path, png_dir, on_bad_sample="error")
    assert len(ds.categories) == 19
    by_name = {c.name: c for c in ds.categories}
    assert (by_name["road"].id, by_name["road"].train_id) == (7, ROAD)
    assert (by_name["sky"].train_id, by_name["person"].train_id, by_name["car"].train_id) == (
        SKY,
        PERSON,
        CAR,
    )
    assert by_name["car"].isthing and not by_name["road"].isthing
    assert ds.image_ids == ["aachen_000000_000019"]

    s = ds[0]
    assert torch.equal(s["image"], torch.from_numpy(image).permute(2, 0, 1))
    got = dict(zip(s["segment_ids"].tolist(), s["labels"].tolist()))
    assert got == {7: ROAD, 23: SKY, 24002: PERSON, 26000: CAR, 26001: CAR}
    for sid, m in zip(s["segment_ids"].tolist(), s["masks"]):
        assert torch.equal(m, torch.from_numpy(INSTANCE_IDS.astype(np.int64) == sid))
    crowd_or_void = (INSTANCE_IDS == 24) | (INSTANCE_IDS == 0)
    assert torch.equal(s["ignore"], torch.from_numpy(crowd_or_void))
    assert {seg["id"]: seg["iscrowd"] for seg in ds.segments(0)}[24] is True

    # a second call reuses the converted split
    stamp = json_path.stat().st_mtime_ns
    convert_cityscapes(tmp_path, splits=("train",))
    assert json_path.stat().st_mtime_ns == stamp


def test_missing_annotations_are_named(tmp_path):
    (tmp_path / "gtFine" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="instanceIds"):
        convert_cityscapes(tmp_path, splits=("train",))


def test_missing_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts.preparation.createPanopticImgs", None)
    with pytest.raises(ImportError, match="cityscapesscripts"):
        convert_cityscapes(tmp_path)
