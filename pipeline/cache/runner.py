"""Stage one: run the SAM teacher once over a split and fill the Zarr cache, with dask.distributed.

:func:`build_cache` makes three passes over a dask cluster:

1. **PCA.** Levels wider than ``cache.channels`` need a basis first. The teacher runs on
   ``cache.pca_samples`` evenly spaced images; each task returns float64 moments of its image's
   feature vectors (valid cells only) and the moments are summed along the fixed tree of
   :func:`pipeline.cache.pca.tree_reduce`, so the basis is bit-identical for any worker count.
   The moments and the eigendecomposition run their BLAS/LAPACK calls on one thread wherever
   they run (:mod:`pipeline.cache.pca` pins it with threadpoolctl; LAPACK's bits depend on its
   thread count), so Snakemake's and the CLI's thread settings give the same basis. The basis is stored and its sha256 recorded in
   ``manifest.json``; a resumed build reuses it.
2. **Images.** One task per image still marked todo. The worker runs the teacher, projects the
   features, quantises and writes the image's chunks straight into the store, ``status`` last.
   Bad samples (missing/corrupt files, no non-crowd segment, ...) are recorded as skipped (status
   2, reason in ``skips/<index>.json``), never as done. A tqdm bar shows images/s and the ETA.
3. **Prototypes.** Per-class sums of the stored segment embeddings, tree-reduced the same way,
   give one unit prototype per class. Then ``COMPLETE.json`` is written.

Killing the job at any moment loses at most the images in flight: rerunning skips every image
whose status is set and ends with the same store as an uninterrupted run. Snakemake declares
only ``COMPLETE.json`` as output, so it never deletes the store of a failed job.

Workers load the teacher once per process (module-level cache keyed by the cache fingerprint)
and run one task at a time (``threads_per_worker=1`` in dask terms: the teacher's forward hooks
are not re-entrant); ``cache.threads_per_worker`` sets each worker's torch intra-op threads.

Clusters. By default a :class:`distributed.LocalCluster` with one worker per visible GPU (worker
``i`` uses ``cuda:i``), or on a CPU-only machine ``cache.n_workers`` workers (default
``min(4, cpu_count // cache.threads_per_worker)``). To use a cluster started elsewhere pass its
address (``cache.scheduler_address`` or ``--scheduler-address``); the store path must be on a
file system every worker sees. With dask-jobqueue on SLURM, for example::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=8, processes=1, memory="48GB", walltime="24:00:00",
                           job_extra_directives=["--gres=gpu:1"],
                           job_script_prologue=["source .venv/bin/activate"])
    cluster.scale(jobs=8)            # 8 GPU workers
    print(cluster.scheduler_address)  # tcp://10.0.0.5:8786

and then ``python -m pipeline cache-teacher --config ... --scheduler-address tcp://10.0.0.5:8786``
(or ``snakemake cache_teacher --config ...`` with ``cache.scheduler_address`` set). Workers
joining or dying mid-run are fine: dask reschedules their tasks and every write is per image.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.fingerprint import (
    TEACHER_INIT_SEED,
    UNLABELED_SPLIT,
    cache_dir,
    cache_marker,
    check_annotations,
    fingerprint_sha256,
    resolve_layers,
    teacher_fingerprint,
)
from pipeline.cache.pca import (
    Moments,
    PcaBasis,
    feature_moments,
    fit_pca,
    merge_moments,
    tree_reduce,
    valid_cells,
)
from pipeline.cache.prototypes import ClassSums, class_sums, merge_class_sums, prototypes_from_sums
from pipeline.cache.store import (
    STATUS_DONE,
    STATUS_NAMES,
    STATUS_SKIPPED,
    STATUS_TODO,
    CacheLayout,
    CacheStore,
    translate_os_errors,
)
from pipeline.config import AutomaticConfig, Config, TeacherConfig
from pipeline.teacher.adapted import effective_teacher

__all__ = [
    "CacheJob",
    "build_cache",
    "cache_layout",
    "default_n_workers",
    "pca_sample_indices",
    "raw_bytes_per_image",
]

log = logging.getLogger(__name__)

PROTOTYPE_BLOCK = 256  # images per leaf of the prototype reduction (fixes the tree)


# ------------------------------------------------------------------------------ planning
def cache_layout(cfg: Config, dataset: Any) -> CacheLayout:
    """The :class:`CacheLayout` of ``cfg``'s teacher over ``dataset`` (no model is built)."""
    from pipeline.teacher.sam_builder import PATCH_SIZE, PROMPT_EMBED_DIM, spec_for

    spec = spec_for(cfg.teacher.type, cfg.teacher.tiny)
    layers = resolve_layers(cfg.teacher)
    bad = [x for x in layers if x != "neck" and not (isinstance(x, int) and 0 <= x < spec.depth)]
    if bad or len(set(map(str, layers))) != len(layers):
        raise ValueError(
            f"teacher.layers={layers}: expected distinct block indices in "
            f"[0, {spec.depth}) and/or 'neck'"
        )
    teacher_channels = [PROMPT_EMBED_DIM if x == "neck" else spec.embed_dim for x in layers]
    g = spec.img_size // PATCH_SIZE
    return CacheLayout(
        image_ids=list(dataset.image_ids),
        level_names=["neck" if x == "neck" else f"block{x}" for x in layers],
        teacher_channels=teacher_channels,
        level_channels=[min(c, cfg.cache.channels) for c in teacher_channels],
        grid_sizes=[(g, g)] * len(layers),
        input_size=spec.img_size,
        mask_size=cfg.cache.mask_size,
        max_segments=cfg.cache.max_segments,
        embed_dim=PROMPT_EMBED_DIM,
        dtype=cfg.cache.dtype,
        compressor=cfg.cache.compressor,
        clevel=cfg.cache.clevel,
        categories=[
            {"id": c.id, "name": c.name, "isthing": bool(c.isthing), "train_id": c.train_id}
            for c in dataset.categories
        ],
    )


def raw_bytes_per_image(layout: CacheLayout, num_segments: int | None = None) -> int:
    """Uncompressed bytes of one image's chunks with ``num_segments`` segments (default: the
    padded capacity ``max_segments``, i.e. what zarr stores before compression)."""
    item = 1 if layout.dtype == "int8" else 2
    quant = 8 if layout.dtype == "int8" else 0  # float32 scale + offset per channel / segment
    p = layout.max_segments if num_segments is None else num_segments
    feats = sum(
        c * h * w * item + c * quant for c, (h, w) in zip(layout.level_channels, layout.grid_sizes)
    )
    per_segment = layout.mask_size**2 * item + quant + 8 + 8 + 4 + 4 * layout.embed_dim
    return feats + p * per_segment + 8 + 1  # + orig_size + status


def pca_sample_indices(num_images: int, num_samples: int) -> list[int]:
    """``min(num_samples, N)`` distinct, evenly spaced dataset indices: ``floor(i N / k)``."""
    k = min(num_samples, num_images)
    return [(i * num_images) // k for i in range(k)]


def default_n_workers(threads_per_worker: int, configured: int | None = None) -> int:
    """One worker per visible GPU; otherwise ``configured`` or ``min(4, cpus // threads)``."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    if configured is not None:
        return configured
    return max(1, min(4, (os.cpu_count() or 1) // threads_per_worker))


def _check_segment_counts(dataset: Any, max_segments: int) -> None:
    over = []
    for i in range(len(dataset)):
        n = sum(1 for s in dataset.segments(i) if not s["iscrowd"])
        if n > max_segments:
            over.append(f"image_id {dataset.image_ids[i]!r} ({n} segments)")
    if over:
        raise ValueError(
            f"{dataset.json_path}: {len(over)} image(s) list more non-crowd segments "
            f"than the cache's max_segments={max_segments}: {', '.join(over[:5])}"
            f"{' ...' if len(over) > 5 else ''}; raise cache.max_segments"
        )


# ------------------------------------------------------------------------------ worker side
@dataclass(frozen=True)
class CacheJob:
    """What every task needs to know (small; pickled with each task).

    Attributes:
      path: the cache directory.
      key: fingerprint sha256 (keys the per-process teacher cache).
      teacher: the teacher section of the config.
      mask_size, points_per_stuff: extractor settings.
      threads: torch intra-op threads per worker.
      image_dir, json_path, png_dir: the split.
    """

    path: str
    key: str
    teacher: TeacherConfig
    mask_size: int
    threads: int
    image_dir: str
    json_path: str
    png_dir: str
    unlabeled: tuple[tuple[str, str], ...] | None = None  # (image_id, path) per image
    automatic: AutomaticConfig | None = None
    max_segments: int | None = None
    labeled: tuple[int, ...] | None = None  # train indices whose segments make the prototypes


@dataclass
class _WorkerState:
    extractor: Any
    dataset: Any
    store: CacheStore
    isthing: list[bool]
    bases: dict[str, list[PcaBasis | None]] = field(default_factory=dict)
    prototypes: np.ndarray | None = None

    def pca_bases(self, pca_sha: str | None, num_levels: int) -> list[PcaBasis | None]:
        if pca_sha is None:
            return [None] * num_levels
        if pca_sha not in self.bases:
            self.bases[pca_sha] = CacheStore.open(self.store.path).read_pca()
        return self.bases[pca_sha]


_STATE: dict[tuple[str, str], _WorkerState] = {}  # per process: (path, fingerprint) -> state


def _worker_device(device: str) -> str:
    import torch

    from pipeline.device import resolve_device

    if device != "auto" or not torch.cuda.is_available():
        return str(resolve_device(device))
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        name = None
    if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
        return str(resolve_device("auto", int(name) % torch.cuda.device_count()))
    return str(resolve_device("auto"))


def _worker_state(job: CacheJob) -> _WorkerState:
    """The teacher, dataset and store of ``job`` in this process, built on first use."""
    state = _STATE.get((job.path, job.key))
    if state is None:
        import torch

        from pipeline.data.coco_panoptic import PanopticDataset
        from pipeline.teacher.extractor import TeacherExtractor
        from pipeline.teacher.sam_builder import build_teacher

        torch.set_num_threads(job.threads)
        t = job.teacher
        sam = build_teacher(t.type, t.checkpoint, t.tiny, seed=TEACHER_INIT_SEED)
        extractor = TeacherExtractor(
            sam,
            resolve_layers(t),
            mask_size=job.mask_size,
            points_per_stuff=t.points_per_stuff,
            device=_worker_device(t.device),
        )
        if job.unlabeled is not None:
            from pipeline.data.unlabeled import UnlabeledDataset, UnlabeledImage

            dataset = UnlabeledDataset(
                [UnlabeledImage(i, Path(p)) for i, p in job.unlabeled], on_bad_sample="skip"
            )
        else:
            dataset = PanopticDataset(
                job.image_dir, job.json_path, job.png_dir, transform=None, on_bad_sample="skip"
            )
        store = CacheStore(job.path, writable=True)
        isthing = [bool(c["isthing"]) for c in store.layout.categories]
        state = _STATE[(job.path, job.key)] = _WorkerState(extractor, dataset, store, isthing)
    return state


def _image_context(exc: BaseException, state: _WorkerState, index: int) -> None:
    where = getattr(state.dataset, "json_path", None) or "unlabelled images"
    exc.add_note(
        f"while caching image_id {state.dataset.image_ids[index]!r} (dataset index "
        f"{index}, {where})"
    )


def pca_moments_task(job: CacheJob, index: int, reduced: Sequence[bool]) -> list[Moments | None]:
    """Per reduced level, the moments of image ``index``'s features over its valid cells
    (zero moments for a bad sample); None for levels kept at full width."""
    state = _worker_state(job)
    sample = state.dataset[index]
    levels = state.extractor.level_channels
    if "skip_reason" in sample:
        return [Moments.zeros(c) if r else None for c, r in zip(levels, reduced)]
    try:
        from pipeline.cache.record import image_hwc, prompt_seed

        out = state.extractor.extract(
            image_hwc(sample["image"]), [], prompt_seed(sample["image_id"])
        )
        result: list[Moments | None] = []
        for f, r in zip(out.features, reduced):
            if not r:
                result.append(None)
                continue
            if not np.isfinite(f).all():
                raise ValueError("the teacher produced NaN or inf features")
            mask = valid_cells(out.orig_size, out.input_size, f.shape[1:])
            result.append(feature_moments(f, mask))
        return result
    except Exception as exc:
        _image_context(exc, state, index)
        raise


def merge_level_moments(
    a: Sequence[Moments | None], b: Sequence[Moments | None]
) -> list[Moments | None]:
    """Level-wise :func:`pipeline.cache.pca.merge_moments`."""
    return [None if x is None else merge_moments(x, y) for x, y in zip(a, b)]


def fit_level_bases(
    moments: Sequence[Moments | None], channels: Sequence[int]
) -> list[PcaBasis | None]:
    """:func:`pipeline.cache.pca.fit_pca` per reduced level (None elsewhere)."""
    return [fit_pca(m, k) if m is not None else None for m, k in zip(moments, channels)]


def cache_image_task(job: CacheJob, index: int, pca_sha: str | None) -> dict[str, Any]:
    """Run the teacher on image ``index`` and write it (or its skip record) to the store."""
    from pipeline.cache.record import sample_record

    state = _worker_state(job)
    start = time.perf_counter()
    sample = state.dataset[index]
    if "skip_reason" in sample:
        state.store.write_skip(
            index,
            sample["skip_reason"],
            sample.get("message", ""),
            file_name=sample.get("file_name"),
        )
        return {
            "index": index,
            "status": STATUS_SKIPPED,
            "reason": sample["skip_reason"],
            "seconds": time.perf_counter() - start,
        }
    try:
        bases = state.pca_bases(pca_sha, len(state.store.layout.level_names))
        if job.unlabeled is not None:
            record = _unlabeled_record(job, state, sample, bases)
        else:
            record, _ = sample_record(state.extractor, sample, state.isthing, bases)
        state.store.write_image(index, record)
    except Exception as exc:
        _image_context(exc, state, index)
        raise
    return {
        "index": index,
        "status": STATUS_DONE,
        "reason": None,
        "seconds": time.perf_counter() - start,
    }


def pseudo_labels(
    embeddings: np.ndarray,
    iou: np.ndarray,
    stability: np.ndarray,
    prototypes: np.ndarray,
    scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-class and confidence of automatic segments.

    ``cls = prototype_scale * cos(embedding, prototype_k)`` (the soft labels the reader returns);
    the pseudo-class is its argmax and the confidence is
    ``predicted_iou * stability_score * max_k softmax(cls)_k``
    (:data:`pipeline.cache.fingerprint.CONFIDENCE_RULE`).

    Arguments:
      embeddings: ``[M, 256]``; iou, stability: ``[M]``; prototypes: ``[K, 256]`` unit rows.

    Returns:
      int64 ``[M]`` pseudo-classes and float32 ``[M]`` confidences.
    """
    import torch

    from pipeline.cache.prototypes import class_logits

    if embeddings.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    logits = class_logits(torch.from_numpy(embeddings), torch.from_numpy(prototypes), scale)
    prob = logits.softmax(1)
    top, label = prob.max(1)
    confidence = np.asarray(iou, np.float32) * np.asarray(stability, np.float32) * top.numpy()
    return label.numpy().astype(np.int64), confidence.astype(np.float32)


def _unlabeled_record(
    job: CacheJob, state: _WorkerState, sample: dict[str, Any], bases: Sequence[PcaBasis | None]
) -> Any:
    from pipeline.cache.record import image_hwc, project_output
    from pipeline.cache.store import ImageRecord

    if state.prototypes is None:
        state.prototypes = CacheStore.open(state.store.path).read_prototypes()
    out, stability = state.extractor.extract_automatic(
        image_hwc(sample["image"]), job.automatic, max_segments=job.max_segments
    )
    labels, confidence = pseudo_labels(
        out.embeddings,
        out.iou,
        stability,
        state.prototypes,
        float(state.store.fingerprint["prototype_scale"]),
    )
    return ImageRecord(
        features=project_output(out, bases),
        mask_logits=out.mask_logits,
        iou=out.iou,
        embeddings=out.embeddings,
        segment_ids=out.segment_ids,
        labels=labels,
        orig_size=out.orig_size,
        stability=stability,
        confidence=confidence,
    )


def class_sums_task(job: CacheJob, start: int, stop: int, num_classes: int) -> ClassSums:
    """Per-class sums of the unit embeddings of the done images in ``[start, stop)``, summed in
    index order (only the labelled subset's images when ``job.labeled`` is set)."""
    store = _worker_state(job).store
    status = store.array("status")[start:stop]
    total = ClassSums.zeros(num_classes, store.layout.embed_dim)
    labeled = None if job.labeled is None else set(job.labeled)
    for offset, s in enumerate(status):
        if labeled is not None and start + offset not in labeled:
            continue
        if s == STATUS_DONE:
            emb, labels = store.read_segments(start + offset)
            total = merge_class_sums(total, class_sums(emb, labels, num_classes))
    return total


# ------------------------------------------------------------------------------ client side
@contextlib.contextmanager
def _dask_client(address: str | None, n_workers: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if address:
        with Client(address) as client:
            log.info(
                "joined dask cluster %s (%d workers)",
                address,
                len(client.scheduler_info()["workers"]),
            )
            yield client
        return
    chatter = logging.getLogger("distributed")  # its INFO lines would drown the progress bar
    level = chatter.level
    chatter.setLevel(max(level, logging.WARNING))
    # LocalCluster sets OMP/MKL/OPENBLAS_NUM_THREADS=1 (and more) in this process's environment
    # for its workers; restore it so later work in the caller (and its subprocesses) keeps its
    # threads.
    saved_env = dict(os.environ)
    try:
        # memory_limit=0: the teacher's footprint is fixed, no spilling/restarts wanted
        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                memory_limit=0,
                silence_logs=logging.WARNING,
            ) as cluster,
            Client(cluster) as client,
        ):
            log.info("started a LocalCluster with %d worker(s)", n_workers)
            yield client
    finally:
        chatter.setLevel(level)
        os.environ.clear()
        os.environ.update(saved_env)


def _gather_with_progress(
    futures: Sequence[Any], desc: str, progress: bool, on_result: Any = None
) -> None:
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(
        total=len(futures), desc=desc, unit="img", disable=not progress, smoothing=0.05
    ) as bar:
        for fut in as_completed(futures):
            try:
                result = fut.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            if on_result is not None:
                postfix = on_result(result)
                if postfix:
                    bar.set_postfix(postfix, refresh=False)
            bar.update()


def _fit_pca(
    client: Any, job: CacheJob, layout: CacheLayout, pca_samples: int, progress: bool
) -> list[PcaBasis | None]:
    reduced = layout.pca_levels
    indices = pca_sample_indices(layout.num_images, pca_samples)
    leaves = client.map(
        pca_moments_task, [job] * len(indices), indices, reduced=list(reduced), pure=False
    )
    root = tree_reduce(leaves, lambda a, b: client.submit(merge_level_moments, a, b, pure=False))
    # fit_pca pins LAPACK to one thread itself (its bits depend on the thread count)
    fitted = client.submit(fit_level_bases, root, list(layout.level_channels), pure=False)
    _gather_with_progress(leaves, "cache_teacher PCA", progress)
    del leaves, root
    bases = fitted.result()
    for name, b in zip(layout.level_names, bases):
        if b is not None:
            log.info(
                "PCA %s: %d -> %d channels keep %.1f%% of the variance (%d vectors)",
                name,
                b.mean.shape[0],
                b.components.shape[1],
                100 * b.explained_variance_ratio,
                b.num_samples,
            )
    return bases


def _disk_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def _write_completion(
    store: CacheStore,
    path: Path,
    split: str,
    layout: CacheLayout,
    prototype_counts: Sequence[int],
    todo: Sequence[int],
    workers: Any,
    elapsed: float,
) -> None:
    """Check that every image is done or skipped, then write ``COMPLETE.json`` and log it."""
    status = store.status()
    if (status == STATUS_TODO).any():  # cannot happen unless a task was lost silently
        raise RuntimeError(
            f"{path}: {int((status == STATUS_TODO).sum())} images still todo after "
            "the pass; rerun to resume"
        )
    skipped = [int(i) for i in np.flatnonzero(status == STATUS_SKIPPED)]
    skip_reasons = Counter(store.skip_info(i)["reason"] for i in skipped)  # type: ignore[index]
    done = int((status == STATUS_DONE).sum())
    disk = _disk_bytes(path)
    summary = {
        "path": str(path),
        "split": split,
        "fingerprint_sha256": store.fingerprint_sha256,
        "pca_sha256": store.manifest["pca"]["sha256"],
        "num_images": layout.num_images,
        "done": done,
        "skipped": len(skipped),
        "skipped_indices": skipped,
        "skip_reasons": dict(skip_reasons),
        "prototype_counts": [int(c) for c in prototype_counts],
        "bytes_on_disk": disk,
        "bytes_per_done_image": disk / max(done, 1),
        "raw_bytes_per_image_padded": raw_bytes_per_image(layout),
        "seconds_this_run": round(elapsed, 3),
        "images_this_run": len(todo),
        "workers": workers,
    }
    store.write_complete(summary)
    if skipped:
        log.warning(
            "skipped %d image(s): %s (details in %s/skips/)", len(skipped), dict(skip_reasons), path
        )
    log.info(
        "teacher cache complete: %s (%d done, %.0f KB per image on disk)",
        path,
        done,
        summary["bytes_per_done_image"] / 1024,
    )


def build_cache(
    cfg: Config,
    split: str = "train",
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Build (or resume) the teacher cache of ``split`` and return its directory.

    Arguments:
      cfg: the experiment config (``teacher``, ``cache`` and ``data`` sections are used).
      split: ``"train"`` or ``"val"``.
      scheduler_address: join this dask scheduler (default ``cfg.cache.scheduler_address``;
        None = start a LocalCluster).
      n_workers: LocalCluster size (default: :func:`default_n_workers`).
      progress: show tqdm bars.

    Returns:
      ``cache_dir(cfg, split)``, holding ``COMPLETE.json`` once done.

    Raises:
      CacheWriteError: the directory cannot be created or written (names the path).
      FingerprintMismatchError: the directory holds a cache of other settings.
      ValueError: an image exceeds ``max_segments`` or the teacher produced NaN/inf (names the
        image).
    """
    from pipeline.data.coco_panoptic import PanopticDataset
    from pipeline.teacher.sam_builder import sha256_file

    if split == UNLABELED_SPLIT:
        return build_unlabeled_cache(cfg, scheduler_address, n_workers, progress)
    started = time.perf_counter()
    fingerprint = teacher_fingerprint(cfg, split)
    path = cache_dir(cfg, split)
    image_dir, json_path, png_dir = cfg.split_paths(split)  # type: ignore[arg-type]
    if (path / "COMPLETE.json").is_file():
        done = CacheStore.open(path)
        done.check_fingerprint(fingerprint)
        check_annotations(path, done.manifest.get("annotation_sha256"), json_path)
        log.info("teacher cache %s is complete; nothing to do", path)
        _write_marker(cfg, split, path, fingerprint)
        return path

    dataset = PanopticDataset(image_dir, json_path, png_dir, transform=None, on_bad_sample="skip")
    layout = cache_layout(cfg, dataset)
    _check_segment_counts(dataset, layout.max_segments)
    store = CacheStore.create_or_open(
        path, fingerprint, layout, annotation_sha256=sha256_file(json_path)
    )
    job = CacheJob(
        path=str(path),
        key=fingerprint_sha256(fingerprint),
        teacher=effective_teacher(cfg),
        mask_size=cfg.cache.mask_size,
        threads=cfg.cache.threads_per_worker,
        image_dir=str(image_dir),
        json_path=str(json_path),
        png_dir=str(png_dir),
        labeled=_labeled_subset(cfg, split, len(dataset)),
    )
    return _run_passes(
        cfg,
        split,
        path,
        fingerprint,
        store,
        layout,
        job,
        scheduler_address,
        n_workers,
        progress,
        started,
    )


def _labeled_subset(cfg: Config, split: str, num_images: int) -> tuple[int, ...] | None:
    if split != "train" or cfg.data.labeled_fraction >= 1:
        return None
    from pipeline.data.unlabeled import labeled_indices

    return tuple(
        labeled_indices(num_images, cfg.data.labeled_fraction, cfg.data.labeled_seed).tolist()
    )


def build_unlabeled_cache(
    cfg: Config,
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Build (or resume) the cache of the unlabelled images (split ``"unlabeled"``).

    Needs the finished train cache: its PCA bases project the features (so a student's adapters
    see one feature space) and its class prototypes give the pseudo-classes. Each image gets
    SAM's automatic segments (:meth:`TeacherExtractor.extract_automatic`), stored like prompted
    ones, with ``labels`` = pseudo-class and ``stability``/``confidence`` (:func:`pseudo_labels`).
    The prototypes are copied, so the reader returns soft labels exactly as for labelled images.
    Resumption, skips, workers and ``COMPLETE.json`` work as for :func:`build_cache`.
    """
    from pipeline.cache.reader import TeacherCache
    from pipeline.data.unlabeled import unlabeled_images

    started = time.perf_counter()
    split = UNLABELED_SPLIT
    fingerprint = teacher_fingerprint(cfg, split)
    path = cache_dir(cfg, split)
    if (path / "COMPLETE.json").is_file():
        CacheStore.open(path).check_fingerprint(fingerprint)
        log.info("teacher cache %s is complete; nothing to do", path)
        _write_marker(cfg, split, path, fingerprint)
        return path
    if not cfg.has_unlabeled:
        raise ValueError(
            "no unlabelled images in this config: set data.unlabeled and/or "
            "data.labeled_fraction < 1"
        )
    train = TeacherCache.for_config(cfg, "train")
    train_store = CacheStore.open(train.path)
    images = unlabeled_images(cfg)
    if not images:
        raise ValueError("data.unlabeled and the held-out train images list no image")
    layout = replace(train_store.layout, image_ids=[i.image_id for i in images], unlabeled=True)
    store = CacheStore.create_or_open(path, fingerprint, layout)
    if not store.pca_fitted:
        store.write_pca(train_store.read_pca())
    if not store.has_prototypes():
        store.write_prototypes(
            train_store.read_prototypes(), train_store.array("prototypes/counts")[...]
        )
    job = CacheJob(
        path=str(path),
        key=fingerprint_sha256(fingerprint),
        teacher=effective_teacher(cfg),
        mask_size=cfg.cache.mask_size,
        threads=cfg.cache.threads_per_worker,
        image_dir="",
        json_path="",
        png_dir="",
        unlabeled=tuple((i.image_id, str(i.path)) for i in images),
        automatic=cfg.teacher.automatic,
        max_segments=cfg.cache.max_segments,
    )
    return _run_passes(
        cfg,
        split,
        path,
        fingerprint,
        store,
        layout,
        job,
        scheduler_address,
        n_workers,
        progress,
        started,
    )


def _run_passes(
    cfg: Config,
    split: str,
    path: Path,
    fingerprint: dict[str, Any],
    store: CacheStore,
    layout: CacheLayout,
    job: CacheJob,
    scheduler_address: str | None,
    n_workers: int | None,
    progress: bool,
    started: float,
) -> Path:
    """The PCA, image and prototype passes of a cache build (PCA and prototypes only when the
    store has none yet: an unlabelled cache copies the train cache's)."""
    status = store.status()
    todo = [int(i) for i in np.flatnonzero(status == STATUS_TODO)]
    log.info(
        "teacher cache %s: %d images, %d done, %d skipped, %d to do",
        path,
        len(status),
        int((status == STATUS_DONE).sum()),
        int((status == STATUS_SKIPPED).sum()),
        len(todo),
    )
    estimate = len(todo) * raw_bytes_per_image(layout, 16) // 2
    with translate_os_errors(path, "cannot check free space of"):
        free = shutil.disk_usage(path).free
    if free < estimate:
        log.warning(
            "%s: %.1f GB free, the remaining images may need about %.1f GB",
            path,
            free / 1e9,
            estimate / 1e9,
        )

    address = scheduler_address or cfg.cache.scheduler_address
    workers = n_workers or default_n_workers(cfg.cache.threads_per_worker, cfg.cache.n_workers)
    reasons: Counter[str] = Counter()
    with _dask_client(address, workers) as client:
        if not store.pca_fitted:
            if any(layout.pca_levels):
                store.write_pca(_fit_pca(client, job, layout, cfg.cache.pca_samples, progress))
            else:
                store.write_pca([None] * len(layout.level_names))
        pca_sha = store.manifest["pca"]["sha256"] if any(layout.pca_levels) else None

        def count(result: dict[str, Any]) -> dict[str, Any]:
            reasons[STATUS_NAMES[result["status"]]] += 1
            return {"skipped": reasons["skipped"]} if reasons["skipped"] else {}

        futures = client.map(cache_image_task, [job] * len(todo), todo, pca_sha=pca_sha, pure=False)
        _gather_with_progress(futures, f"cache_teacher {split}", progress, count)
        del futures

        if layout.unlabeled:
            sums = None
        else:
            sums = _prototype_pass(client, job, layout)
    if sums is not None:
        store.write_prototypes(prototypes_from_sums(sums), sums.count)
    counts = sums.count if sums is not None else store.array("prototypes/counts")[...]

    _write_completion(
        store,
        path,
        split,
        layout,
        counts,
        todo,
        workers if not address else address,
        time.perf_counter() - started,
    )
    _write_marker(cfg, split, path, fingerprint)
    return path


def _prototype_pass(client: Any, job: CacheJob, layout: CacheLayout) -> ClassSums:
    """Per-class embedding sums over the store, tree-reduced (worker-count independent)."""
    blocks = list(range(0, layout.num_images, PROTOTYPE_BLOCK))
    leaves = client.map(
        class_sums_task,
        [job] * len(blocks),
        blocks,
        [min(b + PROTOTYPE_BLOCK, layout.num_images) for b in blocks],
        num_classes=layout.num_classes,
        pure=False,
    )
    sums = tree_reduce(leaves, lambda a, b: client.submit(merge_class_sums, a, b, pure=False))
    del leaves
    return sums.result()


def _write_marker(cfg: Config, split: str, path: Path, fingerprint: dict[str, Any]) -> None:
    """With an adapted teacher, point :func:`cache_marker` at the finished cache (atomically)."""
    marker = cache_marker(cfg, split)
    if marker == path / "COMPLETE.json":
        return
    record = {
        "cache_dir": str(path),
        "fingerprint_sha256": fingerprint_sha256(fingerprint),
        "teacher_checkpoint": fingerprint["teacher"]["weights"],
    }
    tmp = marker.with_name(f".{marker.name}.tmp{os.getpid()}")
    with translate_os_errors(marker, "cannot write the cache marker"):
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, marker)
