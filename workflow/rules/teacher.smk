# Stage zero (optional): adapt SAM to the training data. Stage one: run the teacher once over the
# train split and cache features and per-segment logits.
# The declared cache output is a marker (COMPLETE.json, or with adaptation the adapted teacher's
# cache_train.json): Snakemake deletes the outputs of failed jobs, and the Zarr store beside it
# must survive a crash so a rerun resumes from the images already done.

if ADAPT:

    rule adapt_teacher:
        input:
            TRAIN_JSON,
        output:
            ADAPTED,
        params:
            config=config["main"],
        threads: config["threads"]
        resources:
            gpu=config["gpus"],
            mem_mb=16000,
            runtime=24 * 60,
        log:
            "logs/adapt_teacher.log",
        benchmark:
            "logs/benchmarks/adapt_teacher.tsv"
        shell:
            "{PY} adapt-teacher --config {params.config} --threads {threads} --no-progress > {log} 2>&1"


rule cache_teacher:
    input:
        TRAIN_JSON,
        [ADAPTED] if ADAPT else [],
    output:
        CACHE_MARKER,
    params:
        config=config["main"],
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
        mem_mb=16000,
        runtime=24 * 60,
    log:
        "logs/cache_teacher.log",
    benchmark:
        "logs/benchmarks/cache_teacher.tsv"
    shell:
        "{PY} cache-teacher --config {params.config} --split train > {log} 2>&1"


# Prompted-mask quality of the teacher on the val split: `base` = teacher.checkpoint (random
# weights when null), `effective` = what the cache uses (the adapted teacher when adapting).
rule evaluate_teacher:
    input:
        VAL_JSON,
        lambda wc: [ADAPTED] if ADAPT and wc.which == "effective" else [],
    output:
        OUTPUT_ROOT / "teacher_eval" / "{which}.json",
    wildcard_constraints:
        which="base|effective",
    params:
        config=config["main"],
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
    log:
        "logs/evaluate_teacher/{which}.log",
    benchmark:
        "logs/benchmarks/evaluate_teacher/{which}.tsv"
    shell:
        "{PY} evaluate-teacher --config {params.config} --which {wildcards.which} --out {output} "
        "--threads {threads} --no-progress > {log} 2>&1"
