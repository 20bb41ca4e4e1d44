"""Unlabelled images: sources, the label-scarce split, bad files, and the synthetic split."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.coco_panoptic import DataError, PanopticDataset, collate_panoptic, SkipSummary
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from pipeline.data.transforms import TrainTransform
from pipeline.data.unlabeled import (
    UnlabeledDataset,
    labeled_indices,
    source_images,
    unlabeled_images,
)

ROOT = Path(__file__).resolve().parents[1]


def digest_tree(root: Path, skip: str = "unlabeled") -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip)
    }


def test_label_scarce_split_is_deterministic_with_the_declared_fraction():
    a = labeled_indices(96, 0.25, seed=0)
    assert len(a) == 24 and np.array_equal(a, labeled_indices(96, 0.25, seed=0))
    assert np.array_equal(a, np.unique(a)) and a.min() >= 0 and a.max() < 96
    assert not np.array_equal(a, labeled_indices(96, 0.25, seed=1))  # the seed matters
    assert len(labeled_indices(10, 0.25, 0)) == 2  # round(2.5) = 2 (banker's rounding)
    assert len(labeled_indices(3, 0.01, 0)) == 1  # never empty
    assert np.array_equal(labeled_indices(7, 1.0, 5), np.arange(7))
    # a larger fraction keeps a superset: the subset is a prefix of one permutation
    assert set(a) <= set(labeled_indices(96, 0.5, seed=0))
    with pytest.raises(ValueError, match="labeled_fraction"):
        labeled_indices(10, 0.0, 0)


def test_synthetic_unlabelled_split_leaves_the_other_splits_unchanged(tmp_path):
    kw = dict(num_train=3, num_val=2, image_size=(32, 32), seed=1, progress=False)
    generate_synthetic_coco_panoptic(tmp_path / "a", **kw)
    generate_synthetic_coco_panoptic(tmp_path / "b", **kw, num_unlabeled=4)
    a, b = digest_tree(tmp_path / "a"), digest_tree(tmp_path / "b", skip="unlabeled")
    # every split's image, PNG and JSON is byte-identical; only the meta file records the count
    assert {k: v for k, v in a.items() if k != "synthetic_meta.json"} == {
        k: v for k, v in b.items() if k != "synthetic_meta.json"
    }
    assert len(a) == 1 + 2 + 2 * 5
    files = sorted(p.name for p in (tmp_path / "b" / "unlabeled").iterdir())
    assert files == [f"{3_000_001 + i:012d}.jpg" for i in range(4)]
    again = tmp_path / "c"
    generate_synthetic_coco_panoptic(again, **kw, num_unlabeled=4)
    assert digest_tree(tmp_path / "b", skip="x") == digest_tree(again, skip="x")  # deterministic


def test_sources_folder_and_image_list(tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    for name in ("b.jpg", "a.png", "notes.txt"):
        (folder / name).write_bytes(b"")
    got = source_images(tmp_path, "extra")
    assert [i.image_id for i in got] == ["extra/a.png", "extra/b.jpg"]
    (tmp_path / "list.json").write_text(json.dumps({"images": [{"id": 7, "file_name": "b.jpg"}]}))
    got = source_images(tmp_path, "extra", "list.json")
    assert [(i.image_id, i.path) for i in got] == [("extra/b.jpg", folder / "b.jpg")]
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"id": 7}]}))
    with pytest.raises(DataError, match=r"bad\.json.*images\[0\].*file_name"):
        source_images(tmp_path, "extra", "bad.json")
    with pytest.raises(DataError, match="nope.*unlabelled image folder not found"):
        source_images(tmp_path, "nope")


def test_config_lists_heldout_train_images_then_sources(tmp_path):
    root = tmp_path / "d"
    generate_synthetic_coco_panoptic(
        root, num_train=8, num_val=1, image_size=(32, 32), progress=False, num_unlabeled=2
    )
    cfg = load_config(
        ROOT / "configs/base.yaml",
        [f"data.root={root}", "data.labeled_fraction=0.25", "data.unlabeled=[unlabeled]"],
    )
    images = unlabeled_images(cfg)
    train = PanopticDataset(*cfg.split_paths("train"))
    keep = labeled_indices(8, 0.25, 0)
    held = [train.image_ids[i] for i in range(8) if i not in set(keep)]
    assert [i.image_id for i in images] == held + [
        "unlabeled/000003000001.jpg",
        "unlabeled/000003000002.jpg",
    ]
    assert len(held) == 6
    # the labelled subset and the held-out images partition the train split
    sub = train.subset(keep)
    assert set(sub.image_ids) | set(held) == set(train.image_ids)
    assert not set(sub.image_ids) & set(held)


def test_config_keys_are_validated_with_their_names():
    base = ROOT / "configs/base.yaml"
    with pytest.raises(ConfigError, match="data.labeled_fraction"):
        load_config(base, ["data.labeled_fraction=1.5"])
    with pytest.raises(ConfigError, match="training.unlabeled_ratio"):
        load_config(base, ["training.unlabeled_ratio=1.0"])
    with pytest.raises(ConfigError, match="training.unlabeled_ratio.*no unlabelled images"):
        load_config(base, ["training.unlabeled_ratio=0.5", "model.use_sam_distill=true"])
    with pytest.raises(ConfigError, match="training.unlabeled_ratio.*use_sam_distill"):
        load_config(base, ["training.unlabeled_ratio=0.5", "data.unlabeled=[u]"])
    with pytest.raises(ConfigError, match="teacher.automatic.pred_iou_thresh"):
        load_config(base, ["teacher.automatic.pred_iou_thresh=2"])
    with pytest.raises(ConfigError, match="unknown key 'data.unlabeled.folder'"):
        load_config(base, ["data.unlabeled=[{folder: x}]"])


@pytest.fixture
def bad_images(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a_rgb.jpg")
    Image.fromarray(rgb).convert("CMYK").save(folder / "b_cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "c_gray.png")
    (folder / "d_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return source_images(tmp_path, "u")


def test_bad_unlabelled_images_error_naming_the_file(bad_images):
    data = UnlabeledDataset(bad_images, on_bad_sample="error")
    with pytest.raises(DataError, match=r"d_corrupt\.jpg.*cannot decode"):
        data[3]


def test_bad_unlabelled_images_are_counted(bad_images):
    data = UnlabeledDataset(
        bad_images, transform=TrainTransform((32, 32), (0.8, 1.2)), on_bad_sample="skip", seed=2
    )
    batch = collate_panoptic([data[i] for i in range(len(data))])
    summary = SkipSummary()
    summary.add_batch(batch)
    assert summary == {
        "skipped:corrupt_image": 1,
        "converted_to_rgb:CMYK": 1,
        "converted_to_rgb:L": 1,
    }
    assert batch["images"].shape == (3, 3, 32, 32)
    for t in batch["targets"]:
        assert t["unlabeled"] and t["masks"].shape == (0, 32, 32) and t["labels"].numel() == 0
        assert t["transform"].shape == (3, 3) and not t["ignore"][t["valid"]].any()
    # augmentation is a pure function of (seed, epoch, index)
    again = data[0]
    assert np.array_equal(again["transform"], batch["targets"][0]["transform"])
