"""The unlabelled-images benchmark as the README states it plans one train cache, one unlabelled
cache and 3 rows x 3 seeds; the default chain plans no unlabelled cache."""

from tests.workflow_helpers import job_counts, readme_commands, run_snakemake, workspace


def test_readme_benchmark_command_plans_one_unlabelled_cache(tmp_path):
    commands = readme_commands("Unlabelled images through the cache")
    assert len(commands) == 1 and "ablation_unlabeled.yaml" in commands[0]
    cwd = workspace(tmp_path)
    out = run_snakemake(commands[0], cwd, "-n")
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = job_counts(out.stdout)
    assert jobs["cache_teacher"] == 1 and jobs["cache_teacher_unlabeled"] == 1
    assert jobs["train_run"] == 9 and jobs["report_runs"] == 1
    assert "cache-teacher --config" in out.stdout or "cache_teacher_unlabeled" in out.stdout

    default = run_snakemake("snakemake --cores 2", cwd, "-n")
    assert default.returncode == 0, default.stderr[-3000:]
    assert "cache_teacher_unlabeled" not in job_counts(default.stdout)
