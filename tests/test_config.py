"""Config loading: inheritance, the design's key names, and errors that name key and file."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def base_line() -> str:
    return f"_base_: {ROOT / 'configs' / 'base.yaml'}\n"


def test_shipped_configs_turn_improvements_on_and_off():
    on = load_config(ROOT / "configs/reg_sam/regnet_distill.yaml")
    off = load_config(ROOT / "configs/reg_sam/baseline.yaml")
    assert (
        on.model.use_learnable_fusion,
        on.model.use_resolution_distill,
        on.model.use_sam_distill,
    ) == (True, True, True)
    assert (
        off.model.use_learnable_fusion,
        off.model.use_resolution_distill,
        off.model.use_sam_distill,
    ) == (False, False, False)
    # shared values come from the one base file
    assert on.data.crop_size == off.data.crop_size
    assert on.model.resolution_distill.fa_subscale == 0.0625
    assert on.model.sam_distill.temperature == 4.0


EXPERIMENT_CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if p.name != "workflow.yaml" and not p.name.startswith("ablation")  # ablation specs
)


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_experiment_config_validates(path):
    load_config(path)


def test_base_chain_and_override_precedence(tmp_path):
    write(tmp_path, "mid.yaml", base_line() + "training: {max_iters: 7, lr: 0.5}\n")
    leaf = write(tmp_path, "leaf.yaml", "_base_: mid.yaml\ntraining: {lr: 0.25}\n")
    cfg = load_config(leaf, ["training.batch_size=3"])
    assert cfg.training.max_iters == 7  # from mid
    assert cfg.training.lr == 0.25  # leaf wins over mid
    assert cfg.training.batch_size == 3  # command line wins over files
    assert cfg.data.crop_size == (160, 160)  # from base


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = write(tmp_path, "bad.yaml", base_line() + "model:\n  use_learnable_fusio: true\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "model.use_learnable_fusio" in msg
    assert str(p.resolve()) in msg
    assert "did you mean 'model.use_learnable_fusion'" in msg


def test_unknown_nested_key_suggests_sibling(tmp_path):
    p = write(
        tmp_path, "bad.yaml", base_line() + "model:\n  resolution_distill: {fa_subscal: 0.5}\n"
    )
    with pytest.raises(ConfigError, match=r"resolution_distill\.fa_subscale"):
        load_config(p)


@pytest.mark.parametrize(
    "text, field, hint",
    [
        (
            "model: {sam_distill: {temperature: 0}}",
            "model.sam_distill.temperature",
            "greater than 0",
        ),
        (
            "model: {sam_distill: {feat_distill_weight: -1}}",
            "model.sam_distill.feat_distill_weight",
            "greater than or equal to 0",
        ),
        (
            "model: {resolution_distill: {fa_subscale: 0.3}}",
            "model.resolution_distill.fa_subscale",
            "1/n",
        ),
        (
            "model: {resolution_distill: {sr_loss_weight: -0.5}}",
            "model.resolution_distill.sr_loss_weight",
            "greater than or equal to 0",
        ),
        ("training: {max_iters: many}", "training.max_iters", "integer"),
        ("data: {scale_range: [2.0, 1.0]}", "data.scale_range", "min <= max"),
        ("model: {backbone: {name: resnet_51}}", "model.backbone.name", "timm model name"),
        ("cache: {dtype: float64}", "cache.dtype", "float16"),
    ],
)
def test_bad_values_name_field_and_range(tmp_path, text, field, hint):
    p = write(tmp_path, "bad.yaml", base_line() + text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert field in msg and hint in msg and str(p.resolve()) in msg


def test_fa_subscale_accepts_inverse_integers(tmp_path):
    for v in (1.0, 0.5, 0.25, 0.125, 0.0625):
        p = write(
            tmp_path,
            "ok.yaml",
            base_line() + f"model: {{resolution_distill: {{fa_subscale: {v}}}}}\n",
        )
        assert load_config(p).model.resolution_distill.fa_subscale == v


def test_teacher_model_must_match_teacher_section(tmp_path):
    p = write(tmp_path, "bad.yaml", base_line() + "model: {sam_distill: {teacher_model: vit_h}}\n")
    with pytest.raises(
        ConfigError, match="teacher_model='vit_h' differs from teacher.type='sam_tiny'"
    ):
        load_config(p)


def test_missing_file_circular_base_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    a = write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(a)
    bad = write(tmp_path, "c.yaml", "model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_errors_name_the_override(tmp_path):
    with pytest.raises(ConfigError, match="command-line override"):
        load_config(ROOT / "configs/base.yaml", ["model.sam_distill.temperature=-2"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(ROOT / "configs/base.yaml", ["training.lr"])


def test_every_head_option_the_builder_reads_is_settable_from_yaml():
    import torch

    from pipeline.models.student import build_student

    cfg = load_config(
        ROOT / "configs/base.yaml", ["model.head.num_mask_fcs=2", "model.head.kernel_size=5"]
    )
    head = build_student(cfg.model, num_classes=3).head
    linears = [m for m in head.modules() if type(m).__name__ == "MaskEmbedding"][0].layers
    assert sum(isinstance(m, torch.nn.Linear) for m in linears) == 3  # 2 blocks + the last
    assert all(
        m.kernel_size == 5
        for m in head.modules()
        if hasattr(m, "kernel_size") and isinstance(m.kernel_size, int)
    )
    with pytest.raises(ConfigError, match=r"model\.head\.kernel_size.*must be odd"):
        load_config(ROOT / "configs/base.yaml", ["model.head.kernel_size=4"])
