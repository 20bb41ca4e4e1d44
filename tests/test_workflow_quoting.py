"""Shell commands built by the workflow quote every override (no injection from ablation specs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.runs import expand_spec

ROOT = Path(__file__).resolve().parents[1]


def train_args(spec: Path, run: str) -> str:
    """The ``--config ... -o ...`` part of ``run``'s train command (``run_args`` of the workflow)."""
    return expand_spec(spec).runs[run].shell_args("runs")


def test_override_with_quotes_reaches_the_config_verbatim_and_runs_nothing(tmp_path):
    marker = tmp_path / "INJECTED"
    evil = f"cpu' ; touch {marker} ; echo '"
    odd = 'it\'s "quoted" $HOME `id` ; | &'
    spec = tmp_path / "ablation.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "configs/reg_sam/regnet_distill.yaml"),
                "variants": {"evil": {"training.device": evil}, "odd": {"training.device": odd}},
            }
        )
    )
    for name, value in (("evil", evil), ("odd", odd)):
        args = train_args(spec, name)
        # the rule's shell line, with `train` swapped for `check-config --print`
        cmd = f"{sys.executable} -m pipeline check-config --print {args}"
        res = subprocess.run(
            ["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr[-2000:]
        resolved = json.loads(res.stdout)
        assert resolved["training"]["device"] == value
        assert resolved["experiment"] == name
    assert not marker.exists(), "an override value ran a shell command"


def test_workflow_builds_train_commands_with_the_quoted_arguments():
    common = (ROOT / "workflow/rules/common.smk").read_text()
    assert "RUNS.runs[wildcards.run].shell_args(str(OUTPUT_ROOT))" in common
