# Ablations, sweeps and progressive training over the one teacher cache, and their report.


rule report_runs:
    input:
        metrics=group_metrics,
        teacher=TEACHER_EVALS,
    output:
        OUTPUT_ROOT / "report_{group}" / "report.md",
    params:
        cli=PY,
        runs=group_dirs,
        out=lambda wc: OUTPUT_ROOT / f"report_{wc.group}",
    conda:
        "../../environment.yml"
    log:
        "logs/report/{group}.log",
    benchmark:
        "logs/benchmarks/report/{group}.tsv"
    shell:
        "{params.cli} report --runs {params.runs} --out {params.out:q} --title 'RegSAM {wildcards.group}' "
        "--teacher-eval {input.teacher} > {log:q} 2>&1"


rule ablation:
    input:
        OUTPUT_ROOT / "report_ablation" / "report.md",


rule sweep:
    input:
        OUTPUT_ROOT / "report_sweep" / "report.md",


rule progressive:
    input:
        OUTPUT_ROOT / "report_progressive" / "report.md",
