"""Expansion of the ablation spec into runs."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.runs import expand_spec, validate_runs

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_ablation_spec_expands_and_validates():
    table = expand_spec(ROOT / "configs/ablation.yaml")
    assert table.groups["ablation"] == ["baseline", "fusion", "resolution_distill", "sam_distill", "all"]
    assert len(table.groups["sweep_rd_weights"]) == 9
    assert len(table.groups["sweep_temperature"]) == 3
    cfgs = validate_runs(table)
    assert not cfgs["baseline"].model.use_learnable_fusion
    assert cfgs["all"].model.use_sam_distill and cfgs["all"].model.use_resolution_distill
    temps = sorted(cfgs[n].model.sam_distill.temperature for n in table.groups["sweep_temperature"])
    assert temps == [2.0, 4.0, 8.0]
    # sweeps inherit their variant's switches
    assert all(cfgs[n].model.use_sam_distill for n in table.groups["sweep_temperature"])
    # every run names itself
    assert cfgs["fusion"].experiment == "fusion"


def test_progressive_stages_chain_their_weights():
    table = expand_spec(ROOT / "configs/ablation.yaml")
    names = table.groups["progressive"]
    assert table.runs[names[0]].init_from is None
    assert table.runs[names[1]].init_from == names[0]
    assert table.runs[names[2]].init_from == names[1]
    cfg = validate_runs(table)[names[2]]
    assert cfg.training.init_from == f"runs/{names[1]}/final.pth"
    assert cfg.model.use_sam_distill


def test_bad_spec_errors(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text(f"base: {ROOT}/configs/reg_sam/baseline.yaml\nvariants: {{x: {{model.use_fusion: true}}}}\n")
    with pytest.raises(ConfigError, match=r"(?s)run 'x'.*unknown key 'model.use_fusion'"):
        validate_runs(expand_spec(p))
    p.write_text(f"base: {ROOT}/configs/reg_sam/baseline.yaml\nvariants: {{x: {{}}}}\n"
                 "sweeps: {s: {variant: y, grid: {seed: [1]}}}\n")
    with pytest.raises(ConfigError, match="variant='y' is not one of"):
        expand_spec(p)
    p.write_text("variants: {}\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown top-level"):
        expand_spec(p)
