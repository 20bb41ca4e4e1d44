# Ablations, sweeps and progressive training over the one teacher cache, and their report.

ABLATION = RUNS.groups.get("ablation", [])
PROGRESSIVE = RUNS.groups.get("progressive", [])
SWEEP = [n for g, names in RUNS.groups.items() if g.startswith("sweep_") for n in names]


def _metrics(names):
    return [run_dir(n) / "eval" / "metrics.json" for n in names]


rule report_runs:
    input:
        metrics=lambda wc: _metrics(RUNS.groups[wc.group] if wc.group != "sweep" else SWEEP),
        teacher=TEACHER_EVALS,
    output:
        OUTPUT_ROOT / "report_{group}" / "report.md",
    params:
        runs=lambda wc: " ".join(str(run_dir(n)) for n in (RUNS.groups[wc.group] if wc.group != "sweep" else SWEEP)),
        out=lambda wc: OUTPUT_ROOT / f"report_{wc.group}",
    log:
        "logs/report/{group}.log",
    shell:
        "{PY} report --runs {params.runs} --out {params.out} --title 'RegSAM {wildcards.group}' "
        "--teacher-eval {input.teacher} > {log} 2>&1"


rule ablation:
    input:
        OUTPUT_ROOT / "report_ablation" / "report.md",


rule sweep:
    input:
        OUTPUT_ROOT / "report_sweep" / "report.md",


rule progressive:
    input:
        OUTPUT_ROOT / "report_progressive" / "report.md",
