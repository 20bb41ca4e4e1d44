# RegSAM workflow. Stage zero (`adapt_teacher`, when `teacher_adapt.enabled`) fine-tunes SAM on
# the train split; stage one (`cache_teacher`) runs the teacher once; stage two (`train_student`,
# `evaluate`, `predict`) and the ablations read that single cache. Rules are thin: each calls
# `python -m pipeline <command>`. Every config is validated here, before any job starts.
#
#   snakemake --cores 2                 # the whole chain on the embedded synthetic default
#   snakemake --cores 2 cache_teacher   # stage one only
#   snakemake --cores 2 ablation        # baseline / +fusion / +resolution / +SAM / all, then a report
#   snakemake --cores 16 --config main=configs/coco/regnet_distill.yaml gpus=1   # real data
#   snakemake --profile workflow/profiles/slurm --config main=...   # the same rules on SLURM
# Targets go before --config (it takes every word after it as a key=value pair).

configfile: "configs/workflow.yaml"

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/student.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    default_target: True
    input:
        run_dir("main") / "final.pth",
        run_dir("main") / "eval" / "metrics.json",
        run_dir("main") / "predict" / "predictions.json",
        TEACHER_EVALS,


onsuccess:
    summary = results_summary()  # where this invocation's results are, with the headline PQ
    if summary:
        print(summary)
