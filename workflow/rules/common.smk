# Shared state and helper functions of the workflow: every run, validated at parse time.
import shlex
import sys
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from pipeline.cache.fingerprint import cache_marker
from pipeline.teacher.adapted import ADAPTED_FILE, adapted_dir
from pipeline.config import ConfigError
from pipeline.preflight import MissingInputError, require, workflow_checks
from pipeline.runs import (Run, RunTable, expand_spec, find_ablation_spec, shared_differences,
                           summarize_results, validate_runs)

try:
    validate(config, "../schemas/workflow.schema.yaml")
except WorkflowError as exc:  # one line per bad key instead of the whole schema
    if "--debug" in sys.argv:
        raise
    cause = exc.__context__ or exc  # the jsonschema ValidationError
    where = ".".join(str(p) for p in getattr(cause, "absolute_path", [])) or "config"
    print(f"error: invalid workflow config (configs/workflow.yaml / --config): {where}: "
          f"{getattr(cause, 'message', cause)} (see workflow/schemas/workflow.schema.yaml)",
          file=sys.stderr)
    sys.exit(1)

# the interpreter, which rules take through `params`; $PPID is the Snakemake process running the
# rule's shell: the command stops (with its workers) when Snakemake dies
PY = "python -m pipeline --parent-pid $PPID"
STARTED = time.time()


def load_workflow(main_config, ablation):
    """(runs, their configs, the teacher cache's completion marker), or ConfigError /
    MissingInputError.

    A spec passed as ``ablation`` must share main's teacher, cache and data settings (else
    ConfigError). A spec only looked up for main (``find_ablation_spec``) that does not is left
    out with a note, so `snakemake --config main=OTHER` still runs the main chain."""
    spec = ablation or find_ablation_spec(main_config)
    runs = expand_spec(spec) if spec else RunTable()  # no spec: the main chain only
    runs.add(Run("main", main_config))
    configs = validate_runs(runs)
    main_cfg = configs["main"]
    # One cached teacher serves every run: refuse runs whose teacher or cache settings differ.
    for name, cfg in configs.items():
        diff = shared_differences(main_cfg, cfg)
        if not diff:
            continue
        if ablation:
            raise ConfigError(
                f"run {name!r} of {spec} changes the teacher/cache/data settings of "
                f"main={main_config} ({'; '.join(diff[:4])}). All runs of one workflow share "
                "one teacher cache: use an ablation spec whose base has main's teacher, cache and "
                "data sections (e.g. configs/coco/ablation.yaml for configs/coco/*), passed with "
                "--config ablation=PATH or placed as ablation.yaml beside the main config.")
        print(f"note: {spec}, the ablation spec found for main={main_config}, is left out: "
              f"its run {name!r} changes main's teacher/cache/data settings "
              f"({'; '.join(diff[:4])}). The main chain runs; ablation, sweep and progressive "
              "targets need --config ablation=PATH with a spec whose base has main's teacher.",
              file=sys.stderr)
        runs = RunTable()
        runs.add(Run("main", main_config))
        configs = {"main": main_cfg}
        break
    require(workflow_checks(main_cfg, configs.values()))
    return runs, configs, cache_marker(main_cfg, "train")


try:
    RUNS, CONFIGS, CACHE_MARKER = load_workflow(config["main"], config.get("ablation"))
except (ConfigError, MissingInputError) as exc:
    if getattr(workflow.execution_settings, "debug", False) or "--debug" in sys.argv:
        raise
    print(f"error: {exc}\n(snakemake --debug shows the traceback)", file=sys.stderr)
    sys.exit(1)

MAIN_CFG = CONFIGS["main"]
# the unlabelled images' cache, planned only when some run trains on them
UNLABELED_MARKER = (
    cache_marker(MAIN_CFG, "unlabeled")
    if any(c.training.unlabeled_ratio > 0 for c in CONFIGS.values())
    else None
)
OUTPUT_ROOT = Path(MAIN_CFG.output_root)

# With teacher adaptation the cache directory depends on weights that do not exist yet, so the
# workflow tracks the cache through a marker file known before anything runs.
ADAPT = MAIN_CFG.teacher_adapt.enabled
ADAPTED = adapted_dir(MAIN_CFG) / ADAPTED_FILE
TEACHER_EVALS = [OUTPUT_ROOT / "teacher_eval" / f"{w}.json"
                 for w in (["base", "effective"] if ADAPT else ["effective"])]
TRAIN_JSON = MAIN_CFG.split_paths("train")[1]
VAL_IMAGES, VAL_JSON, _ = MAIN_CFG.split_paths("val")
PREDICT_INPUT = Path(config.get("predict_input") or VAL_IMAGES)
ABLATION = RUNS.groups.get("ablation", [])
PROGRESSIVE = RUNS.groups.get("progressive", [])
SWEEP = [n for g, names in RUNS.groups.items() if g.startswith("sweep_") for n in names]


def run_dir(name):
    return OUTPUT_ROOT / name


def run_args(wildcards):
    """--config/--override arguments of the run named by the `run` wildcard, shell-quoted."""
    return RUNS.runs[wildcards.run].shell_args(str(OUTPUT_ROOT))


def needs_cache(wildcards):
    cfg = CONFIGS[wildcards.run]
    out = [CACHE_MARKER] if cfg.model.use_sam_distill else []
    return out + ([UNLABELED_MARKER] if cfg.training.unlabeled_ratio > 0 else [])


def init_weights(wildcards):
    prev = RUNS.runs[wildcards.run].init_from
    return [run_dir(prev) / "final.pth"] if prev else []


def launcher(gpus):
    """`python -m pipeline`, or torchrun with one process per GPU when a job has several."""
    gpus = int(gpus)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m pipeline --parent-pid $PPID"
    return PY


def cache_workers(gpus):
    """One dask worker per GPU of the job (default without GPUs: a few CPU workers)."""
    return f"--workers {int(gpus)}" if int(gpus) > 0 else ""


def group_runs(group):
    """Run names of a report group (`ablation`, `progressive`, or `sweep` = every sweep)."""
    names = SWEEP if group == "sweep" else RUNS.groups.get(group, [])
    if not names:
        raise WorkflowError(f"no {group} runs: no ablation spec declares them for "
                            f"main={config['main']} (pass --config ablation=PATH, see "
                            "configs/coco/ablation.yaml)")
    return names


def group_metrics(wildcards):
    return [run_dir(n) / "eval" / "metrics.json" for n in group_runs(wildcards.group)]


def group_dirs(wildcards):
    return " ".join(shlex.quote(str(run_dir(n))) for n in group_runs(wildcards.group))


def results_summary():
    """Where this invocation's results are, with the headline PQ (printed by `onsuccess`)."""
    return summarize_results(OUTPUT_ROOT, STARTED)
