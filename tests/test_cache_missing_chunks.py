"""A chunk file deleted from a finished cache is detected: cache-verify names image and array, the
reader refuses the image (no silent zeros, no ZeroDivisionError)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.cache.inspect import verify_cache
from pipeline.cache.reader import TeacherCache
from pipeline.cache.runner import build_cache
from pipeline.cache.store import CacheIntegrityError
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.synthetic import generate_synthetic_coco_panoptic

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunks")
    generate_synthetic_coco_panoptic(
        root / "data", num_train=4, num_val=1, image_size=(64, 96), progress=False
    )
    cfg = load_config(
        BASE,
        [
            f"data.root={root / 'data'}",
            f"cache.root={root / 'cache'}",
            "data.synthetic.num_train=4",
            "data.synthetic.num_val=1",
            "data.synthetic.image_size=[64, 96]",
            "cache.channels=16",
        ],
    )
    return build_cache(cfg, n_workers=1, progress=False)


@pytest.fixture()
def cache(built, tmp_path) -> Path:
    copy = tmp_path / built.name  # the folder name carries the fingerprint digest
    shutil.copytree(built, copy)
    return copy


def delete_chunk(cache: Path, array: str, index: int | None) -> None:
    """Remove the chunk file(s) of image ``index`` (or every chunk, for ``None``) of ``array``."""
    base = cache / "data.zarr" / array / "c"
    target = base if index is None else base / str(index)
    assert target.exists(), target
    shutil.rmtree(target) if target.is_dir() else target.unlink()


PER_IMAGE = [
    "features/neck/values",
    "features/block1/values",
    "segments/mask_logits/values",
    "segments/embeddings",
    "images/orig_size",
    "segments/iou",
    "segments/segment_ids",
]


def test_healthy_cache_verifies_ok(cache):
    assert verify_cache(cache, progress=False) == []


@pytest.mark.parametrize("array", PER_IMAGE)
def test_missing_image_chunk_is_reported_and_refused(cache, array, capsys):
    reader = TeacherCache(cache)
    image_id = reader.image_ids[1]
    delete_chunk(cache, array, 1)
    problems = verify_cache(cache, progress=False)
    assert problems == [f"image {image_id!r} (index 1): chunk of {array} is missing"]
    assert main(["cache-verify", str(cache)]) == 1
    assert array in capsys.readouterr().out
    with pytest.raises(CacheIntegrityError) as info:
        TeacherCache(cache).get(image_id)
    text = str(info.value)
    assert str(cache) in text and repr(image_id) in text and array in text
    TeacherCache(cache).get(reader.image_ids[0])  # other images still read


def test_every_missing_array_of_an_image_is_listed(cache):
    image_id = TeacherCache(cache).image_ids[2]
    for array in ("features/neck/values", "images/orig_size"):
        delete_chunk(cache, array, 2)
    problems = verify_cache(cache, progress=False)
    assert problems == [
        f"image {image_id!r} (index 2): chunk of {a} is missing"
        for a in ("features/neck/values", "images/orig_size")
    ]


def test_missing_prototypes_are_reported_and_refused(cache):
    delete_chunk(cache, "prototypes/embeddings", None)
    problems = verify_cache(cache, progress=False)
    assert len(problems) == 1 and "prototypes/embeddings" in problems[0]
    reader = TeacherCache(cache)
    with pytest.raises(CacheIntegrityError, match=r"prototypes/embeddings has no data"):
        reader.get(reader.image_ids[0])


def test_missing_pca_chunk_is_reported(cache):
    delete_chunk(cache, "pca/neck/components", None)
    problems = verify_cache(cache, progress=False)
    assert any("pca/neck/components" in p for p in problems), problems


def test_chunks_equal_to_the_fill_value_are_written(tmp_path):
    """An image whose IoUs and embeddings are all zero (the fill value) still gets chunk files, so
    "no chunk" always means "deleted"."""
    import numpy as np

    from pipeline.cache.store import CacheLayout, CacheStore, ImageRecord

    layout = CacheLayout(
        image_ids=["1", "2"],
        level_names=["neck"],
        teacher_channels=[4],
        level_channels=[4],
        grid_sizes=[(2, 2)],
        input_size=32,
        mask_size=8,
        max_segments=2,
        embed_dim=256,
        dtype="float16",
        compressor="zstd",
        clevel=1,
        categories=[{"id": 1, "name": "a", "isthing": True, "train_id": 0}],
    )
    store = CacheStore.create_or_open(tmp_path / "c", {"schema_version": 2}, layout)
    store.write_image(
        0,
        ImageRecord(
            features=[np.zeros((4, 2, 2), np.float32)],
            mask_logits=np.zeros((1, 8, 8), np.float32),
            iou=np.zeros(1, np.float32),
            embeddings=np.zeros((1, 256), np.float32),
            segment_ids=np.array([5]),
            labels=np.array([0]),
            orig_size=(20, 30),
        ),
    )
    reopened = CacheStore.open(tmp_path / "c")
    assert reopened.missing_chunks(0) == []
    assert reopened.missing_chunks(1) == reopened.image_array_names()  # never written
    assert reopened.read_image(0)["iou"].tolist() == [0.0]
