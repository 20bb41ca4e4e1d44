"""The backbone-name check without importing timm (pipeline.config.is_timm_model): the installed
timm's architecture names are kept in a per-version file under $XDG_CACHE_HOME/regsam/, which
only ever confirms a name. Fresh processes, because this one has imported timm already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]
NAMES = f"regsam/timm-{timm.__version__}-models.json"

PROBE = """
import json, sys
from pipeline.config import ConfigError, load_config
out = {}
for name in sys.argv[1:]:
    try:
        load_config("configs/base.yaml", [f"model.backbone.name={name}"])
        out[name] = "ok"
    except ConfigError as exc:
        out[name] = str(exc)
out["_timm_imported"] = "timm" in sys.modules
out["_torch_imported"] = "torch" in sys.modules
print(json.dumps(out))
"""


def probe(cache: Path, *names: str) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_first_check_writes_the_names_then_configs_load_without_torch(tmp_path):
    first = probe(tmp_path, "regnetx_002")
    assert first == {"regnetx_002": "ok", "_timm_imported": True, "_torch_imported": True}
    names = json.loads((tmp_path / NAMES).read_text())
    assert names == sorted(timm.list_models()) and "regnetx_016" in names

    # a known name (with or without a pretrained tag) no longer imports timm, nor torch
    again = probe(tmp_path, "regnetx_016", "resnet18.a1_in1k")
    assert again == {
        "regnetx_016": "ok",
        "resnet18.a1_in1k": "ok",
        "_timm_imported": False,
        "_torch_imported": False,
    }


def test_the_file_never_rejects_a_valid_name_and_bad_names_still_fail(tmp_path):
    (tmp_path / NAMES).parent.mkdir(parents=True)
    (tmp_path / NAMES).write_text(json.dumps(["resnet18"]))  # stale: lacks regnetx_002
    out = probe(tmp_path, "regnetx_002", "resnet_51")
    assert out["regnetx_002"] == "ok"  # timm asked, not the file
    assert "model.backbone.name" in out["resnet_51"] and "timm model name" in out["resnet_51"]

    (tmp_path / NAMES).write_text("{not json")  # unreadable: timm decides
    out = probe(tmp_path, "regnetx_002", "resnet_51")
    assert out["regnetx_002"] == "ok" and "timm model name" in out["resnet_51"]
    assert out["_timm_imported"] is True
