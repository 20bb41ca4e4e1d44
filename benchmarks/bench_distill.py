"""Benchmark the training step with and without RegSAM's distillations, on one machine in one run.

Five rows, each adding one thing to the row above, all trained on the same fixed batch:

1. ``baseline``: plain-average FPN fusion, no distillation;
2. ``+ learnable fusion``;
3. ``+ resolution distillation`` (DSRL: low-resolution pass, SR decoder, FA loss);
4. ``+ SAM distillation (cache)``: teacher targets read from the stage-one cache
   (``TeacherCache.get``) and warped onto the batch's views inside ``TrainStep``;
5. ``+ SAM distillation (live teacher)``: the same, but the teacher (``vit_b`` by default:
   official architecture, random weights) runs inline on the original images of the batch
   (:class:`pipeline.cache.live.LiveTeacher`, projected with the cache's PCA bases) before the
   step. This row shows what the cache saves.

``--decompose`` adds two diagnostic rows between 2 and 3 that run only part of the resolution
distillation (the low-resolution pass; then that pass and ``loss_sr``), and the report splits its
time into those parts; together with the per-step FLOPs they show what the design's
low-resolution pass costs by itself.

Every row is the real training step of :class:`pipeline.training.trainer.Trainer`: the trainer
builds the student, criterion, distillers, AdamW and schedule exactly as for a run
(``Trainer.build``) and one iteration is ``Trainer.step`` (forward of ``TrainStep``, backward,
gradient clipping, optimizer and scheduler step; autocast on CUDA as in training). The batch is
the first training batch of the config's seeded sampler (``ResumableBatchSampler``,
``EpochIndexed``, ``collate_training_batch``) over a small synthetic dataset, and its sha256 is
checked to be the same in every row.

Reported per row: median step time, peak memory, trainable parameters, ratios against the
baseline row and what the row adds over the row above (in units of the baseline). Step times are
measured side by side: each of ``--rounds`` fresh processes builds every row but the live one and
alternates their steps round-robin, so a slow stretch of a shared machine (other jobs, clock
changes: successive processes on the 2-core CI machine differ by up to 20 %) slows all rows
alike instead of the row that happened to run then; the median over the processes is reported,
with every process's own median alongside. Each row also runs alone in a fresh process, which
measures its memory (and gives its step time alone, for reference; the live row is timed only
there). Peak memory
is ``torch.cuda.max_memory_allocated`` (reset per row, minus what was allocated before) on
CUDA; on CPU it is the peak resident set size of the row's process
(``getrusage(RUSAGE_SELF).ru_maxrss``) minus its resident size before the batch was loaded,
i.e. the batch as the loader delivers it (with the teacher targets in rows 4-5) + model +
optimizer state + activations (+ the live teacher in row 5).

In training, the cache fetch of row 4 happens in the DataLoader workers, overlapped with the
step; it is timed on its own (``teacher fetch ms/batch``: ``TeacherSource.lookup`` for the whole
batch) and is not part of the step time. The live teacher of row 5 is part of its step time.

Issue goals (added time / memory in units of the baseline row): resolution distillation
<= +20 % time and <= +35 % memory; cached SAM distillation <= +10 % time.

Examples (from the repository root; the first takes about 9 minutes on 2 CPU cores, most of it
the vit_b teacher; the second measures the COCO-sized student of ``configs/coco`` at a crop a
CPU can step through)::

    python benchmarks/bench_distill.py --out benchmarks/results/distill.md
    python benchmarks/bench_distill.py --config configs/coco/regnet_distill.yaml --batch-size 2 \
        --crop 320 --iters 6 --skip-live --out benchmarks/results/distill_coco.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.config import Config, load_config
from pipeline.evaluation.complexity import (
    complexity_table,
    device_description,
    load_average,
    write_report,
)
from pipeline.device import resolve_device

DEFAULT_CONFIG = "configs/reg_sam/regnet_distill.yaml"
FETCH_REPEATS = 5

# goals of the issue, as (row key, quantity, limit on what the row adds in units of the baseline,
# the row it adds to)
GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("resolution_distill", "time", 0.20, "fusion"),
    ("resolution_distill", "memory", 0.35, "fusion"),
    ("sam_cache", "time", 0.10, "resolution_distill"),
)


# ------------------------------------------------------------------------------ rows
@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One benchmark row.

    Arguments:
        key: short identifier (``baseline``, ``fusion``, ...).
        label: the row's name in the table.
        overrides: config overrides (``key=value``) that switch the row's parts on or off.
        teacher: where SAM targets come from: None (no SAM distillation), ``"cache"`` or
            ``"live"``.
        part: diagnostic rows of ``--decompose`` only: ``"lr_path"`` (resolution distillation
            reduced to its low-resolution pass: backbone + neck on the down-scaled batch, forward
            and backward, with a zero-weighted stand-in loss) or ``"lr_path_sr"`` (that pass and
            ``loss_sr``, no ``loss_fa``).
    """

    key: str
    label: str
    overrides: tuple[str, ...]
    teacher: str | None = None
    part: str | None = None


def _switches(fusion: bool, resolution: bool, sam: bool) -> tuple[str, ...]:
    return (
        f"model.use_learnable_fusion={str(fusion).lower()}",
        f"model.use_resolution_distill={str(resolution).lower()}",
        f"model.use_sam_distill={str(sam).lower()}",
        # the live row swaps the teacher in after building (on the benchmark's device)
        "model.sam_distill.teacher_mode=cache",
    )


ROWS: tuple[RowSpec, ...] = (
    RowSpec("baseline", "baseline", _switches(False, False, False)),
    RowSpec("fusion", "+ learnable fusion", _switches(True, False, False)),
    RowSpec("resolution_distill", "+ resolution distillation", _switches(True, True, False)),
    RowSpec("sam_cache", "+ SAM distillation (cache)", _switches(True, True, True), "cache"),
    RowSpec("sam_live", "+ SAM distillation (live teacher)", _switches(True, True, True), "live"),
)


# --decompose: what the resolution distillation row is made of, between the fusion row and it
PARTS: tuple[RowSpec, ...] = (
    RowSpec(
        "rd_lr_path", "  (low-resolution pass only)", _switches(True, True, False), part="lr_path"
    ),
    RowSpec(
        "rd_lr_path_sr",
        "  (low-resolution pass + loss_sr)",
        _switches(True, True, False),
        part="lr_path_sr",
    ),
)


def select_rows(skip_live: bool, decompose: bool = False) -> list[RowSpec]:
    rows = [r for r in ROWS if not (skip_live and r.teacher == "live")]
    if decompose:
        at = [r.key for r in rows].index("resolution_distill")
        rows[at:at] = PARTS
    return rows


def _partial_resolution_distill(distiller: Any, part: str) -> Any:
    """A stand-in ``ResolutionDistiller.forward`` that computes only part of it (``--decompose``).

    The stand-in loss is multiplied by zero, so backward still runs through every op of the part
    (what the part costs) while the weights move as without it.
    """
    import torch.nn.functional as F

    def forward(
        student: Any, images_hr: torch.Tensor, feats_hr: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        images_lr, _ = distiller.low_resolution(images_hr)
        feat_lr = student.forward_features(images_lr)["mask_features"]
        total = 0.0 * feat_lr.float().mean()
        if part == "lr_path_sr":
            recon = distiller.sr_decoder(feat_lr)
            if recon.shape[-2:] != images_hr.shape[-2:]:
                recon = F.interpolate(
                    recon, size=images_hr.shape[-2:], mode="bilinear", align_corners=False
                )
            total = total + distiller.sr_loss_weight * F.mse_loss(recon.float(), images_hr.float())
        return {"loss_resolution_distill": total}

    return forward


def _apply_part(trainer: Any, row: RowSpec) -> None:
    if row.part is None:
        return
    if row.part not in ("lr_path", "lr_path_sr"):
        raise ValueError(f"unknown row part {row.part!r}")
    distiller = trainer.step_module.resolution_distiller
    distiller.forward = _partial_resolution_distill(distiller, row.part)


# ----------------------------------------------------------------------------- setup
def setup_overrides(
    workdir: Path, teacher: str, images: int, image_size: int, batch_size: int, crop: int
) -> list[str]:
    """Overrides that point a config at the benchmark's own data and cache under ``workdir``.

    Any student config works (e.g. ``configs/coco/regnet_distill.yaml``): the dataset becomes the
    synthetic one at the synthetic layout's split paths, and the teacher and backbone get random
    weights (no checkpoint files are read).
    """
    splits = [
        f"data.{split}.{key}={value}"
        for split in ("train", "val")
        for key, value in (
            ("images", split),
            ("json", f"annotations/panoptic_{split}.json"),
            ("png_dir", f"annotations/panoptic_{split}"),
        )
    ]
    return [
        "data.dataset=synthetic",
        f"data.root={workdir / 'data'}",
        *splits,
        f"data.synthetic.num_train={images}",
        "data.synthetic.num_val=1",
        f"data.synthetic.image_size=[{image_size}, {image_size}]",
        f"data.crop_size=[{crop}, {crop}]",
        "data.num_workers=0",
        f"teacher.type={teacher}",
        "teacher.checkpoint=null",
        "teacher_adapt.enabled=false",
        "model.backbone.pretrained_path=null",
        f"cache.root={workdir / 'cache'}",
        f"cache.pca_samples={images}",
        f"training.batch_size={batch_size}",
    ]


def prepare(config: str | Path, overrides: Sequence[str], progress: bool = False) -> dict[str, Any]:
    """Write the synthetic dataset and build (or reuse) the teacher cache of its train split.

    Returns:
        ``{"cache": path, "build_s": seconds, "layout": {...}}`` (``build_s`` is 0 when a
        finished cache was reused).
    """
    from pipeline.cache.reader import TeacherCache
    from pipeline.cache.runner import build_cache
    from pipeline.data.synthetic import generate_synthetic_coco_panoptic

    cfg = load_config(config, list(overrides))
    s = cfg.data.synthetic
    generate_synthetic_coco_panoptic(
        cfg.data.root,
        s.num_train,
        s.num_val,
        tuple(s.image_size),
        s.num_thing_classes,
        s.num_stuff_classes,
        s.seed,
        progress=progress,
    )
    start = time.perf_counter()
    path = build_cache(cfg, "train", n_workers=1, progress=progress)
    cache = TeacherCache(path)
    first = cache.get(cache.image_ids[0])
    return {
        "cache": str(path),
        "build_s": time.perf_counter() - start,
        "layout": {
            "teacher": cfg.teacher.type,
            "input_size": cache.input_size,
            "levels": cache.level_names,
            "channels": cache.level_channels,
            "grid": list(first["features"][0].shape[-2:]),
            "mask_size": int(first["mask_logits"].shape[-1]),
        },
    }


# ------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of what happens after :meth:`start`, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset at :meth:`start`) minus the bytes allocated
    at :meth:`start`. CPU: the process's peak resident set size (``ru_maxrss``) minus its resident
    size at :meth:`start` (``/proc/self/statm``; where that is missing, minus the peak at
    :meth:`start`). Meaningful for the CPU only in a fresh process whose earlier peak is small.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.peak_at_start = 0

    @staticmethod
    def rss_now() -> int | None:
        """Current resident set size in bytes (Linux ``/proc``; None elsewhere)."""
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        return pages * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def rss_peak() -> int:
        """Peak resident set size of this process in bytes (``ru_maxrss`` is KiB on Linux)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_at_start = self.rss_peak()
            now = self.rss_now()
            self.base = self.peak_at_start if now is None else now

    def peak(self) -> int:
        """Peak bytes since :meth:`start`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return self.rss_peak() - self.base

    @property
    def peak_was_before_start(self) -> bool:
        """CPU: the process peak has not grown since :meth:`start` (the row's own peak is lower
        than an earlier one, so :meth:`peak` over-states it)."""
        return self.device.type != "cuda" and self.rss_peak() <= self.peak_at_start


def batch_digest(batch: dict[str, Any]) -> str:
    """sha256 of what the step consumes: images, masks, labels, ignore maps and transforms."""
    h = hashlib.sha256(batch["images"].numpy().tobytes())
    for t in batch["targets"]:
        for key in ("masks", "labels", "ignore", "segment_ids"):
            h.update(t[key].numpy().tobytes())
        h.update(t["transform"].tobytes())
    return h.hexdigest()


def first_batch(
    cfg: Config, with_teacher: bool, keep_float16: bool = False
) -> tuple[Any, list[int], dict[str, Any], float | None]:
    """The first batch a training run of ``cfg`` sees, built as its DataLoader builds it.

    Arguments:
        cfg: the row's config.
        with_teacher: attach cached teacher targets (``sample["teacher"]``) as the DataLoader
            workers do (``EpochIndexed.__getitem__`` -> ``TeacherSource.lookup``).
        keep_float16: as the trainer sets it (True when training on CUDA).

    Returns:
        ``(dataset, keys, batch, fetch_ms)``: the training dataset, the batch's stream positions
        (``epoch * N + index``), the ``collate_training_batch`` output and the median time of the
        teacher lookups of the whole batch in ms (None without teacher).
    """
    from pipeline.training.teacher_source import TeacherSource
    from pipeline.training.trainer import (
        EpochIndexed,
        ResumableBatchSampler,
        build_datasets,
        collate_training_batch,
    )

    dataset = build_datasets(cfg)
    n = len(dataset)
    keys = ResumableBatchSampler(n, cfg.training.batch_size, cfg.seed, 0, 1).batch_at(0)
    samples = [EpochIndexed(dataset)[k] for k in keys]
    bad = [s for s in samples if "skip_reason" in s]
    if bad:
        raise RuntimeError(f"the benchmark batch holds skipped samples: {bad}")
    fetch_ms = None
    if with_teacher:
        source = TeacherSource.from_config(cfg, keep_float16=keep_float16)
        times, items = [], None
        for _ in range(FETCH_REPEATS):
            items = None  # one batch of targets alive at a time (the peak-memory meter runs)
            start = time.perf_counter()
            items = [source.lookup(dataset, k % n, s) for k, s in zip(keys, samples)]
            times.append(time.perf_counter() - start)
        fetch_ms = 1e3 * statistics.median(times)
        for s, item in zip(samples, items):
            s["teacher"] = item
    return dataset, keys, collate_training_batch(samples), fetch_ms


def _row_config(spec: dict[str, Any], row: RowSpec, steps: int) -> Config:
    """The row's config; refuses one whose schedule ends before ``steps`` steps."""
    cfg = load_config(spec["config"], [*spec["overrides"], *row.overrides])
    if cfg.training.max_iters < steps:
        raise ValueError(
            f"training.max_iters={cfg.training.max_iters} is below the {steps} steps "
            f"row {row.key!r} takes (warm-up + timed + counted): the schedule "
            "would end"
        )
    return cfg


def _row_trainer(cfg: Config, spec: dict[str, Any], row: RowSpec, name: str) -> Any:
    """A built trainer for the row, its distiller cut to the row's part (``--decompose``)."""
    from pipeline.training.trainer import Trainer

    trainer = Trainer(cfg, Path(spec["workdir"]) / name, resume=False, progress=False)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))  # training.num_threads may have changed it
    trainer.build()
    _apply_part(trainer, row)
    return trainer


def measure_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one row and time its training step (run it in the row's own process).

    Arguments:
        spec: ``config`` (path), ``overrides`` (list), ``row`` (:class:`RowSpec` as a dict),
            ``device``, ``threads`` (or None), ``warmup``, ``iters``, ``live_iters``,
            ``workdir``.

    Returns:
        dict with ``key``, ``label``, ``teacher``, ``step_ms`` (median), ``step_ms_min``,
        ``iters``, ``peak_mb``, ``peak_before_row`` (see :class:`PeakMemory`), ``params_m``
        (trainable parameters of the step module), ``teacher_ms`` (per batch: the cache fetch,
        or the live teacher; None without SAM distillation), ``terms`` (keys logged by the last
        step), ``digest`` (of the batch), ``view`` (batch image shape), ``amp``, ``threads``.
    """
    from pipeline.training.teacher_source import TeacherSource
    from pipeline.training.teacher_targets import stack_teacher_items

    row = RowSpec(**{**spec["row"], "overrides": tuple(spec["row"]["overrides"])})
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec["device"])
    iters = spec["live_iters"] if row.teacher == "live" else spec["iters"]
    warmup = spec["warmup"]
    cfg = _row_config(spec, row, warmup + iters + 1)
    # counted from here: the batch as the loader delivers it (with teacher targets in the SAM
    # rows), model, optimizer state, activations (and the live teacher)
    memory = PeakMemory(device)
    memory.start()
    # the live row warms up on cached targets (same shapes as the live ones)
    dataset, keys, batch, teacher_ms = first_batch(
        cfg, with_teacher=row.teacher is not None, keep_float16=device.type == "cuda"
    )
    n = len(dataset)
    digest = batch_digest(batch)

    trainer = _row_trainer(cfg, spec, row, row.key)
    if row.teacher == "live":
        from pipeline.cache.live import LiveTeacher

        live = LiveTeacher(cfg, trainer.teacher.path, device=str(device))
        trainer.teacher = TeacherSource(
            trainer.teacher.cache, live, keep_float16=trainer.teacher.keep_float16
        )
    trainer.step_module.train()

    for it in range(warmup):
        trainer.step(batch, it)
    if row.teacher == "live":
        trainer.teacher.lookup(dataset, keys[0] % n, batch["targets"][0])  # warm the teacher

    step_times, live_times, record = [], [], None
    for it in range(warmup, warmup + iters):
        _sync(device)
        start = time.perf_counter()
        if row.teacher == "live":
            # the teacher inline on the batch's original images; TrainStep warps its outputs
            items = [
                trainer.teacher.lookup(dataset, k % n, t) for k, t in zip(keys, batch["targets"])
            ]
            batch["teacher"] = stack_teacher_items(items)
            _sync(device)
            live_times.append(time.perf_counter() - start)
        record = trainer.step(batch, it)
        _sync(device)
        step_times.append(time.perf_counter() - start)
    if live_times:
        teacher_ms = 1e3 * statistics.median(live_times)
    peak_mb = memory.peak() / 2**20
    peak_before_row = memory.peak_was_before_start
    # after the timing: the floating-point work of one more step (torch's flop counter: matmuls
    # and convolutions of forward + backward; the live row's teacher runs outside the step)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        trainer.step(batch, warmup + iters)
    step_gflop = flops.get_total_flops() / 1e9

    return {
        "key": row.key,
        "label": row.label,
        "teacher": row.teacher,
        "step_ms": 1e3 * statistics.median(step_times),
        "step_ms_min": 1e3 * min(step_times),
        "iters": iters,
        "peak_mb": peak_mb,
        "peak_before_row": peak_before_row,
        "step_gflop": step_gflop,
        "params_m": sum(p.numel() for p in trainer.step_module.parameters() if p.requires_grad)
        / 1e6,
        "teacher_ms": teacher_ms,
        "terms": sorted((record or {}).keys()),
        "digest": digest,
        "view": list(batch["images"].shape),
        "amp": bool(trainer.use_amp),
        "threads": torch.get_num_threads(),
    }


def measure_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Time several rows side by side in this process: their steps alternate round-robin.

    Every row gets its own trainer and its own copy of the batch; round ``k`` steps every row
    once, starting at row ``k mod R``, so a slow stretch of the machine (other jobs, frequency
    changes) hits all rows alike instead of whichever row happened to run then.

    Arguments:
        spec: as for :func:`measure_row`, with ``rows`` (list of :class:`RowSpec` dicts, none of
            them the live row) instead of ``row``.

    Returns:
        ``{"step_ms": {key: median step ms}, "digests": {key: batch sha256}}``.
    """
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = resolve_device(spec["device"])
    rows = [RowSpec(**{**r, "overrides": tuple(r["overrides"])}) for r in spec["rows"]]
    if any(r.teacher == "live" for r in rows):
        raise ValueError("the live-teacher row is timed on its own, not interleaved")
    warmup, iters = spec["warmup"], spec["iters"]
    built = []
    for row in rows:
        cfg = _row_config(spec, row, warmup + iters)
        _, _, batch, _ = first_batch(
            cfg, with_teacher=row.teacher is not None, keep_float16=device.type == "cuda"
        )
        trainer = _row_trainer(cfg, spec, row, f"{row.key}_interleaved")
        trainer.step_module.train()
        built.append((row, trainer, batch))
    times: dict[str, list[float]] = {row.key: [] for row in rows}
    for it in range(warmup + iters):
        for j in range(len(built)):
            row, trainer, batch = built[(it + j) % len(built)]
            _sync(device)
            start = time.perf_counter()
            trainer.step(batch, it)
            _sync(device)
            if it >= warmup:
                times[row.key].append(time.perf_counter() - start)
    return {
        "step_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "digests": {row.key: batch_digest(batch) for row, _, batch in built},
    }


def run_row_isolated(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`measure_row` (or, for a spec with ``rows``, :func:`measure_interleaved`) in a fresh
    Python process (its own peak RSS, allocator and warm-up).

    ``env`` is the child's environment (default: this process's).
    """
    what = spec["row"]["key"] if "row" in spec else "+".join(r["key"] for r in spec["rows"])
    with tempfile.TemporaryDirectory(prefix="bench_distill_row_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        # the child imports this checkout's `pipeline`, whatever copy is installed
        env = dict(os.environ if env is None else env)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                str(spec_path),
                str(out_path),
            ],
            env=env,
        )
        if proc.returncode != 0 or not out_path.is_file():
            raise RuntimeError(
                f"row {what!r} failed in its subprocess (exit code "
                f"{proc.returncode}); its traceback is on stderr above"
            )
        return json.loads(out_path.read_text())


def measure_rows(
    config: str | Path,
    overrides: Sequence[str],
    rows: Sequence[RowSpec],
    workdir: str | Path,
    device: str = "auto",
    threads: int | None = None,
    warmup: int = 1,
    iters: int = 3,
    live_iters: int = 1,
    rounds: int = 1,
    env: dict[str, str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure every row and add the ratios (see :func:`add_ratios`).

    Two kinds of fresh processes:

    * one per row (:func:`measure_row`): its peak memory, parameters, logged terms, teacher
      fetch time and its step time alone (``alone_ms``); the live row is only measured this way;
    * ``rounds`` processes that time all other rows side by side (:func:`measure_interleaved`):
      their step times are the ones the ratios use, the median over the processes of each
      process's median (``round_ms`` keeps every process's value).

    Arguments:
        config, overrides: the config (with :func:`setup_overrides`) of a prepared workdir.
        rows: the rows to run; the first one is the reference for the ratios.
        workdir: scratch folder of the trainers (nothing is written there during a step).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        threads: torch CPU threads of each process (None: torch's default).
        warmup, iters: untimed and timed steps per row and process; ``live_iters`` timed steps
            of the live row (each runs the teacher on every image of the batch).
        rounds: processes that time the rows side by side.
        env: environment of the row processes (default: this process's). Pass the one the
            benchmark started with: dask's LocalCluster (started by ``build_cache``) sets
            ``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_`` and others in ``os.environ``.
        progress: print one line per process to stderr.

    Raises:
        RuntimeError: a row failed, or the rows did not see the same batch.
    """
    if not rows:
        raise ValueError("measure_rows: no rows to measure")
    if iters < 1 or live_iters < 1 or warmup < 0 or rounds < 1:
        raise ValueError(
            f"need iters >= 1, live_iters >= 1, warmup >= 0 and rounds >= 1, got "
            f"{iters}, {live_iters}, {warmup}, {rounds}"
        )
    common = {
        "config": str(config),
        "overrides": list(overrides),
        "device": device,
        "threads": threads,
        "warmup": warmup,
        "iters": iters,
        "live_iters": live_iters,
        "workdir": str(workdir),
    }
    side_by_side = [r for r in rows if r.teacher != "live"]
    total = len(rows) + (rounds if side_by_side else 0)
    alone: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows, 1):
        if progress:
            print(
                f"[bench_distill] {n}/{total} row {row.key} alone: {warmup} warm-up + "
                f"{live_iters if row.teacher == 'live' else iters} timed steps",
                file=sys.stderr,
                flush=True,
            )
        alone[row.key] = run_row_isolated({**common, "row": dataclasses.asdict(row)}, env)
    interleaved = []
    for k in range(rounds if side_by_side else 0):
        if progress:
            print(
                f"[bench_distill] {len(rows) + k + 1}/{total} rows side by side: "
                f"{len(side_by_side)} x ({warmup} warm-up + {iters} timed steps)",
                file=sys.stderr,
                flush=True,
            )
        interleaved.append(
            run_row_isolated({**common, "rows": [dataclasses.asdict(r) for r in side_by_side]}, env)
        )
    digests = {f"{key}#alone": r["digest"][:12] for key, r in alone.items()}
    digests.update(
        {
            f"{key}#{i}": d[:12]
            for i, run in enumerate(interleaved)
            for key, d in run["digests"].items()
        }
    )
    if len(set(digests.values())) != 1:
        raise RuntimeError(f"the rows did not train on the same batch (sha256 per run: {digests})")
    return add_ratios(
        [
            combine_runs(
                alone[r.key],
                [run["step_ms"][r.key] for run in interleaved if r.key in run["step_ms"]],
            )
            for r in rows
        ]
    )


def combine_runs(alone: dict[str, Any], round_ms: Sequence[float]) -> dict[str, Any]:
    """One row: its own process's result, with ``step_ms`` the median of the side-by-side
    processes' values ``round_ms`` (kept), or the row's time alone when it has none (live row).
    ``alone_ms`` is the step time of the row's own process."""
    out = dict(alone)
    out["alone_ms"] = alone["step_ms"]
    out["round_ms"] = list(round_ms)
    out["step_ms"] = statistics.median(round_ms) if round_ms else alone["step_ms"]
    out["rounds"] = len(round_ms)
    return out


def add_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``time_ratio`` / ``mem_ratio`` (row / first row) and ``time_added`` / ``mem_added``
    (ratio minus the previous row's ratio: what the row adds, in units of the first row)."""
    ref = results[0]
    prev_t = prev_m = None
    for r in results:
        r["time_ratio"] = r["step_ms"] / ref["step_ms"]
        r["mem_ratio"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan")
        r["time_added"] = None if prev_t is None else r["time_ratio"] - prev_t
        r["mem_added"] = None if prev_m is None else r["mem_ratio"] - prev_m
        prev_t, prev_m = r["time_ratio"], r["mem_ratio"]
    return results


# ---------------------------------------------------------------------------- report
def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One Markdown-table row per result (column name -> value)."""
    out = []
    for r in results:
        teacher = {
            None: "–",
            "cache": "cache fetch, in DataLoader workers (overlapped; not in the step time)",
            "live": "live teacher, inline (in the step time)",
        }[r["teacher"]]
        out.append(
            {
                "row": r["label"],
                "step ms": r["step_ms"],
                "step ms per process": " / ".join(f"{v:.0f}" for v in r["round_ms"]) or "–",
                "step ms alone": r["alone_ms"],
                "time x baseline": r["time_ratio"],
                "added time (x baseline)": r["time_added"],
                "peak memory MB": r["peak_mb"],
                "memory x baseline": r["mem_ratio"],
                "added memory (x baseline)": r["mem_added"],
                "step GFLOP": r.get("step_gflop"),
                "GFLOP x baseline": (
                    r["step_gflop"] / results[0]["step_gflop"]
                    if r.get("step_gflop") and results[0].get("step_gflop")
                    else None
                ),
                "trainable params M": r["params_m"],
                "teacher fetch ms/batch": r["teacher_ms"],
                "teacher targets": teacher,
            }
        )
    return out


def goal_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    by_key = {r["key"]: r for r in results}
    lines = []
    for key, quantity, limit, base in GOALS:
        r, b = by_key.get(key), by_key.get(base)
        if r is None or b is None:
            continue
        ratio = "time_ratio" if quantity == "time" else "mem_ratio"
        added = r[ratio] - b[ratio]
        verdict = "met" if added <= limit else "NOT met"
        lines.append(
            f"- {r['label']}: adds {100 * added:+.1f} % {quantity} of the baseline "
            f"to '{b['label']}' (goal <= +{100 * limit:.0f} %): **{verdict}**"
        )
    parts = [by_key.get(p.key) for p in PARTS]
    fusion, full = by_key.get("fusion"), by_key.get("resolution_distill")
    if all(parts) and fusion and full:
        lr, sr = (p["time_ratio"] for p in parts)
        lines.append(
            f"- resolution distillation, time by part (x baseline): low-resolution pass "
            f"{100 * (lr - fusion['time_ratio']):+.1f} %, SR decoder + loss_sr "
            f"{100 * (sr - lr):+.1f} %, loss_fa {100 * (full['time_ratio'] - sr):+.1f} %"
        )
        base = results[0].get("step_gflop")
        if base and parts[0].get("step_gflop") and fusion.get("step_gflop"):
            lines.append(
                f"- the low-resolution pass alone adds "
                f"{100 * (parts[0]['step_gflop'] - fusion['step_gflop']) / base:+.1f} % "
                "of the baseline's FLOPs"
            )
    live, cached = by_key.get("sam_live"), by_key.get("sam_cache")
    if live and cached and cached["teacher_ms"]:
        lines.append(
            f"- teacher targets per batch: live {live['teacher_ms']:,.0f} ms vs cached "
            f"fetch {cached['teacher_ms']:,.1f} ms ({live['teacher_ms'] / cached['teacher_ms']:,.0f}x); "
            f"live step / cached step = {live['step_ms'] / cached['step_ms']:,.1f}x, "
            f"memory {live['peak_mb'] / cached['peak_mb']:,.2f}x"
        )
    if cached and cached["teacher_ms"]:
        lines.append(
            f"- the cached fetch is {100 * cached['teacher_ms'] / cached['step_ms']:.1f} % "
            "of the cached row's step time: DataLoader workers hide it completely as long "
            "as it stays below the step time times the number of workers"
        )
    return lines


def render_report(results: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """The Markdown report: header lines, the table and the goal check."""
    device = info["device"]
    r0 = results[0]
    lay = info["layout"]
    memory = (
        "torch.cuda.max_memory_allocated during the row minus what was allocated before "
        "its batch was loaded (reset per row)"
        if device.type == "cuda"
        else "peak RSS delta: getrusage(RUSAGE_SELF).ru_maxrss after the timed steps minus the "
        "resident size before the batch was loaded, in a fresh process per row (batch with "
        "its teacher targets, model, optimizer state, activations, live teacher)"
    )
    header = [
        "# Training step with and without distillation",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; config `{info['config']}`",
        f"- device: {device_description(device)}; torch {torch.__version__}; "
        f"threads {r0['threads']}; autocast {'on' if r0['amp'] else 'off'}",
        f"- batch {info['batch_size']} x crop {info['crop']} (padded view "
        f"{r0['view'][2]}x{r0['view'][3]}), the first batch of the seeded sampler over "
        f"{info['images']} synthetic {info['image_size']}x{info['image_size']} images; "
        f"batch sha256 {r0['digest'][:12]} in every row",
        f"- step time: {info['rounds']} fresh processes each build every row but the live one "
        f"and alternate their steps round-robin ({info['warmup']} warm-up + {info['iters']} "
        "timed steps per row), so a slow stretch of the machine hits all rows alike; step ms = "
        "median over the processes of each one's median step. 'step ms alone' = the row in a "
        "process of its own (the one that measures its memory"
        + (
            f"; the live row's only timing, {info['live_iters']} step"
            if any(r["teacher"] == "live" for r in results)
            else ""
        )
        + "). A step = Trainer.step: TrainStep forward, backward, grad clip, AdamW + schedule "
        "step",
        f"- teacher `{lay['teacher']}` (random weights), input {lay['input_size']}, cached levels "
        f"{lay['levels']} x {lay['channels'][0]} channels at {lay['grid'][0]}x{lay['grid'][1]}, "
        f"masks {lay['mask_size']}x{lay['mask_size']}; both SAM rows use this cache "
        "(the live row for its PCA bases and class prototypes)",
        f"- peak memory: {memory}",
        "- step GFLOP: torch.utils.flop_counter over one more step of the row's own process "
        "(matmuls and convolutions, forward + backward)",
        "- ratios are against the baseline row; 'added' = this row's ratio minus the row above's",
        f"- load average (1/5/15 min) before: {info['load_before']}; after: {load_average()}",
    ]
    flagged = [r["label"] for r in results if r.get("peak_before_row")]
    if flagged:
        header.append(
            f"- note: in {flagged} the process peak had been reached before the batch "
            "was loaded; their memory is an upper bound"
        )
    return (
        "\n".join(header)
        + "\n\n"
        + complexity_table(table_rows(results))
        + "\n## Goals\n\n"
        + "\n".join(goal_lines(results))
        + "\n"
    )


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="student config (rows override the fusion/distillation switches)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=160, help="square training crop side")
    p.add_argument("--iters", type=int, default=10, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per process")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh processes that time the rows side by side (all but the live one)",
    )
    p.add_argument(
        "--live-iters",
        type=int,
        default=1,
        help="timed steps of the live-teacher row (each runs the teacher per image)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per row (default: torch's default at start-up)",
    )
    p.add_argument("--skip-live", action="store_true", help="leave out the live-teacher row")
    p.add_argument(
        "--decompose",
        action="store_true",
        help="add diagnostic rows that split the resolution distillation's time into "
        "its low-resolution pass, SR decoder and FA loss",
    )
    p.add_argument(
        "--teacher",
        default="vit_b",
        choices=["sam_tiny", "vit_b", "vit_l", "vit_h"],
        help="teacher of the cache and of the live row",
    )
    p.add_argument("--images", type=int, default=4, help="synthetic training images")
    p.add_argument("--image-size", type=int, default=256, help="side of the synthetic images")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep data and cache here and reuse them (default: a temp dir)",
    )
    p.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (
        args.child is None
        and min(args.batch_size, args.iters, args.live_iters, args.images, args.rounds) < 1
    ):
        p.error("--batch-size, --iters, --live-iters, --rounds and --images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> str | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child is not None:  # one row, in its own process
        spec_path, out_path = args.child
        spec = json.loads(Path(spec_path).read_text())
        result = measure_interleaved(spec) if "rows" in spec else measure_row(spec)
        Path(out_path).write_text(json.dumps(result))
        return None

    env = dict(os.environ)  # before build_cache's dask cluster edits it
    threads = args.threads or torch.get_num_threads()  # what a training process would use
    device = resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_distill_"))
    try:
        overrides = setup_overrides(
            workdir.resolve(),
            args.teacher,
            args.images,
            args.image_size,
            args.batch_size,
            args.crop,
        )
        print(
            f"[bench_distill] data and {args.teacher} cache in {workdir}",
            file=sys.stderr,
            flush=True,
        )
        prep = prepare(args.config, overrides, progress=True)
        load_before = load_average()
        rows = select_rows(args.skip_live, args.decompose)
        results = measure_rows(
            args.config,
            overrides,
            rows,
            workdir,
            device=str(device),
            threads=threads,
            warmup=args.warmup,
            iters=args.iters,
            live_iters=args.live_iters,
            rounds=args.rounds,
            env=env,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    info = {
        "device": device,
        "config": args.config,
        "batch_size": args.batch_size,
        "crop": args.crop,
        "images": args.images,
        "image_size": args.image_size,
        "warmup": args.warmup,
        "iters": args.iters,
        "live_iters": args.live_iters,
        "rounds": args.rounds,
        "layout": prep["layout"],
        "load_before": load_before,
    }
    report = render_report(results, info)
    print(report)
    write_report(report, args.out, "bench_distill")
    return report


if __name__ == "__main__":
    main()
