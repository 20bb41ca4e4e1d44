"""The on-disk cache layout (pipeline.cache.store), without the teacher or dask."""

import errno
import json
import pickle

import numpy as np
import pytest

from pipeline.cache.store import (
    STATUS_DONE,
    STATUS_SKIPPED,
    STATUS_TODO,
    CacheLayout,
    CacheStore,
    CacheWriteError,
    ImageRecord,
    translate_os_errors,
)

FP = {"schema_version": 1, "layers": [1, "neck"]}


def _layout(dtype="float16", max_segments=3):
    return CacheLayout(
        image_ids=["10", "11", "12"],
        level_names=["block1", "neck"],
        teacher_channels=[4, 16],
        level_channels=[4, 6],
        grid_sizes=[(5, 5), (5, 5)],
        input_size=80,
        mask_size=8,
        max_segments=max_segments,
        embed_dim=256,
        dtype=dtype,
        compressor="zstd",
        clevel=3,
        categories=[
            {"id": 1, "name": "a", "isthing": True, "train_id": 0},
            {"id": 9, "name": "b", "isthing": False, "train_id": 1},
        ],
    )


def _record(rng, m=2):
    return ImageRecord(
        features=[
            rng.normal(size=(4, 5, 5)).astype(np.float32),
            rng.normal(size=(6, 5, 5)).astype(np.float32) * 20,
        ],
        mask_logits=rng.normal(size=(m, 8, 8)).astype(np.float32) * 5,
        iou=rng.uniform(size=m).astype(np.float32),
        embeddings=rng.normal(size=(m, 256)).astype(np.float32),
        segment_ids=np.arange(100, 100 + m, dtype=np.int64),
        labels=np.arange(m, dtype=np.int64) % 2,
        orig_size=(40, 80),
    )


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_write_read_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    store = CacheStore.create_or_open(tmp_path / "c", FP, _layout(dtype), annotation_sha256="ab")
    rec = _record(rng)
    assert (store.status() == STATUS_TODO).all()
    store.write_image(1, rec)
    np.testing.assert_array_equal(store.status(), [STATUS_TODO, STATUS_DONE, STATUS_TODO])

    back = CacheStore.open(tmp_path / "c").read_image(1)
    for got, want in zip(back["features"], rec.features):
        assert got.dtype == np.float32 and got.shape == want.shape
        if dtype == "int8":  # half a quantisation step per channel
            step = (np.ptp(want.reshape(len(want), -1), axis=1) / 255)[:, None, None]
            assert (np.abs(got - want) <= step / 2 + 1e-5).all()
        else:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
    assert back["mask_logits"].shape == (2, 8, 8)
    if dtype == "int8":  # per segment: half a step of that segment's range
        half = (np.ptp(rec.mask_logits.reshape(2, -1), axis=1) / 255 / 2)[:, None, None]
        assert (np.abs(back["mask_logits"] - rec.mask_logits) <= half + 1e-5).all()
    else:
        np.testing.assert_array_equal(
            back["mask_logits"], rec.mask_logits.astype(np.float16).astype(np.float32)
        )
    np.testing.assert_array_equal(back["segment_ids"], rec.segment_ids)
    np.testing.assert_array_equal(back["labels"], rec.labels)
    np.testing.assert_array_equal(back["iou"], rec.iou)  # float32, exact
    np.testing.assert_array_equal(back["embeddings"], rec.embeddings)
    assert back["orig_size"] == (40, 80)
    # padding of the per-segment arrays
    raw = store.array("segments/segment_ids")[1]
    np.testing.assert_array_equal(raw, [100, 101, -1])


def test_too_many_segments_names_the_image(tmp_path):
    store = CacheStore.create_or_open(tmp_path / "c", FP, _layout(max_segments=3))
    with pytest.raises(ValueError, match=r"image '12' \(index 2\) has 4 segments.*max_segments=3"):
        store.write_image(2, _record(np.random.default_rng(0), m=4))
    assert store.status_of(2) == STATUS_TODO


def test_non_finite_teacher_output_is_refused_not_stored(tmp_path):
    store = CacheStore.create_or_open(tmp_path / "c", FP, _layout())
    rec = _record(np.random.default_rng(0))
    rec.features[1][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"image '10' level neck: .*NaN"):
        store.write_image(0, rec)
    assert store.status_of(0) == STATUS_TODO


def test_skip_is_recorded_with_reason(tmp_path):
    store = CacheStore.create_or_open(tmp_path / "c", FP, _layout())
    store.write_skip(0, "no_segments", "x.png: no non-crowd segment", file_name="x.jpg")
    assert store.status_of(0) == STATUS_SKIPPED
    info = json.loads((tmp_path / "c" / "skips" / "00000000.json").read_text())
    assert info == {
        "index": 0,
        "image_id": "10",
        "reason": "no_segments",
        "message": "x.png: no non-crowd segment",
        "file_name": "x.jpg",
    }


def test_unwritable_location_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker / "cache" / "sam_tiny-train-0123"
    with pytest.raises(CacheWriteError, match=rf"{target}.*(not writable|is a file)"):
        CacheStore.create_or_open(target, FP, _layout())


def test_full_disk_error_names_the_path(tmp_path):
    with pytest.raises(CacheWriteError, match=r"/some/cache: no space left on the device"):
        with translate_os_errors("/some/cache", "cannot write to"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CacheWriteError, match=r"/ro: not writable"):
        with translate_os_errors("/ro", "cannot write to"):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_reopen_checks_layout_and_removes_partial_chunks(tmp_path):
    CacheStore.create_or_open(tmp_path / "c", FP, _layout())
    stray = tmp_path / "c" / "data.zarr" / "status" / "c" / "0.3f2a.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"torn")
    CacheStore.create_or_open(tmp_path / "c", FP, _layout())
    assert not stray.exists()
    with pytest.raises(ValueError, match="layout differs"):
        CacheStore.create_or_open(tmp_path / "c", FP, _layout(dtype="int8"))


def test_store_pickles_without_its_zarr_handles(tmp_path):
    store = CacheStore.create_or_open(tmp_path / "c", FP, _layout())
    store.status()  # opens the group
    clone = pickle.loads(pickle.dumps(store))
    assert clone._group is None and clone._arrays == {}
    np.testing.assert_array_equal(clone.status(), store.status())


def test_chunks_use_numcodecs_blosc_declared_as_the_v3_blosc_codec(monkeypatch):
    import numcodecs.blosc

    from pipeline.cache import store as store_module

    codec = store_module.blosc_codec("zstd", 5)
    assert (codec.to_dict()["name"], codec.cname.value, codec.clevel) == ("blosc", "zstd", 5)
    # a compressor missing from the installed Blosc stops before any image is computed
    monkeypatch.setattr(numcodecs.blosc, "list_compressors", lambda: ["lz4", "zlib"])
    with pytest.raises(ValueError, match=r"cache.compressor='zstd' is not built into this Blosc"):
        store_module.blosc_codec("zstd", 5)
