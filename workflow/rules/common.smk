# Shared state: every run of the workflow, validated at parse time.
import shlex
from pathlib import Path

from pipeline.cache.fingerprint import cache_dir
from pipeline.config import ConfigError
from pipeline.runs import Run, expand_spec, validate_runs

# $PPID is the Snakemake process running the rule's shell: the command stops when it dies
PY = "python -m pipeline --parent-pid $PPID"
MAIN = Run("main", config["main"])
RUNS = expand_spec(config["ablation"])
RUNS.add(MAIN)
CONFIGS = validate_runs(RUNS)
MAIN_CFG = CONFIGS["main"]
OUTPUT_ROOT = Path(MAIN_CFG.output_root)

# One cached teacher serves every run: refuse runs whose teacher or cache settings differ.
_teacher = (MAIN_CFG.teacher, MAIN_CFG.cache, MAIN_CFG.data.root, MAIN_CFG.data.train)
for _name, _cfg in CONFIGS.items():
    if (_cfg.teacher, _cfg.cache, _cfg.data.root, _cfg.data.train) != _teacher:
        raise ConfigError(f"run {_name!r} changes teacher/cache/data settings; all runs of one "
                          "workflow share one teacher cache (run another workflow config instead)")

CACHE_DIR = cache_dir(MAIN_CFG, "train")
TRAIN_JSON = MAIN_CFG.split_paths("train")[1]
VAL_IMAGES, VAL_JSON, _ = MAIN_CFG.split_paths("val")
PREDICT_INPUT = Path(config.get("predict_input") or VAL_IMAGES)


def run_dir(name):
    return OUTPUT_ROOT / name


def run_args(wildcards):
    """--config/--override arguments of the run named by the `run` wildcard, shell-quoted."""
    run = RUNS.runs[wildcards.run]
    ov = " ".join(f"-o {shlex.quote(o)}" for o in run.all_overrides(str(OUTPUT_ROOT)))
    return f"--config {shlex.quote(str(run.config))} {ov}"


def needs_cache(wildcards):
    return [CACHE_DIR / "COMPLETE.json"] if CONFIGS[wildcards.run].model.use_sam_distill else []


def init_weights(wildcards):
    prev = RUNS.runs[wildcards.run].init_from
    return [run_dir(prev) / "final.pth"] if prev else []
