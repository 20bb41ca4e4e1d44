"""Shell commands built by the workflow quote every override (no injection from ablation specs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]


def workflow_namespace(spec: Path) -> dict:
    """Execute workflow/rules/common.smk (plain Python) as Snakemake would at parse time."""
    ns = {"config": {"main": str(ROOT / "configs/reg_sam/regnet_distill.yaml"),
                     "ablation": str(spec)}}
    code = (ROOT / "workflow/rules/common.smk").read_text()
    exec(compile(code, "common.smk", "exec"), ns)  # noqa: S102 - the project's own file
    return ns


def test_override_with_quotes_reaches_the_config_verbatim_and_runs_nothing(tmp_path):
    marker = tmp_path / "INJECTED"
    evil = f"cpu' ; touch {marker} ; echo '"
    odd = "it's \"quoted\" $HOME `id` ; | &"
    spec = tmp_path / "ablation.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs/reg_sam/baseline.yaml"),
        "variants": {"evil": {"training.device": evil}, "odd": {"training.device": odd}},
    }))
    ns = workflow_namespace(spec)
    for name, value in (("evil", evil), ("odd", odd)):
        args = ns["run_args"](SimpleNamespace(run=name))
        # the rule's shell line, with `train` swapped for `check-config --print`
        cmd = f"{sys.executable} -m pipeline check-config --print {args}"
        res = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        resolved = json.loads(res.stdout)
        assert resolved["training"]["device"] == value
        assert resolved["experiment"] == name
    assert not marker.exists(), "an override value ran a shell command"
