"""Summarise (``inspect_cache``) and check (``verify_cache``) a teacher cache directory.

Both work on finished and unfinished caches and need no config:
``python -m pipeline cache-inspect <dir>`` and ``python -m pipeline cache-verify <dir>``.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.cache.fingerprint import fingerprint_sha256
from pipeline.cache.pca import basis_sha256
from pipeline.cache.store import (
    MANIFEST_FILE,
    STATUS_DONE,
    STATUS_SKIPPED,
    STATUS_TODO,
    ZARR_DIR,
    CacheIntegrityError,
    CacheStore,
)

__all__ = ["bytes_per_image", "inspect_cache", "print_inspection", "verify_cache"]


def bytes_per_image(path: str | Path) -> dict[int, int]:
    """Bytes on disk of each image's chunks, summed over all per-image arrays.

    A per-image array stores image ``i`` in the chunk files ``data.zarr/<array>/c/<i>/...``.
    """
    path = Path(path) / ZARR_DIR
    sizes: dict[int, int] = defaultdict(int)
    for root, _dirs, files in os.walk(path):
        rel = Path(root).relative_to(path).parts
        if not rel or rel[0] in ("pca", "prototypes") or "c" not in rel:
            continue
        after = rel[rel.index("c") + 1 :]  # chunk key components below <array>/c/
        for f in files:
            if f.endswith(".partial"):
                continue
            try:
                sizes[int(after[0] if after else f)] += os.stat(os.path.join(root, f)).st_size
            except (ValueError, OSError):
                continue
    return dict(sizes)


def _spread(indices: np.ndarray, k: int | None) -> np.ndarray:
    if k is None or indices.size <= k:
        return indices
    return indices[(np.arange(k) * indices.size) // k]


def inspect_cache(path: str | Path, max_images: int | None = 64) -> dict[str, Any]:
    """Facts about a cache.

    Arguments:
      path: the cache directory.
      max_images: feature statistics use at most this many evenly spaced done images
        (None = all).

    Returns:
      dict with ``path``, ``fingerprint``, ``fingerprint_sha256``, ``complete``, ``images``
      (done/skipped/todo counts), ``skip_reasons``, ``bytes_on_disk``, ``bytes_per_image``
      (mean/min/max over done images), ``levels`` (per level name: stored and teacher channels,
      grid, PCA explained variance, and mean/std/min/max of the stored values),
      ``prototype_counts``.
    """
    store = CacheStore.open(path)
    lay = store.layout
    status = store.status()
    done = np.flatnonzero(status == STATUS_DONE)
    skipped = np.flatnonzero(status == STATUS_SKIPPED)
    reasons = Counter((store.skip_info(int(i)) or {}).get("reason", "?") for i in skipped)
    per_image = bytes_per_image(store.path)
    done_bytes = np.array([per_image.get(int(i), 0) for i in done], dtype=np.int64)
    total_bytes = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    stats: dict[str, dict[str, float]] = {}
    acc = {n: [0.0, 0.0, np.inf, -np.inf, 0] for n in lay.level_names}
    for i in _spread(done, max_images):
        for n in lay.level_names:
            x = store.read_quantized(f"features/{n}", int(i)).astype(np.float64)
            a = acc[n]
            a[0] += x.sum()
            a[1] += (x * x).sum()
            a[2] = min(a[2], float(x.min()))
            a[3] = max(a[3], float(x.max()))
            a[4] += x.size
    pca = (store.manifest.get("pca") or {}).get("levels", {})
    for n, c, tc, g in zip(
        lay.level_names, lay.level_channels, lay.teacher_channels, lay.grid_sizes
    ):
        s, ss, lo, hi, cnt = acc[n]
        mean = s / cnt if cnt else float("nan")
        stats[n] = {
            "channels": c,
            "teacher_channels": tc,
            "grid": list(g),
            "pca_explained_variance": pca.get(n, {}).get("explained_variance_ratio"),
            "mean": mean,
            "std": float(np.sqrt(max(ss / cnt - mean * mean, 0.0))) if cnt else float("nan"),
            "min": lo if cnt else float("nan"),
            "max": hi if cnt else float("nan"),
        }
    counts = None
    calibration = None
    if store.has_prototypes():
        counts = [int(c) for c in store.array("prototypes/counts")[...]]
        if "automatic" not in store.fingerprint:  # labelled split: labels are the true classes
            calibration = prototype_calibration(store, _spread(done, max_images))
    return {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "fingerprint_sha256": store.fingerprint_sha256,
        "complete": store.complete is not None,
        "dtype": lay.dtype,
        "images": {
            "total": lay.num_images,
            "done": int(done.size),
            "skipped": int(skipped.size),
            "todo": int((status == STATUS_TODO).sum()),
        },
        "skip_reasons": dict(reasons),
        "bytes_on_disk": int(total_bytes),
        "bytes_per_image": {
            "mean": float(done_bytes.mean()) if done_bytes.size else 0.0,
            "min": int(done_bytes.min()) if done_bytes.size else 0,
            "max": int(done_bytes.max()) if done_bytes.size else 0,
        },
        "levels": stats,
        "stats_images": int(min(done.size, max_images or done.size)),
        "prototype_counts": counts,
        "calibration": calibration,
    }


def prototype_calibration(store: CacheStore, indices: np.ndarray) -> dict[str, Any] | None:
    """How well ``softmax(prototype_scale * cos)`` predicts the true classes of the segments of
    the images ``indices``, against the NLL-optimal scale (:func:`fit_prototype_scale`).

    Returns None without segments; else ``segments``, ``accuracy`` (argmax), ``prototype_scale``
    and ``nll`` (the cache's scale), ``fitted_scale`` and ``fitted_nll``, and
    ``mean_max_prob`` at each scale.
    """
    import torch
    from scipy.special import softmax

    from pipeline.cache.prototypes import class_logits, fit_prototype_scale, prototype_nll

    protos = torch.from_numpy(store.read_prototypes())
    cos, labels = [], []
    for i in indices:
        emb, lab = store.read_segments(int(i))
        if emb.shape[0] == 0:
            continue
        cos.append(class_logits(torch.from_numpy(emb), protos, 1.0).numpy())  # the reader's cosines
        labels.append(lab.astype(np.int64))
    if not cos:
        return None
    c, y = np.concatenate(cos).astype(np.float64), np.concatenate(labels)
    scale = float(store.fingerprint["prototype_scale"])
    fitted, fitted_nll = fit_prototype_scale(c, y)
    return {
        "segments": int(y.size),
        "accuracy": float((c.argmax(1) == y).mean()),
        "prototype_scale": scale,
        "nll": prototype_nll(c, y, scale),
        "mean_max_prob": float(softmax(scale * c, axis=1).max(1).mean()),
        "fitted_scale": fitted,
        "fitted_nll": fitted_nll,
        "fitted_mean_max_prob": float(softmax(fitted * c, axis=1).max(1).mean()),
    }


def print_inspection(info: dict[str, Any]) -> None:
    """Print :func:`inspect_cache`'s result as plain-text tables."""
    im, b = info["images"], info["bytes_per_image"]
    print(f"cache        {info['path']}")
    print(
        f"fingerprint  {info['fingerprint_sha256'][:12]}  teacher={info['fingerprint']['teacher']['type']}"
        f"  weights={info['fingerprint']['teacher']['weights']}  dtype={info['dtype']}"
    )
    print(f"complete     {info['complete']}")
    print(
        f"images       {im['total']} total, {im['done']} done, {im['skipped']} skipped, "
        f"{im['todo']} todo"
        + (f"  (skips: {info['skip_reasons']})" if info["skip_reasons"] else "")
    )
    print(
        f"disk         {info['bytes_on_disk'] / 1e6:.2f} MB total; per done image "
        f"{b['mean'] / 1e3:.1f} KB mean, {b['min'] / 1e3:.1f}-{b['max'] / 1e3:.1f} KB"
    )
    header = ("level", "ch", "teacher ch", "grid", "PCA var", "mean", "std", "min", "max")
    rows = []
    for name, s in info["levels"].items():
        var = s["pca_explained_variance"]
        rows.append(
            (
                name,
                str(s["channels"]),
                str(s["teacher_channels"]),
                "x".join(map(str, s["grid"])),
                "-" if var is None else f"{100 * var:.1f}%",
                f"{s['mean']:.4g}",
                f"{s['std']:.4g}",
                f"{s['min']:.4g}",
                f"{s['max']:.4g}",
            )
        )
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    print(f"feature statistics over {info['stats_images']} done image(s):")
    for r in (header, *rows):
        print("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)))
    if info["prototype_counts"] is not None:
        print(f"prototypes   segments per class {info['prototype_counts']}")
        cal = info.get("calibration")
        if cal:
            print(
                f"calibration  {cal['segments']} segments, prototype accuracy "
                f"{100 * cal['accuracy']:.1f}%; cache.prototype_scale {cal['prototype_scale']:g}: "
                f"NLL {cal['nll']:.3f}, mean max prob {cal['mean_max_prob']:.2f}; "
                f"NLL-optimal scale {cal['fitted_scale']:.1f}: NLL {cal['fitted_nll']:.3f}, "
                f"mean max prob {cal['fitted_mean_max_prob']:.2f}"
            )
    else:
        print("prototypes   missing")


def verify_cache(path: str | Path, progress: bool = True) -> list[str]:
    """Problems of a cache, one line each (empty = healthy).

    Checks: the manifest's fingerprint digest and the folder name, the PCA digest, images still
    todo, skipped images without a reason, missing chunks (one line per done image and array
    whose chunk file is gone), NaN/inf in any stored array of every done image, segment arrays
    that disagree, and the class prototypes (present, with data, shape, finite).
    """
    path = Path(path)
    try:
        store = CacheStore.open(path)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems: list[str] = []
    lay = store.layout
    sha = fingerprint_sha256(store.fingerprint)
    if sha != store.fingerprint_sha256:
        problems.append(
            f"{MANIFEST_FILE}: fingerprint_sha256 {store.fingerprint_sha256[:12]} does "
            f"not match its fingerprint (sha256 {sha[:12]}); the manifest was edited"
        )
    if not path.resolve().name.endswith(sha[:12]):
        problems.append(
            f"folder name {path.resolve().name!r} does not end with the fingerprint "
            f"digest {sha[:12]}"
        )
    if store.pca_fitted:
        try:
            actual = basis_sha256(store.read_pca())
            if actual != store.manifest["pca"]["sha256"]:
                problems.append(
                    f"PCA basis sha256 {actual[:12]} differs from the manifest's "
                    f"{store.manifest['pca']['sha256'][:12]}"
                )
        except (KeyError, ValueError) as exc:
            problems.append(f"PCA basis unreadable: {exc}")
    elif any(lay.pca_levels):
        problems.append("no PCA basis stored (the build stopped before its PCA pass finished)")

    status = store.status()
    todo = np.flatnonzero(status == STATUS_TODO)
    if todo.size:
        ids = ", ".join(repr(lay.image_ids[i]) for i in todo[:5])
        problems.append(
            f"{todo.size} image(s) incomplete (status todo), e.g. {ids}"
            + ("; COMPLETE.json claims the build finished" if store.complete else "")
        )
    for i in np.flatnonzero(status == STATUS_SKIPPED):
        if store.skip_info(int(i)) is None:
            problems.append(f"image {lay.image_ids[i]!r} is skipped but has no skips/{i:08d}.json")
    for i in tqdm(
        np.flatnonzero(status == STATUS_DONE), desc="verify", unit="img", disable=not progress
    ):
        image_id = lay.image_ids[i]
        missing = store.missing_chunks(int(i))
        if missing:
            problems.extend(
                f"image {image_id!r} (index {i}): chunk of {name} is missing" for name in missing
            )
            continue
        try:
            item = store.read_image(int(i))
        except Exception as exc:  # a corrupt chunk: report, keep checking
            problems.append(f"image {image_id!r}: unreadable ({type(exc).__name__}: {exc})")
            continue
        for name, f in zip(lay.level_names, item["features"]):
            if not np.isfinite(f).all():
                problems.append(f"image {image_id!r}: NaN/inf in features/{name}")
        for key in ("mask_logits", "iou", "embeddings"):
            if not np.isfinite(item[key]).all():
                problems.append(f"image {image_id!r}: NaN/inf in segments/{key}")
        labels = item["labels"]
        if labels.shape != item["segment_ids"].shape:
            problems.append(
                f"image {image_id!r}: {labels.size} labels for "
                f"{item['segment_ids'].size} segment ids"
            )
        elif labels.size and (labels.min() < 0 or labels.max() >= lay.num_classes):
            problems.append(f"image {image_id!r}: labels outside [0, {lay.num_classes})")
    if not store.has_prototypes():
        problems.append("class prototypes missing (the build did not finish)")
    else:
        try:
            protos = store.read_prototypes()
        except CacheIntegrityError as exc:
            problems.append(str(exc))
            protos = None
        if protos is None:
            pass
        elif protos.shape != (lay.num_classes, lay.embed_dim) or not np.isfinite(protos).all():
            problems.append(
                f"class prototypes malformed: shape {protos.shape}, finite "
                f"{bool(np.isfinite(protos).all())}"
            )
    if store.complete is None and not todo.size:
        problems.append(
            "COMPLETE.json missing although no image is todo (the final pass did not run)"
        )
    return problems
