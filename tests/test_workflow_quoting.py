"""Shell commands built by the workflow quote every override (no injection from ablation specs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_args(tmp_path: Path, spec: Path, run: str) -> str:
    """The ``--config ... -o ...`` part of ``run``'s train command as Snakemake plans it."""
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", f"runs/{run}/final.pth", "-n", "-p", "--cores", "1",
         "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
         str(ROOT / "configs/workflow.yaml"), "--config",
         f"main={ROOT / 'configs/reg_sam/regnet_distill.yaml'}", f"ablation={spec}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(ln for ln in (res.stdout + res.stderr).splitlines()
                if " train --config " in ln and f"experiment={run}" in ln)
    return line.split(" train ", 1)[1].split(" --work-dir ", 1)[0]


def test_override_with_quotes_reaches_the_config_verbatim_and_runs_nothing(tmp_path):
    marker = tmp_path / "INJECTED"
    evil = f"cpu' ; touch {marker} ; echo '"
    odd = "it's \"quoted\" $HOME `id` ; | &"
    spec = tmp_path / "ablation.yaml"
    spec.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs/reg_sam/regnet_distill.yaml"),
        "variants": {"evil": {"training.device": evil}, "odd": {"training.device": odd}},
    }))
    for name, value in (("evil", evil), ("odd", odd)):
        args = train_args(tmp_path, spec, name)
        # the rule's shell line, with `train` swapped for `check-config --print`
        cmd = f"{sys.executable} -m pipeline check-config --print {args}"
        res = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        resolved = json.loads(res.stdout)
        assert resolved["training"]["device"] == value
        assert resolved["experiment"] == name
    assert not marker.exists(), "an override value ran a shell command"
