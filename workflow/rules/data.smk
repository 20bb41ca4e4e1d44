# Datasets: the embedded synthetic default, and the Cityscapes -> COCO-panoptic conversion.

if MAIN_CFG.data.dataset == "synthetic":

    rule synthetic_data:
        output:
            TRAIN_JSON,
            VAL_JSON,
        params:
            cli=PY,
            config=config["main"],
        conda:
            "../../environment.yml"
        log:
            "logs/synthetic_data.log",
        benchmark:
            "logs/benchmarks/synthetic_data.tsv"
        shell:
            "{params.cli} synthetic --config {params.config:q} > {log:q} 2>&1"


if MAIN_CFG.data.dataset == "cityscapes":

    rule convert_cityscapes:
        output:
            TRAIN_JSON,
            VAL_JSON,
        params:
            cli=PY,
            config=config["main"],
        threads: 1
        conda:
            "../../environment.yml"
        log:
            "logs/convert_cityscapes.log",
        benchmark:
            "logs/benchmarks/convert_cityscapes.tsv"
        shell:
            "{params.cli} convert-cityscapes --config {params.config:q} > {log:q} 2>&1"
