"""Stage one end to end on a tiny synthetic split: build_cache on dask, TeacherCache, LiveTeacher,
inspect/verify. One 1-worker build is shared by the module; a 2-worker build must equal it."""

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch.utils.data import DataLoader, Dataset

from pipeline.cache.fingerprint import FingerprintMismatchError, cache_dir, teacher_fingerprint
from pipeline.cache.inspect import inspect_cache, verify_cache
from pipeline.cache.live import LiveTeacher
from pipeline.cache.reader import TeacherCache
from pipeline.cache.runner import build_cache
from pipeline.cache.store import CacheWriteError
from pipeline.config import load_config
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from tests.cache_helpers import store_contents

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
NO_SEGMENTS, MISSING_IMAGE = 2, 4  # dataset indices broken on purpose


def make_config(data_root, cache_root, *extra):
    return load_config(
        BASE,
        [
            f"data.root={data_root}",
            f"cache.root={cache_root}",
            "data.synthetic.num_train=6",
            "data.synthetic.num_val=1",
            "data.synthetic.image_size=[96, 128]",
            *extra,
        ],
    )


def make_split(root):
    """6 synthetic 96x128 images; index 2 gets an all-void PNG, index 4 loses its image file."""
    paths = generate_synthetic_coco_panoptic(
        root, num_train=6, num_val=1, image_size=(96, 128), progress=False
    )
    image_dir, json_path, png_dir = paths["train"]
    doc = json.loads(json_path.read_text())
    from PIL import Image

    png = png_dir / doc["annotations"][NO_SEGMENTS]["file_name"]
    Image.fromarray(np.zeros((96, 128, 3), np.uint8)).save(png)
    (image_dir / doc["images"][MISSING_IMAGE]["file_name"]).unlink()
    return paths["train"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    make_split(root / "data")
    cfg = make_config(root / "data", root / "cache1")
    path = build_cache(cfg, n_workers=1, progress=False)
    return cfg, path, root


def test_builds_complete_cache_with_recorded_skips(built):
    cfg, path, _ = built
    assert path == cache_dir(cfg, "train")
    summary = json.loads((path / "COMPLETE.json").read_text())
    assert (summary["num_images"], summary["done"], summary["skipped"]) == (6, 4, 2)
    assert summary["skip_reasons"] == {"no_segments": 1, "missing_image": 1}
    assert summary["skipped_indices"] == [NO_SEGMENTS, MISSING_IMAGE]

    status = zarr.open_group(str(path / "data.zarr"), mode="r")["status"][:]
    np.testing.assert_array_equal(status, [1, 1, 2, 1, 2, 1])
    reason = json.loads((path / "skips" / f"{NO_SEGMENTS:08d}.json").read_text())
    assert reason["reason"] == "no_segments" and reason["file_name"].endswith(".jpg")

    cache = TeacherCache(path)
    ids = cache.image_ids
    assert ids[NO_SEGMENTS] not in cache and ids[0] in cache
    assert cache.status(ids[MISSING_IMAGE]) == "skipped" and cache.status(ids[0]) == "done"
    with pytest.raises(KeyError, match="skipped.*missing_image"):
        cache.get(ids[MISSING_IMAGE])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["fingerprint"] == teacher_fingerprint(cfg, "train")
    assert len(manifest["pca"]["sha256"]) == 64

    # a rerun of a complete cache does nothing
    before = (path / "COMPLETE.json").stat().st_mtime_ns
    assert build_cache(cfg, n_workers=1, progress=False) == path
    assert (path / "COMPLETE.json").stat().st_mtime_ns == before


def test_get_returns_the_documented_dict(built):
    cfg, path, root = built
    cache = TeacherCache.for_config(cfg, "train")
    image_id = cache.image_ids[0]
    item = cache.get(image_id)
    dataset = PanopticDataset(*cfg.split_paths("train"))
    sample = dataset.load_original(0)
    S = cfg.teacher.tiny.img_size
    g = S // 16
    assert item["input_size"] == S and item["orig_size"] == (96, 128)
    assert item["scale"] == pytest.approx(S / 128)
    assert item["level_names"] == cache.level_names and len(item["level_names"]) >= 2
    assert [f.shape for f in item["features"]] == [(c, g, g) for c in cache.level_channels]
    assert all(f.dtype == torch.float32 for f in item["features"])
    m = len(sample["segment_ids"])
    torch.testing.assert_close(item["segment_ids"], sample["segment_ids"])
    torch.testing.assert_close(item["labels"], sample["labels"])
    assert item["mask_logits"].shape == (m, cfg.cache.mask_size, cfg.cache.mask_size)
    assert item["iou"].shape == (m,) and item["embeddings"].shape == (m, 256)
    assert item["cls_logits"].shape == (m, cache.num_classes) == (m, len(dataset.categories))
    assert item["cls_logits"].abs().max() <= cfg.cache.prototype_scale + 1e-4
    # cls_logits = scale * cosine(embedding, prototype)
    emb = torch.nn.functional.normalize(item["embeddings"], dim=1)
    torch.testing.assert_close(
        item["cls_logits"], cfg.cache.prototype_scale * emb @ cache.prototypes.T
    )
    # keep_float16: the float16 store's maps as stored, equal to the float32 ones after a cast
    assert cfg.cache.dtype == "float16"
    half = cache.get(image_id, keep_float16=True)
    for f16, f32 in zip(
        half["features"] + [half["mask_logits"]], item["features"] + [item["mask_logits"]]
    ):
        assert f16.dtype == torch.float16
        assert torch.equal(f16.float(), f32)
    assert torch.equal(half["cls_logits"], item["cls_logits"])


def test_cached_targets_match_the_live_teacher(built):
    cfg, path, _ = built
    cache = TeacherCache(path)
    live = LiveTeacher(cfg, path, device="cpu")
    dataset = PanopticDataset(*cfg.split_paths("train"))
    for index in (0, 5):
        sample = dataset.load_original(index)
        want, got = live(sample), cache.get(sample["image_id"])
        assert want["level_names"] == got["level_names"]
        for w, g in zip(want["features"], got["features"]):  # float16 storage
            torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got["mask_logits"], want["mask_logits"], rtol=2e-3, atol=1e-2)
        torch.testing.assert_close(got["segment_ids"], want["segment_ids"])
        torch.testing.assert_close(got["iou"], want["iou"])  # stored as float32
        torch.testing.assert_close(got["cls_logits"], want["cls_logits"])


def test_two_workers_write_the_same_store(built):
    cfg, path, root = built
    cfg2 = make_config(root / "data", root / "cache2")
    path2 = build_cache(cfg2, n_workers=2, progress=False)
    assert path2.name == path.name  # cache.root is not part of the identity
    a, b = store_contents(path), store_contents(path2)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


class _Lookup(Dataset):
    def __init__(self, cache, ids):
        self.cache, self.ids = cache, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = self.cache.get(self.ids[i])
        return item["features"][-1], item["cls_logits"], item["segment_ids"]


def test_reader_in_a_multi_worker_dataloader(built):
    _, path, _ = built
    cache = TeacherCache(path)
    ids = [i for i in cache.image_ids if i in cache]
    expected = [cache.get(i) for i in ids]  # the parent has opened the store before forking
    assert len(pickle.dumps(cache)) < 1000 + len(str(path))  # only the path travels
    loader = DataLoader(_Lookup(cache, ids * 2), batch_size=None, num_workers=2)
    seen = list(loader)
    assert len(seen) == 2 * len(ids)
    for k, (feat, cls, seg) in enumerate(seen):
        want = expected[k % len(ids)]
        assert torch.equal(feat, want["features"][-1]) and torch.equal(cls, want["cls_logits"])
        assert torch.equal(seg, want["segment_ids"])


def test_fingerprint_mismatch_is_refused_on_open(built):
    cfg, path, root = built
    other = teacher_fingerprint(
        make_config(root / "data", root / "cache1", "cache.mask_size=32"), "train"
    )
    with pytest.raises(FingerprintMismatchError, match="mask_size: cache 64, asked 32"):
        TeacherCache(path, expected_fingerprint=other)


def test_inspect_and_verify(built, tmp_path):
    _, path, _ = built
    info = inspect_cache(path)
    assert info["images"] == {"total": 6, "done": 4, "skipped": 2, "todo": 0}
    assert info["complete"] and info["skip_reasons"] == {"no_segments": 1, "missing_image": 1}
    assert 0 < info["bytes_per_image"]["min"] <= info["bytes_per_image"]["mean"] <= 4e6
    cache = TeacherCache(path)
    neck = cache.get(cache.image_ids[0])["features"][-1]
    first = info["levels"]["neck"]
    assert first["min"] <= float(neck.min()) and float(neck.max()) <= first["max"]
    assert 0 < first["pca_explained_variance"] <= 1
    assert verify_cache(path, progress=False) == []
    # calibration of the soft labels, recomputed by hand from the reader's own logits
    cal = info["calibration"]
    logits, labels = [], []
    for image_id in cache.image_ids:
        if cache.status(image_id) == "done":
            entry = cache.get(image_id)
            logits.append(entry["cls_logits"].double())
            labels.append(entry["labels"])
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert cal["segments"] == labels.numel() > 0
    assert cal["prototype_scale"] == cache.prototype_scale
    assert cal["nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert cal["accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    refit = F.cross_entropy(logits / cache.prototype_scale * cal["fitted_scale"], labels).item()
    assert cal["fitted_nll"] == pytest.approx(refit, rel=1e-5) and refit <= cal["nll"] + 1e-9

    broken = tmp_path / path.name
    shutil.copytree(path, broken)
    group = zarr.open_group(str(broken / "data.zarr"), mode="r+")
    values = group["features/neck/values"]
    chunk = values[3]
    chunk[0, 0, 0] = np.nan
    values[3] = chunk
    shutil.rmtree(broken / "data.zarr" / "prototypes")
    (broken / "data.zarr" / "status" / "c" / "5").unlink()  # image 5 back to todo
    problems = verify_cache(broken, progress=False)
    text = "\n".join(problems)
    assert f"image {cache.image_ids[3]!r}: NaN/inf in features/neck" in text
    assert f"1 image(s) incomplete (status todo), e.g. {cache.image_ids[5]!r}" in text
    assert "class prototypes missing" in text
    assert len(problems) == 3


def test_unwritable_cache_root_fails_early_naming_the_path(built, tmp_path):
    _, _, root = built
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache root should be")
    cfg = make_config(root / "data", blocker / "cache")
    with pytest.raises(CacheWriteError, match=rf"{blocker}/cache/sam_tiny-train-"):
        build_cache(cfg, n_workers=1, progress=False)


def test_image_over_the_segment_capacity_is_named_before_any_work(built, tmp_path, monkeypatch):
    _, _, root = built
    cfg = make_config(root / "data", tmp_path / "cache")
    cfg.cache.max_segments = 3
    with pytest.raises(
        ValueError,
        match=r"panoptic_train\.json: \d+ image\(s\) list more non-crowd "
        r"segments than the cache's max_segments=3: image_id '1' ",
    ):
        build_cache(cfg, n_workers=1, progress=False)
    assert not (tmp_path / "cache").exists()


def test_build_cache_leaves_the_callers_environment_alone(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    paths = generate_synthetic_coco_panoptic(
        tmp_path / "data", num_train=2, num_val=1, image_size=(64, 64), progress=False
    )
    assert paths
    cfg = make_config(
        tmp_path / "data",
        tmp_path / "cache",
        "data.synthetic.num_train=2",
        "data.synthetic.image_size=[64, 64]",
        "cache.pca_samples=1",
    )
    build_cache(cfg, n_workers=1, progress=False)
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "MKL_NUM_THREADS" not in os.environ
