# Speed / memory / size benchmarks. Each script measures its rows side by side in one run and
# writes a Markdown table of ratios (never a timed unit test). `snakemake benchmark` runs all.

rule benchmark:
    input:
        "benchmarks/results/cache.md",
        "benchmarks/results/model.md",
        "benchmarks/results/distill.md",
        "benchmarks/results/distill_coco.md",


rule bench_cache:
    output:
        "benchmarks/results/cache.md",
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
    conda:
        "../../environment.yml"
    log:
        "logs/benchmark/cache.log",
    benchmark:
        "logs/benchmarks/benchmark/cache.tsv"
    shell:
        "python benchmarks/bench_cache.py --teacher vit_b --threads {threads} --out {output} > {log} 2>&1"


rule bench_model:
    output:
        "benchmarks/results/model.md",
    params:
        configs=f"{config['main']} configs/coco/regnet_distill.yaml configs/coco/regnet_distill_fast.yaml",
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
    conda:
        "../../environment.yml"
    log:
        "logs/benchmark/model.log",
    benchmark:
        "logs/benchmarks/benchmark/model.tsv"
    shell:
        "python benchmarks/bench_model.py --config {params.configs} --threads {threads} --profile --out {output} > {log} 2>&1"


rule bench_distill:
    output:
        "benchmarks/results/distill.md",
    params:
        config=config["main"],
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
    conda:
        "../../environment.yml"
    log:
        "logs/benchmark/distill.log",
    benchmark:
        "logs/benchmarks/benchmark/distill.tsv"
    shell:
        "python benchmarks/bench_distill.py --config {params.config} --decompose --threads {threads} --out {output} > {log} 2>&1"


# the same rows for the COCO-sized student (configs/coco), at a crop a CPU can step through
rule bench_distill_coco:
    output:
        "benchmarks/results/distill_coco.md",
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
    conda:
        "../../environment.yml"
    log:
        "logs/benchmark/distill_coco.log",
    benchmark:
        "logs/benchmarks/benchmark/distill_coco.tsv"
    shell:
        "python benchmarks/bench_distill.py --config configs/coco/regnet_distill.yaml --batch-size 2 --crop 320 --iters 6 --skip-live --decompose --threads {threads} --out {output} > {log} 2>&1"
