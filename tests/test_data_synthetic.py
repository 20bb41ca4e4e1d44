"""Synthetic generator: exact COCO panoptic format, determinism, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import synthetic
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.data.synthetic import generate_synthetic_coco_panoptic, synthetic_paths

PARAMS = dict(
    num_train=10,
    num_val=3,
    image_size=(48, 64),
    num_thing_classes=3,
    num_stuff_classes=2,
    seed=0,
    progress=False,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_coco_panoptic(root, **PARAMS)
    return root


def test_layout_and_categories(dataset_root):
    for split, n in (("train", 10), ("val", 3)):
        image_dir, json_path, png_dir = synthetic_paths(dataset_root, split)
        assert json_path == dataset_root / "annotations" / f"panoptic_{split}.json"
        assert len(list(image_dir.glob("*.jpg"))) == n and len(list(png_dir.glob("*.png"))) == n
        doc = json.loads(json_path.read_text())
        assert set(doc) >= {"images", "annotations", "categories"}
        cats = {c["id"]: c for c in doc["categories"]}
        assert sorted(cats) == [1, 3, 7, 100, 103]
        assert [cats[i]["isthing"] for i in sorted(cats)] == [1, 1, 1, 0, 0]
        assert all(len(c["color"]) == 3 and c["name"] for c in cats.values())
        assert not any(k.startswith("_") for c in doc["categories"] for k in c)


def test_png_ids_match_segments_info(dataset_root):
    """Decode every PNG with the COCO formula and check ids, areas, bboxes, categories."""
    n_crowd = n_void = 0
    for split in ("train", "val"):
        image_dir, json_path, png_dir = synthetic_paths(dataset_root, split)
        doc = json.loads(json_path.read_text())
        images = {im["id"]: im for im in doc["images"]}
        cat_ids = {c["id"] for c in doc["categories"]}
        for ann in doc["annotations"]:
            im = images[ann["image_id"]]
            with Image.open(image_dir / im["file_name"]) as f:
                assert f.mode == "RGB" and f.size == (im["width"], im["height"]) == (64, 48)
            with Image.open(png_dir / ann["file_name"]) as f:
                assert f.mode == "RGB"
                rgb = np.array(f).astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            segs = {s["id"]: s for s in ann["segments_info"]}
            assert set(np.unique(ids).tolist()) - {0} == set(segs)
            n_void += int((ids == 0).any())
            for sid, s in segs.items():
                m = ids == sid
                ys, xs = np.nonzero(m)
                assert s["area"] == m.sum()
                assert s["bbox"] == [
                    xs.min(),
                    ys.min(),
                    xs.max() - xs.min() + 1,
                    ys.max() - ys.min() + 1,
                ]
                assert s["category_id"] in cat_ids and s["iscrowd"] in (0, 1)
                n_crowd += s["iscrowd"]
            assert any(not s["iscrowd"] and s["category_id"] < 100 for s in segs.values())
    assert n_crowd > 0 and n_void > 0


def test_reads_back_without_errors(dataset_root):
    for split in ("train", "val"):
        ds = PanopticDataset(*synthetic_paths(dataset_root, split), on_bad_sample="error")
        assert [c.id for c in ds.categories] == [1, 3, 7, 100, 103]
        for i in range(len(ds)):
            s = ds[i]
            assert s["events"] == [] and s["image"].shape == (3, 48, 64)
            assert s["masks"].any(dim=(1, 2)).all()
            # the two stuff classes always cover the background
            assert {3, 4} & set(s["labels"].tolist())


def test_byte_identical_for_same_seed(dataset_root, tmp_path):
    generate_synthetic_coco_panoptic(tmp_path / "again", **PARAMS)
    assert _files(tmp_path / "again") == _files(dataset_root)
    other = dict(PARAMS, seed=1)
    generate_synthetic_coco_panoptic(tmp_path / "other", **other)
    a, b = _files(tmp_path / "other"), _files(dataset_root)
    assert a.keys() == b.keys()
    assert a["train/000000000001.jpg"] != b["train/000000000001.jpg"]


def test_idempotent_and_regenerates_on_change(tmp_path, monkeypatch):
    root = tmp_path / "d"
    generate_synthetic_coco_panoptic(root, **dict(PARAMS, num_train=4, num_val=2))
    before = _files(root)

    def fail(*args, **kwargs):
        raise AssertionError("should not render")

    monkeypatch.setattr(synthetic, "_render", fail)
    generate_synthetic_coco_panoptic(root, **dict(PARAMS, num_train=4, num_val=2))
    assert _files(root) == before
    monkeypatch.undo()

    (root / "train" / "000000000002.jpg").unlink()  # an incomplete dataset is rebuilt
    generate_synthetic_coco_panoptic(root, **dict(PARAMS, num_train=4, num_val=2))
    assert _files(root) == before

    generate_synthetic_coco_panoptic(root, **dict(PARAMS, num_train=2, num_val=2))
    assert sorted(p.name for p in (root / "train").iterdir()) == [
        "000000000001.jpg",
        "000000000002.jpg",
    ]
    assert json.loads((root / "synthetic_meta.json").read_text())["num_train"] == 2


def test_more_classes_keep_distinct_ids(tmp_path):
    cats = synthetic.synthetic_categories(10, 9)
    ids = [c["id"] for c in cats]
    names = [c["name"] for c in cats]
    assert len(set(ids)) == 19 and len(set(names)) == 19
    assert ids[:3] == [1, 3, 7] and max(ids[:10]) < 100 and ids[10:13] == [100, 103, 106]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_coco_panoptic(tmp_path, 1, 1, image_size=(8, 8))
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic_coco_panoptic(tmp_path, 0, 1)
    with pytest.raises(ValueError, match="num_thing_classes"):
        generate_synthetic_coco_panoptic(tmp_path, 1, 1, num_thing_classes=11)
