"""The Snakemake workflow: config validated at parse time, one teacher cache for every run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, *targets: str, main: Path | None = None,
            ablation: Path | None = None) -> subprocess.CompletedProcess:
    main = main or ROOT / "configs/reg_sam/regnet_distill.yaml"
    ablation = ablation or ROOT / "configs/ablation.yaml"
    cmd = [sys.executable, "-m", "snakemake", *targets, "-n", "-p", "--cores", "2", "--snakefile",
           str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
           str(ROOT / "configs/workflow.yaml"), "--config", f"main={main}",
           f"ablation={ablation}"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def job_counts(out: str) -> dict[str, int]:
    stats = out.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}


def test_ablation_dry_run_caches_the_teacher_once(tmp_path):
    res = dry_run(tmp_path, "ablation")
    assert res.returncode == 0, res.stderr[-2000:]
    counts = job_counts(res.stdout)
    assert counts["cache_teacher"] == 1 and counts["adapt_teacher"] == 1
    # 5 variants x 3 seeds (configs/ablation.yaml), all reading the one cache
    assert counts["train_run"] == 15 and counts["evaluate_run"] == 15
    assert counts["synthetic_data"] == 1 and counts["report_runs"] == 1
    assert counts["evaluate_teacher"] == 2  # before and after adaptation, shown in the report
    assert "--teacher-eval runs/teacher_eval/base.json runs/teacher_eval/effective.json" in res.stdout


def test_default_target_runs_the_whole_chain(tmp_path):
    res = dry_run(tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = job_counts(res.stdout)
    for rule in ("synthetic_data", "adapt_teacher", "cache_teacher", "train_run", "evaluate_run",
                 "predict_run"):
        assert counts[rule] == 1, rule
    assert counts["evaluate_teacher"] == 2
    # the cache is tracked through the adapted teacher's marker, known before adaptation runs
    assert re.search(r"cache/adapted/sam_tiny-[0-9a-f]{12}/cache_train\.json", res.stdout)


def test_adaptation_off_caches_the_configured_teacher(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text(f"_base_: {ROOT / 'configs/reg_sam/regnet_distill.yaml'}\n"
                   "teacher_adapt: {enabled: false}\n")
    spec = tmp_path / "ablation.yaml"
    spec.write_text("base: off.yaml\nvariants: {baseline: {}}\n")
    res = dry_run(tmp_path, main=off, ablation=spec)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = job_counts(res.stdout)
    assert "adapt_teacher" not in counts and counts["cache_teacher"] == 1
    assert counts["evaluate_teacher"] == 1  # the configured teacher only
    assert re.search(r"cache/sam_tiny-train-[0-9a-f]{12}/COMPLETE\.json", res.stdout)


def test_progressive_chains_three_stages(tmp_path):
    res = dry_run(tmp_path, "progressive")
    assert res.returncode == 0, res.stderr[-2000:]
    assert job_counts(res.stdout)["train_run"] == 3
    assert "training.init_from=runs/progressive0-base/final.pth" in res.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {ROOT / 'configs/base.yaml'}\nmodel: {{sam_distill: {{temperature: -1}}}}\n")
    res = dry_run(tmp_path, main=bad)
    assert res.returncode != 0
    assert "model.sam_distill.temperature" in res.stderr + res.stdout
