# Stage two: train, evaluate and run a student. Working rules take a `run` wildcard (a name from
# configs/ablation.yaml, or `main` for configs/workflow.yaml's `main`); the target rules below
# (`train_student`, `evaluate`, `predict`) point them at the main run.
# Only final.pth is declared: checkpoints/last.pth survives a failed job, and a rerun resumes.

rule train_run:
    input:
        TRAIN_JSON,
        needs_cache,
        init_weights,
    output:
        OUTPUT_ROOT / "{run}" / "final.pth",
    params:
        cli=lambda wc, resources: launcher(resources.gpu),  # torchrun when the job has > 1 GPU
        args=run_args,
        work_dir=lambda wc: run_dir(wc.run),
    threads: config["threads"]
    resources:
        gpu=config["gpus"],
        mem_mb=16000,
        runtime=48 * 60,
    conda:
        "../../environment.yml"
    log:
        "logs/train/{run}.log",
    benchmark:
        "logs/benchmarks/train/{run}.tsv"
    shell:
        "{params.cli} train {params.args} --work-dir {params.work_dir:q} --no-progress > {log:q} 2>&1"


rule evaluate_run:
    input:
        VAL_JSON,
        weights=OUTPUT_ROOT / "{run}" / "final.pth",
    output:
        OUTPUT_ROOT / "{run}" / "eval" / "metrics.json",
    params:
        cli=PY,
        args=run_args,
        out=lambda wc: run_dir(wc.run) / "eval",
    threads: config["threads"]
    resources:
        gpu=min(config["gpus"], 1),
    conda:
        "../../environment.yml"
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "logs/benchmarks/evaluate/{run}.tsv"
    shell:
        "{params.cli} evaluate {params.args} --checkpoint {input.weights:q} --out {params.out:q} > {log:q} 2>&1"


rule predict_run:
    input:
        VAL_JSON,  # makes sure the (synthetic) dataset exists when predicting its val images
        weights=OUTPUT_ROOT / "{run}" / "final.pth",
    output:
        OUTPUT_ROOT / "{run}" / "predict" / "predictions.json",
    params:
        cli=PY,
        images=PREDICT_INPUT,
        out=lambda wc: run_dir(wc.run) / "predict",
    threads: config["threads"]
    resources:
        gpu=min(config["gpus"], 1),
    conda:
        "../../environment.yml"
    log:
        "logs/predict/{run}.log",
    benchmark:
        "logs/benchmarks/predict/{run}.tsv"
    shell:
        "{params.cli} predict --checkpoint {input.weights:q} --input {params.images:q} --out {params.out:q} > {log:q} 2>&1"


rule train_student:
    input:
        run_dir("main") / "final.pth",


rule evaluate:
    input:
        run_dir("main") / "eval" / "metrics.json",


rule predict:
    input:
        run_dir("main") / "predict" / "predictions.json",


# Deployment (`snakemake export`): the main student as ONNX (dynamic H/W, plus onnxruntime's
# dynamic INT8) and as a torch.export program, each evaluated on the val split through the
# exported file alone (`evaluate --backend ...`), so PQ of every format sits beside eval/.
rule export_onnx_run:
    input:
        weights=OUTPUT_ROOT / "{run}" / "final.pth",
    output:
        onnx=OUTPUT_ROOT / "{run}" / "export" / "student.onnx",
        int8=OUTPUT_ROOT / "{run}" / "export" / "student.int8.onnx",
    params:
        cli=PY,
        size=lambda wc: f"{CONFIGS[wc.run].data.test_size} {CONFIGS[wc.run].data.test_size}",
    threads: config["threads"]
    conda:
        "../../environment.yml"
    log:
        "logs/export/{run}_onnx.log",
    benchmark:
        "logs/benchmarks/export/{run}_onnx.tsv"
    shell:
        "{params.cli} export --checkpoint {input.weights:q} --format onnx --size {params.size} "
        "--dynamic --quantize dynamic --out {output.onnx:q} > {log:q} 2>&1"


rule export_torch_run:
    input:
        weights=OUTPUT_ROOT / "{run}" / "final.pth",
    output:
        OUTPUT_ROOT / "{run}" / "export" / "student.pt2",
    params:
        cli=PY,
        size=lambda wc: f"{CONFIGS[wc.run].data.test_size} {CONFIGS[wc.run].data.test_size}",
    threads: config["threads"]
    conda:
        "../../environment.yml"
    log:
        "logs/export/{run}_torch.log",
    benchmark:
        "logs/benchmarks/export/{run}_torch.tsv"
    shell:
        "{params.cli} export --checkpoint {input.weights:q} --format torch-export "
        "--size {params.size} --dynamic --out {output:q} > {log:q} 2>&1"


rule evaluate_exported_run:
    input:
        VAL_JSON,
        model=OUTPUT_ROOT / "{run}" / "export" / "{name}",
    output:
        OUTPUT_ROOT / "{run}" / "export" / "eval_{name}" / "metrics.json",
    wildcard_constraints:
        name=r"student(\.int8)?\.(onnx|pt2)",
    params:
        cli=PY,
        args=run_args,
        backend=lambda wc: "onnxruntime" if wc.name.endswith(".onnx") else "torch-export",
        out=lambda wc: run_dir(wc.run) / "export" / f"eval_{wc.name}",
    threads: config["threads"]
    conda:
        "../../environment.yml"
    log:
        "logs/export/{run}_eval_{name}.log",
    benchmark:
        "logs/benchmarks/export/{run}_eval_{name}.tsv"
    shell:
        "{params.cli} evaluate {params.args} --backend {params.backend} --model {input.model:q} "
        "--out {params.out:q} > {log:q} 2>&1"


rule export:
    input:
        [run_dir("main") / "export" / f"eval_{name}" / "metrics.json"
         for name in ("student.onnx", "student.int8.onnx", "student.pt2")],
