"""COCO panoptic reader: a hand-written split, every bad input in both modes, batching, seeding."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.coco_panoptic import (
    Category,
    DataError,
    PanopticDataset,
    SkipSummary,
    collate_panoptic,
    load_panoptic_png,
)
from pipeline.data.transforms import TrainTransform
from tests.data_fixtures import (
    EXPECTED_LABELS,
    EXPECTED_SEGMENT_IDS,
    IDS,
    IGNORE,
    JSON,
    image_pixels,
    write_split,
)


def _dataset(paths, mode="error", **kw) -> PanopticDataset:
    return PanopticDataset(*paths, on_bad_sample=mode, **kw)


# ------------------------------------------------------------------------------ the good case
def test_hand_written_sample_exact(tmp_path):
    ds = _dataset(write_split(tmp_path))
    assert len(ds) == 1 and ds.image_ids == ["42"]
    assert ds.categories == [
        Category(2, "dog", True, (200, 200, 0), 0),
        Category(5, "cat", True, (200, 0, 0), 1),
        Category(17, "sky", False, (0, 0, 200), 2),
        Category(40, "grass", False, (0, 128, 0), 3),
    ]
    s = ds[0]
    assert s["segment_ids"].tolist() == EXPECTED_SEGMENT_IDS
    assert s["labels"].tolist() == EXPECTED_LABELS
    assert s["masks"].dtype == torch.bool and s["masks"].shape == (5, 6, 8)
    for k, sid in enumerate(EXPECTED_SEGMENT_IDS):
        assert torch.equal(s["masks"][k], torch.from_numpy(IDS == sid)), sid
    assert torch.equal(s["ignore"], torch.from_numpy(IGNORE))
    assert s["valid"].all()
    np.testing.assert_array_equal(s["transform"], np.eye(3))
    assert s["image"].dtype == torch.uint8
    assert torch.equal(s["image"], torch.from_numpy(image_pixels()).permute(2, 0, 1))
    assert s["orig_size"] == (6, 8) and s["file_name"] == "img42.png" and s["image_id"] == "42"
    assert s["events"] == []
    # 70000 needs the blue channel, 513 the green one.
    assert load_panoptic_png(ds.png_path(0))[0, 0] == 70000
    assert ds.segments(0)[2] == {
        "id": 9,
        "category_id": 2,
        "train_id": 0,
        "isthing": True,
        "iscrowd": True,
    }
    assert ds.index_of("42") == 0 and ds.num_classes == 4


def test_cityscapes_style_city_subfolder(tmp_path):
    doc = copy.deepcopy(JSON)
    doc["images"][0]["file_name"] = "aachen_000000_000019_gtFine_leftImg8bit.png"
    image_dir, json_path, png_dir = write_split(tmp_path, doc=doc)
    (image_dir / "aachen").mkdir()
    (image_dir / "img42.png").rename(image_dir / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    ds = _dataset((image_dir, json_path, png_dir))
    assert ds.image_path(0) == image_dir / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    assert ds[0]["labels"].tolist() == EXPECTED_LABELS


# ------------------------------------------------------------------------------ bad samples
def _missing_image(paths):
    (paths[0] / "img42.png").unlink()


def _truncated_jpeg(paths):
    doc = json.loads(paths[1].read_text())
    doc["images"][0]["file_name"] = "img42.jpg"
    paths[1].write_text(json.dumps(doc))
    big = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(big).save(paths[0] / "img42.jpg", quality=95)
    data = (paths[0] / "img42.jpg").read_bytes()
    (paths[0] / "img42.jpg").write_bytes(data[: len(data) // 2])


def _corrupt_png(paths):
    (paths[2] / "img42_pan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))


def _truncated_png(paths):
    data = (paths[2] / "img42_pan.png").read_bytes()
    (paths[2] / "img42_pan.png").write_bytes(data[: len(data) - 30])


def _missing_png(paths):
    (paths[2] / "img42_pan.png").unlink()


def _grayscale_png(paths):
    Image.fromarray((IDS % 256).astype(np.uint8)).save(paths[2] / "img42_pan.png")


def _size_mismatch(paths):
    Image.fromarray(image_pixels(7, 8)).save(paths[0] / "img42.png")


def _json_size_mismatch(paths):
    doc = json.loads(paths[1].read_text())
    doc["images"][0]["width"] = 9
    paths[1].write_text(json.dumps(doc))


def _png_id_absent(paths):
    doc = json.loads(paths[1].read_text())
    doc["annotations"][0]["segments_info"] = [
        s for s in doc["annotations"][0]["segments_info"] if s["id"] != 513
    ]
    paths[1].write_text(json.dumps(doc))


def _no_segments(paths):
    ids = np.where(IDS == 9, 9, 0)
    write_split(paths[0].parent, ids=ids)


BAD_SAMPLES = [
    (_missing_image, "missing_image", "img42.png"),
    (_truncated_jpeg, "corrupt_image", "img42.jpg"),
    (_corrupt_png, "corrupt_png", "img42_pan.png"),
    (_truncated_png, "corrupt_png", "img42_pan.png"),
    (_missing_png, "missing_png", "img42_pan.png"),
    (_grayscale_png, "png_not_rgb", "img42_pan.png"),
    (_size_mismatch, "size_mismatch", "img42_pan.png"),
    (_json_size_mismatch, "size_mismatch", "panoptic.json"),
    (_png_id_absent, "unknown_png_id", "513"),
    (_no_segments, "no_segments", "img42_pan.png"),
]


@pytest.mark.parametrize(
    "breaker,kind,named", BAD_SAMPLES, ids=[b[1] + "-" + b[0].__name__ for b in BAD_SAMPLES]
)
def test_bad_sample_error_mode(tmp_path, breaker, kind, named):
    paths = write_split(tmp_path)
    breaker(paths)
    ds = _dataset(paths, "error")
    with pytest.raises(DataError) as info:
        ds[0]
    assert isinstance(info.value, ValueError)
    assert info.value.kind == kind
    assert named in str(info.value)


@pytest.mark.parametrize(
    "breaker,kind,named", BAD_SAMPLES, ids=[b[1] + "-" + b[0].__name__ for b in BAD_SAMPLES]
)
def test_bad_sample_skip_mode(tmp_path, breaker, kind, named):
    paths = write_split(tmp_path)
    breaker(paths)
    rec = _dataset(paths, "skip")[0]
    assert rec["skip_reason"] == kind
    assert rec["image_id"] == "42"
    assert rec["file_name"] == json.loads(paths[1].read_text())["images"][0]["file_name"]
    assert named in rec["message"]
    batch = collate_panoptic([rec])
    assert batch["targets"] == [] and batch["images"].shape[0] == 0
    assert batch["skipped"] == [(rec["file_name"], kind)]


@pytest.mark.parametrize(
    "mode,pil_mode",
    [("error", "L"), ("skip", "RGBA"), ("error", "CMYK"), ("skip", "P"), ("skip", "L")],
)
def test_non_rgb_images_are_converted_and_counted(tmp_path, mode, pil_mode):
    paths = write_split(tmp_path)
    pil = Image.fromarray(image_pixels()).convert(pil_mode)
    name = "img42.jpg" if pil_mode == "CMYK" else "img42.png"
    if pil_mode == "CMYK":
        doc = json.loads(paths[1].read_text())
        doc["images"][0]["file_name"] = name
        paths[1].write_text(json.dumps(doc))
        pil.save(paths[0] / name, quality=100)
    else:
        pil.save(paths[0] / name)
    with Image.open(paths[0] / name) as im:
        expected = np.array(im.convert("RGB"))
    s = _dataset(paths, mode)[0]
    assert "skip_reason" not in s
    assert s["events"] == [f"converted_to_rgb:{pil_mode}"]
    assert torch.equal(s["image"], torch.from_numpy(expected).permute(2, 0, 1))
    assert s["labels"].tolist() == EXPECTED_LABELS
    summary = SkipSummary()
    summary.add_batch(collate_panoptic([s]))
    assert summary == {f"converted_to_rgb:{pil_mode}": 1} and summary.num_skipped == 0


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_segment_without_pixels_is_dropped_and_counted(tmp_path, mode):
    doc = copy.deepcopy(JSON)
    doc["annotations"][0]["segments_info"].append({"id": 777, "category_id": 5, "iscrowd": 0})
    s = _dataset(write_split(tmp_path, doc=doc), mode)[0]
    assert s["segment_ids"].tolist() == EXPECTED_SEGMENT_IDS
    assert s["events"] == ["dropped_empty_segment"]


# ------------------------------------------------------------------------------ bad JSON
def _drop(path):
    def f(doc):
        obj = doc
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return f


def _set(path, value):
    def f(doc):
        obj = doc
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return f


BAD_JSON = [
    (_drop(["annotations"]), "field 'annotations'"),
    (_drop(["categories", 1, "isthing"]), "categories[1] has no field 'isthing'"),
    (_drop(["annotations", 0, "segments_info"]), "annotations[0] has no field 'segments_info'"),
    (
        _drop(["annotations", 0, "segments_info", 3, "category_id"]),
        "annotations[0].segments_info[3] (image_id 42) has no field 'category_id'",
    ),
    (_set(["images", 0, "file_name"], 3), "field 'file_name' of images[0] must be str"),
    (_set(["annotations", 0, "image_id"], 43), "image_id 43, which is not in 'images'"),
    (
        _set(["annotations", 0, "segments_info", 1, "category_id"], 99),
        "segment id 70000 has unknown category_id 99",
    ),
    (_set(["annotations", 0, "segments_info", 1, "id"], 6), "duplicate segment id 6"),
    (_set(["categories", 0, "id"], 5), "duplicate category id 5"),
]


@pytest.mark.parametrize("mutate,message", BAD_JSON, ids=[m for _, m in BAD_JSON])
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_json_fails_at_construction(tmp_path, mutate, message, mode):
    doc = copy.deepcopy(JSON)
    mutate(doc)
    paths = write_split(tmp_path, doc=doc)
    with pytest.raises(DataError) as info:
        _dataset(paths, mode)
    assert str(paths[1]) in str(info.value)
    assert message in str(info.value)


def test_invalid_json_text(tmp_path):
    paths = write_split(tmp_path)
    paths[1].write_text("{not json")
    with pytest.raises(DataError, match="panoptic.json: not valid JSON"):
        _dataset(paths)


def test_bad_arguments(tmp_path):
    paths = write_split(tmp_path)
    with pytest.raises(ValueError, match="on_bad_sample"):
        PanopticDataset(*paths, on_bad_sample="ignore")
    with pytest.raises(DataError, match="image folder not found"):
        PanopticDataset(tmp_path / "nope", paths[1], paths[2])


# ------------------------------------------------------------------------------ batching
def test_collate_pads_to_32_with_ignore(tmp_path):
    good = _dataset(write_split(tmp_path / "a"))[0]
    broken = write_split(tmp_path / "b")
    _missing_image(broken)
    skip = _dataset(broken, "skip")[0]
    batch = collate_panoptic([good, skip, good])
    images = batch["images"]
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert torch.equal(images[1, :, :6, :8], good["image"])
    assert images[:, :, 6:].eq(0).all() and images[:, :, :, 8:].eq(0).all()
    t = batch["targets"][0]
    assert t["masks"].shape == (5, 32, 32) and not t["masks"][:, 6:].any()
    assert torch.equal(t["ignore"][:6, :8], torch.from_numpy(IGNORE))
    assert t["ignore"][6:].all() and t["ignore"][:, 8:].all()
    assert t["valid"][:6, :8].all() and t["valid"].sum() == 48
    assert t["labels"].tolist() == EXPECTED_LABELS
    assert batch["skipped"] == [("img42.png", "missing_image")]

    summary = SkipSummary()
    summary.add_batch(batch)
    summary.add_batch(batch)
    assert summary == {"skipped:missing_image": 2}
    assert summary.report() == "skipped 2 samples (missing_image 2)"


# ------------------------------------------------------------------------------ seeding
def test_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    paths = write_split(tmp_path)
    tf = TrainTransform(crop_size=(5, 5), scale_range=(0.5, 3.0), hflip_prob=0.5)
    a = _dataset(paths, transform=tf, seed=3)
    views = {}
    for epoch in range(6):
        a.set_epoch(epoch)
        views[epoch] = a[0]
    b = _dataset(paths, transform=tf, seed=3)  # a "resumed" run
    b.set_epoch(4)
    again = b[0]
    assert np.array_equal(again["transform"], views[4]["transform"])
    assert torch.equal(again["image"], views[4]["image"])
    assert torch.equal(again["masks"], views[4]["masks"])
    distinct = {views[e]["transform"].tobytes() for e in views}
    assert len(distinct) > 1
    c = _dataset(paths, transform=tf, seed=4)
    c.set_epoch(4)
    assert not np.array_equal(c.generator(0).initial_seed(), b.generator(0).initial_seed())
