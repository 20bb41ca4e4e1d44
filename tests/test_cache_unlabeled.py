"""The unlabelled teacher cache: fingerprint of the image list, reuse, identity for 1 and 2 dask
workers, resumption after a crash, counted skips, pseudo-labels from the train prototypes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.fingerprint import cache_dir, teacher_fingerprint
from pipeline.cache.reader import TeacherCache
from pipeline.cache.runner import build_cache
from pipeline.cache.store import STATUS_DONE, STATUS_TODO, CacheStore
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic
from tests.cache_helpers import store_contents

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base.yaml"


def overrides(root: Path, cache_root: Path, *extra: str) -> list[str]:
    return [
        f"data.root={root}",
        f"cache.root={cache_root}",
        "data.synthetic.num_train=6",
        "data.synthetic.num_val=1",
        "data.synthetic.num_tune=0",
        "data.synthetic.num_unlabeled=3",
        "data.synthetic.image_size=[64, 64]",
        "teacher.tiny={img_size: 64, embed_dim: 32, depth: 4, num_heads: 2, "
        "global_attn_indexes: [1, 3], window_size: 4}",
        "cache.pca_samples=4",
        "cache.channels=16",
        "cache.mask_size=16",
        "cache.max_segments=8",
        # a random teacher: thresholds that keep segments (SAM's defaults keep none)
        "teacher.automatic={points_per_side: 4, points_per_batch: 16, pred_iou_thresh: 0.0, "
        "stability_score_thresh: 0.0, stability_score_offset: 1.0, box_nms_thresh: 0.99}",
        "data.unlabeled=[unlabeled, extra]",
        "data.labeled_fraction=0.5",
        *extra,
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A dataset with a synthetic unlabelled split and an `extra` folder (one CMYK image, one
    corrupt file), its train cache and its unlabelled cache (1 worker)."""
    tmp = tmp_path_factory.mktemp("unlabeled_cache")
    root = tmp / "data"
    generate_synthetic_coco_panoptic(
        root, num_train=6, num_val=1, image_size=(64, 64), progress=False, num_unlabeled=3
    )
    extra = root / "extra"
    extra.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(extra / "a_cmyk.jpg")
    (extra / "b_corrupt.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    cfg = load_config(BASE, overrides(root, tmp / "cache"))
    build_cache(cfg, "train", n_workers=1, progress=False)
    path = build_cache(cfg, "unlabeled", n_workers=1, progress=False)
    return tmp, root, cfg, path


def test_contents_pseudo_labels_and_counted_skip(built):
    _, _, cfg, path = built
    summary = json.loads((path / "COMPLETE.json").read_text())
    # 3 held-out train images + 3 synthetic unlabelled + the 2 files of `extra`
    assert summary["num_images"] == 8 and summary["done"] == 7
    assert summary["skip_reasons"] == {"corrupt_image": 1}
    cache = TeacherCache.for_config(cfg, "unlabeled")
    train = TeacherCache.for_config(cfg, "train")
    assert cache.image_ids[-2:] == ["extra/a_cmyk.jpg", "extra/b_corrupt.jpg"]
    assert "extra/b_corrupt.jpg" not in cache
    e = cache.get("extra/a_cmyk.jpg")
    m = e["segment_ids"].numel()
    assert 0 < m <= 8 and e["segment_ids"].tolist() == list(range(1, m + 1))
    assert e["orig_size"] == (40, 56) and e["mask_logits"].shape == (m, 16, 16)
    # soft labels from the train cache's prototypes; labels = their argmax
    assert np.array_equal(cache.prototypes.numpy(), train.prototypes.numpy())
    assert e["labels"].tolist() == e["cls_logits"].argmax(1).tolist()
    conf = e["iou"] * e["stability"] * e["cls_logits"].softmax(1).max(1).values
    assert np.allclose(e["confidence"].numpy(), conf.numpy(), atol=1e-6)
    # the same PCA basis as the train cache: the adapters see one feature space
    assert CacheStore.open(path).manifest["pca"] == CacheStore.open(train.path).manifest["pca"]


def test_unlabelled_list_enters_the_fingerprint_and_an_unchanged_one_is_reused(built):
    tmp, root, cfg, path = built
    again = load_config(BASE, overrides(root, tmp / "cache"))
    assert cache_dir(again, "unlabeled") == path
    before = (path / "COMPLETE.json").stat().st_mtime_ns
    assert build_cache(again, "unlabeled", n_workers=1, progress=False) == path
    assert (path / "COMPLETE.json").stat().st_mtime_ns == before  # reused, nothing recomputed

    fewer = load_config(BASE, overrides(root, tmp / "cache", "data.unlabeled=[unlabeled]"))
    assert cache_dir(fewer, "unlabeled") != path
    # the labelled train cache does not depend on the unlabelled images
    assert cache_dir(fewer, "train") == cache_dir(cfg, "train")
    other_fraction = load_config(BASE, overrides(root, tmp / "cache", "data.labeled_fraction=0.75"))
    assert cache_dir(other_fraction, "unlabeled") != path
    assert cache_dir(other_fraction, "train") != cache_dir(cfg, "train")  # prototypes differ
    stricter = load_config(
        BASE, overrides(root, tmp / "cache", "teacher.automatic.pred_iou_thresh=0.5")
    )
    assert cache_dir(stricter, "unlabeled") != path

    # a file added to, or changed in, a folder source changes the fingerprint
    fp = teacher_fingerprint(cfg, "unlabeled")
    extra = root / "extra"
    shutil.copy(extra / "a_cmyk.jpg", extra / "c_copy.jpg")
    try:
        added = teacher_fingerprint(cfg, "unlabeled")
        assert added != fp
        (extra / "c_copy.jpg").write_bytes((extra / "c_copy.jpg").read_bytes() + b"\0")
        assert teacher_fingerprint(cfg, "unlabeled") not in (fp, added)
    finally:
        (extra / "c_copy.jpg").unlink()
    assert teacher_fingerprint(cfg, "unlabeled") == fp


def copy_train_cache(built, dest: Path) -> Path:
    _, _, cfg, _ = built
    train = cache_dir(cfg, "train")
    shutil.copytree(train, dest / train.name)
    return dest


def test_two_workers_write_the_same_store(built, tmp_path):
    tmp, root, _, path = built
    cfg2 = load_config(BASE, overrides(root, copy_train_cache(built, tmp_path / "c2")))
    path2 = build_cache(cfg2, "unlabeled", n_workers=2, progress=False)
    assert path2.name == path.name
    a, b = store_contents(path), store_contents(path2)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


def test_resume_after_a_crash_equals_an_uninterrupted_run(built, tmp_path):
    tmp, root, _, path = built
    cache_root = copy_train_cache(built, tmp_path / "c3")
    crashed = cache_root / path.name
    shutil.copytree(path, crashed)
    # the state a kill leaves: no COMPLETE.json, the last images todo, a half-written chunk
    (crashed / "COMPLETE.json").unlink()
    store = CacheStore(crashed, writable=True)
    status = store.array("status")
    for i in (4, 5, 6, 7):
        status[i] = STATUS_TODO
    (crashed / "skips" / "00000007.json").unlink()
    (crashed / "data.zarr" / "segments" / "iou" / "c").mkdir(parents=True, exist_ok=True)
    (crashed / "data.zarr" / "segments" / "iou" / "c" / "junk.partial").write_bytes(b"x")
    cfg3 = load_config(BASE, overrides(root, cache_root))
    assert build_cache(cfg3, "unlabeled", n_workers=1, progress=False) == crashed
    summary = json.loads((crashed / "COMPLETE.json").read_text())
    assert summary["images_this_run"] == 4 and summary["done"] == 7
    assert int((CacheStore.open(crashed).status() == STATUS_DONE).sum()) == 7
    a, b = store_contents(path), store_contents(crashed)
    assert [k for k in a if a[k] != b.get(k)] == [] and sorted(a) == sorted(b)
    assert not list(crashed.rglob("*.partial"))


def test_needs_the_train_cache_first(built, tmp_path):
    _, root, _, _ = built
    cfg = load_config(BASE, overrides(root, tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="cache_teacher"):
        build_cache(cfg, "unlabeled", n_workers=1, progress=False)
