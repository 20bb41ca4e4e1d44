# Stage one: run SAM once over the train split and cache features and per-segment logits.
# The declared output is only COMPLETE.json: Snakemake deletes the outputs of failed jobs, and the
# Zarr store beside it must survive a crash so a rerun resumes from the images already done.

rule cache_teacher:
    input:
        TRAIN_JSON,
    output:
        CACHE_DIR / "COMPLETE.json",
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
