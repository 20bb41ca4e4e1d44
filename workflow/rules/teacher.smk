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
            cli=lambda wc, resources: launcher(resources.gpu),  # torchrun when > 1 GPU
            config=config["main"],
        threads: config["threads"]
        resources:
            gpu=config["gpus"],
            mem_mb=16000,
            runtime=24 * 60,
        conda:
            "../../environment.yml"
        log:
            "logs/adapt_teacher.log",
        benchmark:
            "logs/benchmarks/adapt_teacher.tsv"
        shell:
            "{params.cli} adapt-teacher --config {params.config:q} --threads {threads} "
            "--no-progress > {log:q} 2>&1"


rule cache_teacher:
    input:
        TRAIN_JSON,
        [ADAPTED] if ADAPT else [],
    output:
        CACHE_MARKER,
    params:
        cli=PY,
        config=config["main"],
        workers=lambda wc, resources: cache_workers(resources.gpu),  # one dask worker per GPU
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
        mem_mb=16000,
        runtime=24 * 60,
    conda:
        "../../environment.yml"
    log:
        "logs/cache_teacher.log",
    benchmark:
        "logs/benchmarks/cache_teacher.tsv"
    shell:
        "{params.cli} cache-teacher --config {params.config:q} --split train {params.workers} > {log:q} 2>&1"


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
        cli=PY,
        config=config["main"],
    threads: config["threads"]
    resources:
        gpu=min(config["gpus"], 1),
    conda:
        "../../environment.yml"
    log:
        "logs/evaluate_teacher/{which}.log",
    benchmark:
        "logs/benchmarks/evaluate_teacher/{which}.tsv"
    shell:
        "{params.cli} evaluate-teacher --config {params.config:q} --which {wildcards.which} "
        "--out {output:q} --threads {threads} --no-progress > {log:q} 2>&1"


# Stage one for the unlabelled images (data.unlabeled and/or the held-out part of a label-scarce
# train split): SAM's automatic segments, with the train cache's PCA basis and prototypes. Only
# planned when a run trains on unlabelled images (training.unlabeled_ratio > 0).
if UNLABELED_MARKER is not None:

    rule cache_teacher_unlabeled:
        input:
            CACHE_MARKER,
        output:
            UNLABELED_MARKER,
        params:
            cli=PY,
            config=config["main"],
            workers=lambda wc, resources: cache_workers(resources.gpu),
        threads: config["threads"]
        resources:
            gpu=config["gpus"],
            mem_mb=16000,
            runtime=24 * 60,
        conda:
            "../../environment.yml"
        log:
            "logs/cache_teacher_unlabeled.log",
        benchmark:
            "logs/benchmarks/cache_teacher_unlabeled.tsv"
        shell:
            "{params.cli} cache-teacher --config {params.config:q} --split unlabeled "
            "{params.workers} > {log:q} 2>&1"
