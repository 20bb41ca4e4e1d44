"""The Snakemake workflow: config validated at parse time, one teacher cache for every run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(
    tmp_path: Path,
    *targets: str,
    main: Path | None = None,
    ablation: Path | None = None,
    find_spec: bool = False,
) -> subprocess.CompletedProcess:
    """``snakemake -n``; ``find_spec`` passes no ablation, so the workflow looks one up for main."""
    main = main or ROOT / "configs/reg_sam/regnet_distill.yaml"
    ablation = ablation or ROOT / "configs/ablation.yaml"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        *targets,
        "-n",
        "-p",
        "--cores",
        "2",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(ROOT / "configs/workflow.yaml"),
        "--config",
        f"main={main}",
        *([] if find_spec else [f"ablation={ablation}"]),
    ]
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
    assert (
        "--teacher-eval runs/teacher_eval/base.json runs/teacher_eval/effective.json" in res.stdout
    )


def test_default_target_runs_the_whole_chain(tmp_path):
    res = dry_run(tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = job_counts(res.stdout)
    for rule in (
        "synthetic_data",
        "adapt_teacher",
        "cache_teacher",
        "train_run",
        "evaluate_run",
        "predict_run",
    ):
        assert counts[rule] == 1, rule
    assert counts["evaluate_teacher"] == 2
    # the cache is tracked through the adapted teacher's marker, known before adaptation runs
    assert re.search(r"cache/adapted/sam_tiny-[0-9a-f]{12}/cache_train\.json", res.stdout)


def test_adaptation_off_caches_the_configured_teacher(tmp_path):
    off = tmp_path / "off.yaml"
    off.write_text(
        f"_base_: {ROOT / 'configs/reg_sam/regnet_distill.yaml'}\n"
        "teacher_adapt: {enabled: false}\n"
    )
    spec = tmp_path / "ablation.yaml"
    spec.write_text("base: off.yaml\nvariants: {baseline: {}}\n")
    res = dry_run(tmp_path, main=off, ablation=spec)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = job_counts(res.stdout)
    assert "adapt_teacher" not in counts and counts["cache_teacher"] == 1
    assert counts["evaluate_teacher"] == 1  # the configured teacher only
    assert re.search(r"cache/sam_tiny-train-[0-9a-f]{12}/COMPLETE\.json", res.stdout)


def test_a_spec_found_beside_main_that_does_not_fit_is_left_out(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    main = folder / "main.yaml"  # another teacher than the spec's base
    main.write_text(
        f"_base_: {ROOT / 'configs/reg_sam/regnet_distill.yaml'}\nteacher_adapt: {{iters: 2000}}\n"
    )
    spec = folder / "ablation.yaml"
    spec.write_text(
        f"base: {ROOT / 'configs/reg_sam/baseline.yaml'}\nvariants: {{baseline: {{}}}}\n"
    )
    # found beside main, not asked for: a note, and the main chain alone
    res = dry_run(tmp_path, main=main, find_spec=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"note: {spec}, the ablation spec found for main={main}, is left out" in res.stderr
    assert "teacher_adapt.iters: 2000 vs 350" in res.stderr
    counts = job_counts(res.stdout)
    assert counts["train_run"] == 1 and counts["adapt_teacher"] == 1
    # the ablation target then says what to pass
    res = dry_run(tmp_path, "ablation", main=main, find_spec=True)
    assert res.returncode != 0
    assert "no ablation runs" in res.stderr + res.stdout
    assert "--config ablation=PATH" in res.stderr + res.stdout
    # passed explicitly, the same spec is an error before any job
    res = dry_run(tmp_path, main=main, ablation=spec)
    assert res.returncode == 1
    assert "changes the teacher/cache/data settings" in res.stderr
    assert "Job stats" not in res.stdout


def test_progressive_chains_three_stages(tmp_path):
    res = dry_run(tmp_path, "progressive")
    assert res.returncode == 0, res.stderr[-2000:]
    assert job_counts(res.stdout)["train_run"] == 3
    assert "training.init_from=runs/progressive0-base/final.pth" in res.stdout


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"_base_: {ROOT / 'configs/base.yaml'}\nmodel: {{sam_distill: {{temperature: -1}}}}\n"
    )
    res = dry_run(tmp_path, main=bad)
    assert res.returncode != 0
    assert "model.sam_distill.temperature" in res.stderr + res.stdout


def snakemake(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Snakemake in ``tmp_path``, which sees this checkout's configs/ as the repository does."""
    if not (tmp_path / "configs").exists():
        (tmp_path / "configs").symlink_to(ROOT / "configs")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(ROOT / "configs/workflow.yaml"),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)


def shell_commands(out: str, rule: str) -> list[str]:
    """The printed shell command of every planned job of ``rule`` (``-p`` output)."""
    jobs = re.split(r"^\[[^\]]+\]\n", out, flags=re.M)
    return [
        re.search(r"^Shell command: (.*)$", j, re.M).group(1)
        for j in jobs
        if re.match(rf"(local)?rule {rule}:", j)
    ]


def test_lint_passes():
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(ROOT / "Snakefile")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Lints for" not in res.stdout + res.stderr


@pytest.mark.parametrize(
    "gpus, launcher, workers",
    [
        (0, "python -m pipeline --parent-pid $PPID train", ""),
        (1, "python -m pipeline --parent-pid $PPID train", " --workers 1"),
        (
            2,
            "torchrun --standalone --nproc_per_node 2 -m pipeline --parent-pid $PPID train",
            " --workers 2",
        ),
    ],
)
def test_gpus_choose_the_launcher(tmp_path, gpus, launcher, workers):
    res = snakemake(
        tmp_path, "-n", "-p", "--cores", "2", "--resources", "gpu=2", "--config", f"gpus={gpus}"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    (train,) = shell_commands(res.stdout, "train_run")
    assert train.startswith(launcher + " --config "), train
    (cache,) = shell_commands(res.stdout, "cache_teacher")
    assert cache.split(" > ")[0].rstrip().endswith("--split train" + workers), cache


def test_workflow_config_is_validated_by_the_schema(tmp_path):
    res = snakemake(tmp_path, "-n", "--cores", "2", "--config", "gpus=-1")
    assert res.returncode != 0
    assert "gpus" in res.stderr and "minimum" in res.stderr


def test_slurm_profile_plans_the_main_chain(tmp_path):
    pytest.importorskip(
        "snakemake_executor_plugin_slurm",
        reason="snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')",
    )
    res = snakemake(tmp_path, "-n", "--profile", str(ROOT / "workflow/profiles/slurm"))
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    for rule in ("synthetic_data", "cache_teacher", "train_run", "evaluate_run", "predict_run"):
        assert counts[rule] == 1, rule
    (train,) = shell_commands(res.stdout, "train_run")
    assert train.startswith(
        "torchrun --standalone --nproc_per_node 8 -m pipeline --parent-pid $PPID train"
    ), train
    assert re.search(r"rule train_run:(.|\n)*?resources: .*mem_mb=256000.*gpu=8", res.stdout)


def test_local_profile_plans_the_main_chain(tmp_path):
    res = snakemake(tmp_path, "-n", "--profile", str(ROOT / "workflow/profiles/local"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout)["train_run"] == 1
