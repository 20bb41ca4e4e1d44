# Speed / memory / size benchmarks: each prints a Markdown table of side-by-side ratios.

rule benchmark:
    input:
        "benchmarks/results/cache.md",
        "benchmarks/results/model.md",
        "benchmarks/results/distill.md",


rule benchmark_one:
    input:
        TRAIN_JSON,
    output:
        "benchmarks/results/{name}.md",
    params:
        config=config["main"],
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
    log:
        "logs/benchmark/{name}.log",
    shell:
        "python benchmarks/bench_{wildcards.name}.py --config {params.config} --out {output} > {log} 2>&1"
