# Stage one: run SAM once over the train split and cache features and per-segment logits.
# The declared output is only COMPLETE.json: Snakemake deletes the outputs of failed jobs, and the
# Zarr store beside it must survive a crash so a rerun resumes from the images already done.

rule cache_teacher:
    input:
        TRAIN_JSON,
    output:
        CACHE_DIR / "COMPLETE.json",
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
