"""Identity of a teacher cache (pipeline.cache.fingerprint) and how mismatches are refused."""

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.cache.fingerprint import (
    CACHE_SCHEMA_VERSION,
    FingerprintMismatchError,
    cache_dir,
    describe_differences,
    resolve_layers,
    teacher_fingerprint,
)
from pipeline.cache.reader import CacheNotFoundError, TeacherCache
from pipeline.cache.store import CacheLayout, CacheStore
from pipeline.config import load_config
from pipeline.teacher.sam_builder import build_teacher, default_layers

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"


@pytest.fixture()
def coco_like(tmp_path):
    """A COCO-panoptic config (annotations identified by their sha256) over a tiny JSON."""
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg"}],
        "annotations": [
            {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 5, "category_id": 1}]}
        ],
        "categories": [{"id": 1, "name": "thing", "isthing": 1}],
    }
    (root / "annotations" / "panoptic_train.json").write_text(json.dumps(doc))
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"weights v1")

    def make(*overrides):
        return load_config(
            BASE,
            [
                "data.dataset=coco_panoptic",
                f"data.root={root}",
                f"cache.root={tmp_path / 'cache'}",
                *overrides,
            ],
        )

    return make, root, ckpt


def test_cache_dir_is_root_teacher_split_digest(coco_like):
    make, _, _ = coco_like
    cfg = make()
    path = cache_dir(cfg, "train")
    assert path.parent == Path(cfg.cache.root)
    assert re.fullmatch(r"sam_tiny-train-[0-9a-f]{12}", path.name)
    fp = teacher_fingerprint(cfg, "train")
    assert fp["schema_version"] == CACHE_SCHEMA_VERSION
    assert fp["teacher"]["weights"] == "random-init seed 0"
    assert fp["teacher"]["tiny"]["img_size"] == cfg.teacher.tiny.img_size
    assert fp["preprocessing"]["input_size"] == cfg.teacher.tiny.img_size
    assert len(fp["annotations"]["sha256"]) == 64


def test_default_layers_match_the_built_teacher():
    cfg = load_config(BASE)
    sam = build_teacher("sam_tiny", None, cfg.teacher.tiny)
    assert resolve_layers(cfg.teacher) == default_layers(sam)
    assert resolve_layers(cfg.teacher)[-1] == "neck"
    vit_b = load_config(BASE, ["teacher.type=vit_b"]).teacher
    assert resolve_layers(vit_b) == [2, 5, 8, "neck"]  # official global blocks (2, 5, 8, 11)
    assert resolve_layers(load_config(BASE, ["teacher.layers=[0, 2]"]).teacher) == [0, 2]


def test_fingerprint_follows_checkpoint_layers_and_annotations(coco_like):
    make, root, ckpt = coco_like
    base = cache_dir(make(), "train")
    with_ckpt = cache_dir(make(f"teacher.checkpoint={ckpt}"), "train")
    assert with_ckpt != base
    ckpt.write_bytes(b"weights v2")  # new content, same path
    assert cache_dir(make(f"teacher.checkpoint={ckpt}"), "train") != with_ckpt
    assert cache_dir(make("teacher.layers=[0, neck]"), "train") != base
    assert cache_dir(make("cache.channels=32"), "train") != base
    assert cache_dir(make("cache.dtype=int8"), "train") != base
    assert cache_dir(make("teacher.points_per_stuff=5"), "train") != base
    assert cache_dir(make("teacher.tiny.embed_dim=32"), "train") != base

    ann = root / "annotations" / "panoptic_train.json"
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["segments_info"][0]["id"] = 6
    ann.write_text(json.dumps(doc))
    assert cache_dir(make(), "train") != base


def test_fingerprint_ignores_unrelated_settings(coco_like, tmp_path):
    make, root, _ = coco_like
    base = cache_dir(make(), "train")
    for override in (
        "model.head.num_queries=7",
        "model.use_sam_distill=true",
        "training.lr=0.5",
        "training.max_iters=3",
        "seed=123",
        "experiment=other",
        "output_root=elsewhere",
        "evaluation.num_visualize=0",
        "data.crop_size=[64, 64]",
        "cache.clevel=9",
        "cache.compressor=lz4",
        "cache.n_workers=3",
        "teacher.device=cpu",
    ):
        assert cache_dir(make(override), "train") == base, override
    # the same annotations under another data.root: same content, same cache
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert cache_dir(make(f"data.root={moved}"), "train").name == base.name


def test_synthetic_annotations_are_identified_by_generator_parameters(tmp_path):
    # the synthetic JSON does not exist at Snakemake's DAG time; its parameters stand for it
    cfg = load_config(BASE, [f"data.root={tmp_path / 'nowhere'}"])
    fp = teacher_fingerprint(cfg, "train")
    assert fp["annotations"]["synthetic"]["num_train"] == cfg.data.synthetic.num_train
    other = load_config(BASE, [f"data.root={tmp_path / 'nowhere'}", "data.synthetic.seed=9"])
    assert cache_dir(other, "train") != cache_dir(cfg, "train")


def test_missing_annotations_error_names_the_file(coco_like):
    make, root, _ = coco_like
    (root / "annotations" / "panoptic_train.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"panoptic_train\.json"):
        cache_dir(make(), "train")


def test_mismatch_error_lists_the_differing_fields(coco_like):
    make, _, ckpt = coco_like
    stored = teacher_fingerprint(make("teacher.layers=[1, neck]"), "train")
    asked = teacher_fingerprint(
        make("teacher.layers=[0, neck]", f"teacher.checkpoint={ckpt}"), "train"
    )
    diffs = describe_differences(stored, asked)
    assert len(diffs) == 2
    assert diffs[0].startswith("layers: cache [1, 'neck'], asked [0, 'neck']")
    assert diffs[1].startswith("teacher.weights: cache 'random-init seed 0', asked 'sha256:")

    layout = CacheLayout(
        image_ids=["1"],
        level_names=["neck"],
        teacher_channels=[256],
        level_channels=[8],
        grid_sizes=[(2, 2)],
        input_size=32,
        mask_size=8,
        max_segments=4,
        embed_dim=256,
        dtype="float16",
        compressor="zstd",
        clevel=1,
    )
    path = Path(make().cache.root) / "x"
    CacheStore.create_or_open(path, stored, layout)
    with pytest.raises(FingerprintMismatchError) as err:
        CacheStore.create_or_open(path, asked, layout)
    text = str(err.value)
    assert str(path) in text and "layers: cache [1, 'neck'], asked [0, 'neck']" in text
    assert "teacher.weights" in text and "model" not in text.split("\n")[1]


def test_missing_cache_tells_to_run_snakemake(coco_like):
    make, _, _ = coco_like
    with pytest.raises(
        CacheNotFoundError, match=r"missing: .*sam_tiny-train-.*snakemake cache_teacher"
    ):
        TeacherCache.for_config(make(), "train")
    with pytest.raises(CacheNotFoundError, match="snakemake cache_teacher"):
        TeacherCache(Path(make().cache.root) / "nothing-here")
