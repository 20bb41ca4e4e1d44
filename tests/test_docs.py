"""docs/architecture.md lists every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_lists_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    layout = text.split("## Package layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z_]+\.py)`", layout))
    modules = {p.name for p in (ROOT / "pipeline").rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), "add these modules to docs/architecture.md"
