"""Expansion of the ablation spec into runs."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.runs import expand_spec, validate_runs

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_ablation_spec_expands_and_validates():
    table = expand_spec(ROOT / "configs/ablation.yaml")
    variants = ["baseline", "fusion", "resolution_distill", "sam_distill", "all"]
    assert table.groups["ablation"] == [f"{v}-s{s}" for v in variants for s in (0, 1, 2)]
    assert len(table.groups["sweep_rd_weights"]) == 9
    assert len(table.groups["sweep_temperature"]) == 3
    cfgs = validate_runs(table)
    assert not cfgs["baseline-s0"].model.use_learnable_fusion
    assert cfgs["all-s2"].model.use_sam_distill and cfgs["all-s2"].model.use_resolution_distill
    assert [cfgs[f"sam_distill-s{s}"].seed for s in (0, 1, 2)] == [0, 1, 2]
    temps = sorted(cfgs[n].model.sam_distill.temperature for n in table.groups["sweep_temperature"])
    assert temps == [2.0, 4.0, 8.0]
    # sweeps inherit their variant's switches
    assert all(cfgs[n].model.use_sam_distill for n in table.groups["sweep_temperature"])
    # every run names itself
    assert cfgs["fusion-s1"].experiment == "fusion-s1"


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
    p.write_text(
        f"base: {ROOT}/configs/reg_sam/baseline.yaml\nvariants: {{x: {{model.use_fusion: true}}}}\n"
    )
    with pytest.raises(ConfigError, match=r"(?s)run 'x'.*unknown key 'model.use_fusion'"):
        validate_runs(expand_spec(p))
    p.write_text(
        f"base: {ROOT}/configs/reg_sam/baseline.yaml\nvariants: {{x: {{}}}}\n"
        "sweeps: {s: {variant: y, grid: {seed: [1]}}}\n"
    )
    with pytest.raises(ConfigError, match="variant='y' is not one of"):
        expand_spec(p)
    p.write_text("variants: {}\nextra: 1\n")
    with pytest.raises(ConfigError, match="unknown top-level"):
        expand_spec(p)


@pytest.mark.parametrize("dataset", ["coco", "cityscapes"])
def test_real_data_ablation_specs_share_main_teacher_cache_and_data(dataset):
    from pipeline.config import load_config
    from pipeline.runs import find_ablation_spec, shared_differences

    main = ROOT / f"configs/{dataset}/regnet_distill.yaml"
    spec = find_ablation_spec(main)
    assert spec == ROOT / f"configs/{dataset}/ablation.yaml"
    table = expand_spec(spec)
    assert len(table.groups["ablation"]) == 5 and len(table.groups["progressive"]) == 3
    main_cfg = load_config(main)
    for name, cfg in validate_runs(table).items():
        assert shared_differences(main_cfg, cfg) == [], name
        assert cfg.data.dataset == main_cfg.data.dataset


def test_find_ablation_spec_looks_beside_main_then_one_folder_up(tmp_path):
    from pipeline.runs import find_ablation_spec

    assert (
        find_ablation_spec(ROOT / "configs/reg_sam/regnet_distill.yaml")
        == ROOT / "configs/ablation.yaml"
    )
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert find_ablation_spec(tmp_path / "a" / "b" / "main.yaml") is None


def test_shared_differences_name_the_keys():
    from pipeline.config import load_config
    from pipeline.runs import shared_differences

    coco = load_config(ROOT / "configs/coco/regnet_distill.yaml")
    synthetic = load_config(ROOT / "configs/reg_sam/baseline.yaml")
    diff = shared_differences(coco, synthetic)
    assert "teacher.type: 'vit_h' vs 'sam_tiny'" in diff
    assert "data.root: 'datasets/coco' vs 'data/synthetic'" in diff
    assert (
        "data.train.json: 'annotations/panoptic_train2017.json' vs "
        "'annotations/panoptic_train.json'" in diff
    )
    # student settings may differ
    other = load_config(ROOT / "configs/coco/baseline.yaml")
    assert shared_differences(coco, other) == []


def test_summarize_results_lists_new_metrics_and_reports(tmp_path):
    import json
    import os

    from pipeline.runs import summarize_results

    m = {
        "All": {"pq": 83.94, "sq": 91.06, "rq": 91.5},
        "Things": {"pq": 74.0},
        "Stuff": {"pq": 98.66},
    }
    for run in ("main", "old"):
        (tmp_path / run / "eval").mkdir(parents=True)
        (tmp_path / run / "eval" / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "report_ablation").mkdir()
    (tmp_path / "report_ablation" / "report.md").write_text("# r")
    os.utime(tmp_path / "old" / "eval" / "metrics.json", (1000.0, 1000.0))
    text = summarize_results(tmp_path, since=2000.0)
    lines = text.splitlines()
    assert lines[0] == f"RegSAM results under {tmp_path}/:"
    assert lines[1] == (
        f"  main: PQ 83.9  SQ 91.1  RQ 91.5  (PQ things 74.0, stuff 98.7)  "
        f"{tmp_path}/main/eval/metrics.json"
    )
    assert lines[2] == f"        weights {tmp_path}/main/final.pth"
    assert lines[3] == f"  report ablation: {tmp_path}/report_ablation/report.md"
    assert len(lines) == 4  # `old` predates this invocation
    assert summarize_results(tmp_path, since=1e12) == ""
