"""Helpers shared by the cache tests."""

from pathlib import Path

import numpy as np
import zarr


def store_contents(path: Path) -> dict:
    """Every array of the Zarr group (dtype + bytes), the manifest and the skip sidecars."""
    group = zarr.open_group(str(path / "data.zarr"), mode="r")
    out = {
        name: (str(a.dtype), a.shape, np.asarray(a[...]).tobytes())
        for name, a in group.members(max_depth=None)
        if isinstance(a, zarr.Array)
    }
    out["manifest.json"] = (path / "manifest.json").read_text()
    for p in sorted((path / "skips").glob("*.json")):
        out[f"skips/{p.name}"] = p.read_text()
    return out
