"""Every dataset kind's annotations identify its teacher cache; an edited JSON is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache.fingerprint import FingerprintMismatchError, cache_dir, teacher_fingerprint
from pipeline.cache.reader import TeacherCache
from pipeline.cache.runner import build_cache, cache_layout
from pipeline.cache.store import CacheStore
from pipeline.config import load_config
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.teacher.sam_builder import sha256_file

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


def test_cityscapes_roots_map_to_different_caches(tmp_path):
    """Issue 11 item 4: two data.cityscapes_root (and data.root) values never share a cache."""

    def cfg(root):
        return load_config(
            BASE,
            [
                "data.dataset=cityscapes",
                f"data.cityscapes_root={root}",
                f"data.root={root}",
                f"cache.root={tmp_path / 'cache'}",
            ],
        )

    a, b = cache_dir(cfg(tmp_path / "cs_a"), "train"), cache_dir(cfg(tmp_path / "cs_b"), "train")
    assert a != b
    fp = teacher_fingerprint(cfg(tmp_path / "cs_a"), "train")["annotations"]
    assert fp["cityscapes"]["cityscapes_root"] == str(tmp_path / "cs_a")
    assert fp["json"] == "annotations/panoptic_train.json"
    only_cs = load_config(
        BASE,
        [
            "data.dataset=cityscapes",
            f"data.cityscapes_root={tmp_path / 'x'}",
            f"data.root={tmp_path / 'cs_a'}",
            f"cache.root={tmp_path / 'cache'}",
        ],
    )
    assert cache_dir(only_cs, "train") != a


def test_synthetic_root_and_json_path_enter_the_fingerprint(tmp_path):
    cfg = load_config(BASE, [f"data.root={tmp_path / 'a'}"])
    assert cache_dir(load_config(BASE, [f"data.root={tmp_path / 'b'}"]), "train") != cache_dir(
        cfg, "train"
    )
    other_json = load_config(
        BASE,
        [
            f"data.root={tmp_path / 'a'}",
            "data.train={images: train, json: other.json, png_dir: annotations/panoptic_train}",
        ],
    )
    assert cache_dir(other_json, "train") != cache_dir(cfg, "train")


@pytest.fixture()
def finished_cache(tmp_path):
    """A synthetic dataset and a cache marked complete for it (arrays left empty: the
    annotation check runs before any image is read)."""
    root = tmp_path / "data"
    generate_synthetic_coco_panoptic(
        root, num_train=2, num_val=1, image_size=(64, 64), seed=1, progress=False
    )
    cfg = load_config(BASE, [f"data.root={root}", f"cache.root={tmp_path / 'cache'}"])
    image_dir, json_path, png_dir = cfg.split_paths("train")
    layout = cache_layout(cfg, PanopticDataset(image_dir, json_path, png_dir, transform=None))
    path = cache_dir(cfg, "train")
    store = CacheStore.create_or_open(
        path, teacher_fingerprint(cfg, "train"), layout, annotation_sha256=sha256_file(json_path)
    )
    store.write_complete({"skipped_indices": []})
    return cfg, path, json_path


def edit(json_path: Path) -> None:
    doc = json.loads(json_path.read_text())
    doc["annotations"][0]["segments_info"][0]["category_id"] = doc["categories"][-1]["id"]
    json_path.write_text(json.dumps(doc))


def test_edited_train_json_is_refused_by_cache_teacher_and_the_reader(finished_cache):
    """Issue 11 item 4: after editing the synthetic train JSON, cache-teacher no longer says
    "complete; nothing to do" and the reader refuses the cache, both naming the mismatch."""
    cfg, path, json_path = finished_cache
    assert build_cache(cfg, "train", progress=False) == path  # unchanged: nothing to do
    TeacherCache.for_config(cfg, "train")
    edit(json_path)
    assert cache_dir(cfg, "train") == path  # the synthetic identity is its parameters and paths
    with pytest.raises(
        FingerprintMismatchError, match=r"annotation_sha256: cache [0-9a-f]{12}, asked"
    ):
        build_cache(cfg, "train", progress=False)
    with pytest.raises(FingerprintMismatchError, match=str(json_path)):
        TeacherCache.for_config(cfg, "train")


def test_resuming_an_unfinished_cache_refuses_other_annotations(finished_cache):
    cfg, path, json_path = finished_cache
    (path / "COMPLETE.json").unlink()
    edit(json_path)
    image_dir, _, png_dir = cfg.split_paths("train")
    layout = cache_layout(cfg, PanopticDataset(image_dir, json_path, png_dir, transform=None))
    with pytest.raises(FingerprintMismatchError, match="annotation_sha256"):
        CacheStore.create_or_open(
            path,
            teacher_fingerprint(cfg, "train"),
            layout,
            annotation_sha256=sha256_file(json_path),
        )
