"""check-config refuses, before any work, values that would fail later or silently.

Each case writes a config file, runs ``python -m pipeline check-config`` in-process and expects
exit code 2 with a message naming the key, the file and the allowed range (or the missing file).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def check(tmp_path: Path, body: str, capsys) -> tuple[int, str]:
    path = tmp_path / "exp.yaml"
    path.write_text(f"_base_: {ROOT / 'configs/reg_sam/regnet_distill.yaml'}\n{body}")
    code = main(["check-config", "--config", str(path)])
    out = capsys.readouterr()
    return code, out.err + out.out


@pytest.mark.parametrize(
    "body,key,hint",
    [
        ("training: {lr: .inf}", "training.lr", "finite"),
        ("training: {lr: .nan}", "training.lr", "finite"),
        ("model: {loss: {cls_weight: 1.0e+39}}", "model.loss.cls_weight", "3.4e+38"),
        ("model: {loss: {dice_weight: .inf}}", "model.loss.dice_weight", "finite"),
        (
            "model: {sam_distill: {feat_distill_weight: .inf}}",
            "model.sam_distill.feat_distill_weight",
            "finite",
        ),
        ("teacher: {layers: [1, 9, neck]}", "teacher.layers", "[0, 8)"),
        ("teacher: {type: vit_b, layers: [2, 12]}", "teacher.layers", "[0, 12)"),
        (
            "model: {sam_distill: {distill_feat_layers: [0, 1, 2, 3, 4]}}",
            "model.sam_distill.distill_feat_layers",
            "[0, 4)",
        ),
        (
            "teacher: {layers: [3, neck]}\nmodel: {sam_distill: {distill_feat_layers: [0, 2]}}",
            "model.sam_distill.distill_feat_layers",
            "[0, 2)",
        ),
    ],
)
def test_out_of_range_values_are_refused(tmp_path, capsys, body, key, hint):
    code, text = check(tmp_path, body, capsys)
    assert code == 2, text
    assert key.rsplit(".", 1)[-1] in text and hint in text and "exp.yaml" in text, text


@pytest.mark.parametrize(
    "key,yaml_key",
    [
        ("teacher.checkpoint", "teacher: {checkpoint: %s}"),
        ("model.backbone.pretrained_path", "model: {backbone: {pretrained_path: %s}}"),
        ("training.init_from", "training: {init_from: %s}"),
        ("data.root", "data: {dataset: coco_panoptic, root: %s}"),
    ],
)
def test_missing_input_files_are_refused_up_front(tmp_path, capsys, key, yaml_key):
    missing = tmp_path / "nowhere" / "file.pth"
    code, text = check(tmp_path, yaml_key % missing, capsys)
    assert code == 2, text
    assert key in text and str(missing) in text and "no such file" in text


def test_train_refuses_a_missing_init_from_before_building_anything(tmp_path, capsys):
    missing = tmp_path / "stage0" / "final.pth"
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"_base_: {ROOT / 'configs/reg_sam/baseline.yaml'}\n"
        f"data: {{root: {tmp_path}}}\ntraining: {{init_from: {missing}}}\n"
    )
    code = main(["train", "--config", str(path), "--work-dir", str(tmp_path / "run")])
    assert code == 2 and "training.init_from" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["", "\n\n", "---\n", "# only a comment\n"])
def test_empty_yaml_file_is_refused(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    code = main(["check-config", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and str(path) in err and "empty" in err


def test_shipped_synthetic_config_passes(capsys):
    assert (
        main(["check-config", "--config", str(ROOT / "configs/reg_sam/regnet_distill.yaml")]) == 0
    )
