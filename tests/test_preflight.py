"""Missing inputs: one paragraph per problem naming the key, the path and what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.preflight import (
    MissingInputError,
    check_backbone_weights,
    check_cityscapes_root,
    check_split,
    check_teacher_checkpoint,
    check_unlabeled,
    require,
    workflow_checks,
)

ROOT = Path(__file__).resolve().parents[1]


def coco(tmp_path: Path, *overrides: str):
    return load_config(
        ROOT / "configs/coco/regnet_distill.yaml",
        [
            f"data.root={tmp_path / 'coco'}",
            f"teacher.checkpoint={tmp_path / 'sam_vit_h_4b8939.pth'}",
            f"model.backbone.pretrained_path={tmp_path / 'regnetx_016.pth'}",
            *overrides,
        ],
    )


def test_missing_teacher_checkpoint_names_key_path_and_download(tmp_path):
    msg = check_teacher_checkpoint(coco(tmp_path))
    assert msg.startswith(
        f"teacher.checkpoint = {tmp_path / 'sam_vit_h_4b8939.pth'}: file not found (vit_h teacher)."
    )
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg
    vit_b = check_teacher_checkpoint(coco(tmp_path, "teacher.type=vit_b"))
    assert "sam_vit_b_01ec64.pth" in vit_b
    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(b"x")
    assert check_teacher_checkpoint(coco(tmp_path)) is None
    assert check_teacher_checkpoint(coco(tmp_path, "teacher.checkpoint=null")) is None


def test_missing_backbone_weights_say_how_to_save_timm_weights(tmp_path):
    msg = check_backbone_weights(coco(tmp_path))
    assert msg.startswith(
        f"model.backbone.pretrained_path = {tmp_path / 'regnetx_016.pth'}: file not found."
    )
    assert "timm.create_model('regnetx_016', pretrained=True).state_dict()" in msg
    assert "pretrained_path: null" in msg


def test_missing_coco_folders_are_listed_by_key(tmp_path):
    cfg = coco(tmp_path)
    assert check_split(cfg, "train", "val").startswith(
        f"data.root = {tmp_path / 'coco'} does not exist. COCO panoptic 2017 needs"
    )
    (tmp_path / "coco" / "train2017").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "panoptic_train2017").mkdir(parents=True)
    msg = check_split(cfg, "train")
    assert msg.startswith(
        f"data.root = {tmp_path / 'coco'} lacks data.train.json = "
        "annotations/panoptic_train2017.json. COCO panoptic 2017 needs"
    )
    (tmp_path / "coco" / "annotations" / "panoptic_train2017.json").write_text("{}")
    assert check_split(cfg, "train") is None
    assert "data.val.images = val2017, data.val.json" in check_split(cfg, "train", "val")


def test_synthetic_data_is_never_missing(tmp_path):
    cfg = load_config(
        ROOT / "configs/reg_sam/regnet_distill.yaml", [f"data.root={tmp_path / 'nowhere'}"]
    )
    assert check_split(cfg, "train", "val") is None
    assert [m for m in workflow_checks(cfg, [cfg]) if m] == []


def test_cityscapes_needs_the_official_tree(tmp_path):
    cfg = load_config(
        ROOT / "configs/cityscapes/regnet_distill.yaml",
        [f"data.cityscapes_root={tmp_path}", f"data.root={tmp_path}"],
    )
    msg = check_cityscapes_root(cfg)
    assert msg.startswith(f"data.cityscapes_root = {tmp_path}: missing gtFine/, leftImg8bit/.")
    assert "convert_cityscapes" in msg
    assert "run `snakemake convert_cityscapes`" in check_split(cfg, "train")
    (tmp_path / "gtFine").mkdir()
    (tmp_path / "leftImg8bit").mkdir()
    assert check_cityscapes_root(cfg) is None


def test_require_joins_paragraphs_once(tmp_path):
    cfg = coco(tmp_path)
    with pytest.raises(MissingInputError) as info:
        require(workflow_checks(cfg, [cfg, cfg]))
    paragraphs = str(info.value).split("\n\n")
    assert [p.split(" = ")[0] for p in paragraphs] == [
        "teacher.checkpoint",
        "data.root",
        "model.backbone.pretrained_path",
    ]
    require([None, None])  # nothing missing: no error


def test_missing_unlabelled_sources_are_named_by_key_before_any_job(tmp_path):
    unlabeled = (
        "data.unlabeled=[{images: unlabeled2017, image_list: "
        "annotations/image_info_unlabeled2017.json}, extra]"
    )
    cfg = coco(tmp_path, unlabeled)
    root = tmp_path / "coco"
    msg = check_unlabeled(cfg)
    assert msg.startswith(f"unlabelled images not found under data.root = {root}: ")
    assert (
        f"data.unlabeled[0].images = unlabeled2017 (folder {root / 'unlabeled2017'}); "
        "data.unlabeled[0].image_list = annotations/image_info_unlabeled2017.json (file "
        f"{root / 'annotations/image_info_unlabeled2017.json'}); "
        f"data.unlabeled[1].images = extra (folder {root / 'extra'})." in msg
    )
    # the workflow's preflight carries the same paragraph, once, after the dataset's
    with pytest.raises(MissingInputError) as info:
        require(workflow_checks(cfg, [cfg]))
    assert [p.split(" = ")[0] for p in str(info.value).split("\n\n")] == [
        "teacher.checkpoint",
        "data.root",
        "unlabelled images not found under data.root",
        "model.backbone.pretrained_path",
    ]
    (root / "unlabeled2017").mkdir(parents=True)
    (root / "extra").mkdir()
    assert "data.unlabeled[0].image_list" in check_unlabeled(cfg)
    assert "data.unlabeled[0].images" not in check_unlabeled(cfg)
    (root / "annotations").mkdir()
    (root / "annotations" / "image_info_unlabeled2017.json").write_text("{}")
    assert check_unlabeled(cfg) is None
    assert check_unlabeled(coco(tmp_path)) is None  # no unlabelled sources: nothing to check
    # the synthetic unlabelled folder is written by the synthetic_data rule
    synthetic = load_config(ROOT / "configs/reg_sam/label_scarce.yaml", [f"data.root={tmp_path}"])
    assert check_unlabeled(synthetic) is None
