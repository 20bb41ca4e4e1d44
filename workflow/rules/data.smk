# Datasets: the embedded synthetic default, and the Cityscapes -> COCO-panoptic conversion.

if MAIN_CFG.data.dataset == "synthetic":

    rule synthetic_data:
        output:
            TRAIN_JSON,
            VAL_JSON,
        params:
            config=config["main"],
        log:
            "logs/synthetic_data.log",
        benchmark:
            "logs/benchmarks/synthetic_data.tsv"
        shell:
            "{PY} synthetic --config {params.config} > {log} 2>&1"


if MAIN_CFG.data.dataset == "cityscapes":

    rule convert_cityscapes:
        output:
            TRAIN_JSON,
            VAL_JSON,
        params:
            config=config["main"],
        threads: 1
        log:
            "logs/convert_cityscapes.log",
        benchmark:
            "logs/benchmarks/convert_cityscapes.tsv"
        shell:
            "{PY} convert-cityscapes --config {params.config} > {log} 2>&1"
