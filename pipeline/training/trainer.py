"""The student training loop.

One :class:`TrainStep` module holds the student, the criterion and the optional training-only
distillers, so DistributedDataParallel wraps a single ``forward`` that returns every loss term.
The loop adds what a long run on a shared cluster needs: a seeded, position-addressable sampler
(exact resume after a kill), atomic checkpoints, JSONL metrics, a tqdm bar, AMP on GPU and a
clear stop on a non-finite loss.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data.coco_panoptic import PanopticDataset, SkipSummary, collate_panoptic
from pipeline.data.transforms import TrainTransform
from pipeline.device import resolve_device
from pipeline.export import export_blob, load_student_weights
from pipeline.losses.criterion import SetCriterion
from pipeline.losses.matcher import HungarianMatcher
from pipeline.losses.weights import DISTILL_TERMS, loss_weight_table
from pipeline.models.student import RegSAMStudent, build_student
from pipeline.training.checkpoint import (
    checkpoint_candidates,
    load_checkpoint,
    load_latest_checkpoint,
    rng_state,
    rotate_checkpoints,
    save_atomic,
    set_rng_state,
)
from pipeline.evaluation.dynamics import (
    PLATEAU_WINDOW,
    late_plateau_exit,
    loss_trace,
    plateau_exit,
)
from pipeline.training.monitor import RunMonitor, eval_summary
from pipeline.training.schedule import build_scheduler
from pipeline.training.teacher_targets import batch_warp_teacher_targets, stack_teacher_items

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; the message names the term and the iteration."""


class NonFiniteParameterError(FloatingPointError):
    """A parameter or optimizer state became NaN or inf; names the tensor and the iteration."""


# --------------------------------------------------------------------------- data order
class EpochIndexed(Dataset):
    """Decodes a global stream position ``epoch * N + i`` into sample ``i`` of epoch ``epoch``.

    The dataset seeds its augmentation from ``(seed, epoch, i)``, so a sample is a pure function
    of its stream position and a resumed run sees exactly the samples it would have seen.
    """

    def __init__(self, dataset: PanopticDataset, teacher: Any | None = None):
        self.dataset = dataset
        self.teacher = teacher

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), len(self.dataset))
        self.dataset.set_epoch(epoch)
        sample = self.dataset[index]
        if self.teacher is not None and "skip_reason" not in sample:
            sample["teacher"] = self.teacher.lookup(self.dataset, index, sample)
        return sample


def collate_training_batch(samples: list[dict]) -> dict[str, Any]:
    """:func:`collate_panoptic`, plus the samples' teacher entries stacked per level.

    Runs in the DataLoader workers. When the samples carry ``teacher`` entries (SAM
    distillation), they are moved out of ``targets`` into ``batch["teacher"]``, the
    :func:`~pipeline.training.teacher_targets.stack_teacher_items` dict (cached dtype kept), so
    the training step finds one tensor per cached level instead of one per image and level.
    """
    batch = collate_panoptic(samples)
    entries = [t.pop("teacher") for t in batch["targets"] if "teacher" in t]
    if entries:
        if len(entries) != len(batch["targets"]):
            raise ValueError("some samples of the batch carry teacher entries and some do not")
        batch["teacher"] = stack_teacher_items(entries)
    return batch


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of an endless stream of seeded epoch permutations, from any iteration on.

    Iteration ``it`` of rank ``r`` takes stream positions
    ``[it * B * W + r * B, it * B * W + (r + 1) * B)``; position ``p`` is element ``p mod N`` of the
    permutation of epoch ``p div N``. Elements are encoded as ``epoch * N + index``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        start_iter: int,
        max_iters: int,
        rank: int = 0,
        world_size: int = 1,
        stream: int | None = None,
    ):
        if num_samples <= 0:
            raise ValueError("the training split has no samples")
        self.n, self.b, self.seed = num_samples, batch_size, seed
        self.stream = stream  # None: the labelled stream (seed, epoch); else (seed, epoch, stream)
        self.start, self.stop = start_iter, max_iters
        self.rank, self.world = rank, world_size
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            key = [self.seed, epoch] if self.stream is None else [self.seed, epoch, self.stream]
            self._perm_cache = {epoch: np.random.default_rng(key).permutation(self.n)}
        return self._perm_cache[epoch]

    def batch_at(self, it: int) -> list[int]:
        base = it * self.b * self.world + self.rank * self.b
        out = []
        for p in range(base, base + self.b):
            epoch, k = divmod(p, self.n)
            out.append(epoch * self.n + int(self._perm(epoch)[k]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for it in range(self.start, self.stop):
            yield self.batch_at(it)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


UNLABELED_STREAM = 1  # permutation stream of the unlabelled images (the labelled one has none)


class MixedBatchSampler(Sampler[list[Any]]):
    """Batches of ``B - B_u`` labelled and ``B_u`` unlabelled samples, from any iteration on.

    Two independent :class:`ResumableBatchSampler` streams (the unlabelled one on its own
    permutation stream), so a batch is a pure function of ``(seed, iteration, rank)`` and a run
    resumes exactly. Labelled keys are ``epoch * N_l + index`` as before, unlabelled ones
    ``("u", epoch * N_u + index)``; labelled samples come first in every batch.
    """

    def __init__(
        self,
        num_labeled: int,
        num_unlabeled: int,
        batch_size: int,
        unlabeled_per_batch: int,
        seed: int,
        start_iter: int,
        max_iters: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 < unlabeled_per_batch < batch_size:
            raise ValueError(
                f"unlabeled_per_batch must lie in [1, batch_size - 1], got {unlabeled_per_batch} "
                f"for batch_size {batch_size}"
            )
        if num_unlabeled <= 0:
            raise ValueError("training.unlabeled_ratio > 0 but there is no unlabelled image")
        self.labeled = ResumableBatchSampler(
            num_labeled,
            batch_size - unlabeled_per_batch,
            seed,
            start_iter,
            max_iters,
            rank,
            world_size,
        )
        self.unlabeled = ResumableBatchSampler(
            num_unlabeled,
            unlabeled_per_batch,
            seed,
            start_iter,
            max_iters,
            rank,
            world_size,
            stream=UNLABELED_STREAM,
        )
        self.start, self.stop = start_iter, max_iters

    def batch_at(self, it: int) -> list[Any]:
        return self.labeled.batch_at(it) + [("u", k) for k in self.unlabeled.batch_at(it)]

    def __iter__(self) -> Iterator[list[Any]]:
        for it in range(self.start, self.stop):
            yield self.batch_at(it)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class MixedEpochIndexed(Dataset):
    """Labelled keys go to ``labeled``, ``("u", key)`` to ``unlabeled`` (both
    :class:`EpochIndexed`)."""

    def __init__(self, labeled: EpochIndexed, unlabeled: EpochIndexed):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return len(self.labeled) + len(self.unlabeled)

    def __getitem__(self, key: Any) -> dict:
        if isinstance(key, tuple):
            return self.unlabeled[key[1]]
        return self.labeled[key]


def slice_outputs(outputs: dict[str, Any], part: slice) -> dict[str, Any]:
    """The student's head outputs (and ``aux_outputs``) of the images ``part`` of the batch."""
    out: dict[str, Any] = {}
    for k, v in outputs.items():
        if k == "aux_outputs":
            out[k] = [slice_outputs(a, part) for a in v]
        elif isinstance(v, torch.Tensor) and v.ndim >= 1:
            out[k] = v[part]
        else:
            out[k] = v
    return out


def slice_teacher(warped: dict[str, Any], part: slice) -> dict[str, Any]:
    """A :func:`batch_warp_teacher_targets` dict restricted to the images ``part``."""
    out: dict[str, Any] = {}
    for k, v in warped.items():
        if isinstance(v, list) and k in ("features", "feature_valid"):
            out[k] = [None if t is None else t[part] for t in v]
        elif isinstance(v, (list, torch.Tensor)):
            out[k] = v[part]
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------- the step
class TrainStep(nn.Module):
    """Student + criterion + optional distillers; ``forward`` returns all loss terms.

    The distillers are training-only: :meth:`export_student` returns the student alone.
    """

    def __init__(
        self,
        student: RegSAMStudent,
        criterion: SetCriterion,
        resolution_distiller: nn.Module | None = None,
        sam_distiller: nn.Module | None = None,
    ):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.resolution_distiller = resolution_distiller
        self.sam_distiller = sam_distiller

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict],
        teacher: dict[str, Any] | None = None,
        num_labeled: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Arguments:
            images: float ``[B, 3, H, W]`` normalised.
            targets: the data sample dicts, on the device.
            teacher: the batch's cached teacher outputs (``batch["teacher"]`` of
                :func:`collate_training_batch`, or the per-image list of cache entries), needed
                with SAM distillation.
            num_labeled: with unlabelled images in the batch (``training.unlabeled_ratio``), the
                first ``num_labeled`` images are labelled and the rest unlabelled; None = all
                labelled.
        """
        if num_labeled is not None:
            return self._forward_mixed(images, targets, teacher, num_labeled)
        feats = self.student.forward_features(images)
        outputs = self.student.forward_head(feats)
        losses, indices = self.criterion(outputs, targets)
        if self.resolution_distiller is not None:
            losses.update(self.resolution_distiller(self.student, images, feats))
        if self.sam_distiller is not None:
            if teacher is None:
                raise ValueError(
                    "SAM distillation is on but the batch has no teacher entries "
                    "(batch['teacher'] of collate_training_batch)"
                )
            # cached maps live in the teacher's frame of the original image: warp them onto
            # this batch's augmented views (one grid_sample per level for the whole batch)
            sizes = self.sam_distiller.level_sizes([f.shape[-2:] for f in feats["neck_features"]])
            warped = batch_warp_teacher_targets(
                teacher,
                [t["transform"] for t in targets],
                tuple(images.shape[-2:]),
                sizes,
                tuple(outputs["pred_masks"].shape[-2:]),
                device=images.device,
            )
            losses.update(self.sam_distiller(feats, outputs, indices, targets, warped))
        if feats.get("fusion_weights") is not None:
            losses["_fusion_weights"] = feats["fusion_weights"].detach()
        return losses

    def _forward_mixed(
        self,
        images: torch.Tensor,
        targets: list[dict],
        teacher: dict[str, Any] | None,
        num_labeled: int,
    ) -> dict[str, torch.Tensor]:
        """One forward over labelled + unlabelled images: the task losses and the labelled SAM
        distillation on the first ``num_labeled`` images, the unlabelled distillation on the
        rest, resolution distillation (label-free) on all of them."""
        if self.sam_distiller is None or teacher is None:
            raise ValueError("unlabelled images need SAM distillation and the batch's teacher")
        lab = slice(0, num_labeled)
        unl = slice(num_labeled, None)
        feats = self.student.forward_features(images)
        outputs = self.student.forward_head(feats)
        out_l = slice_outputs(outputs, lab)
        losses, indices = self.criterion(out_l, targets[lab])
        if self.resolution_distiller is not None:
            losses.update(self.resolution_distiller(self.student, images, feats))
        sizes = self.sam_distiller.level_sizes([f.shape[-2:] for f in feats["neck_features"]])
        warped = batch_warp_teacher_targets(
            teacher,
            [t["transform"] for t in targets],
            tuple(images.shape[-2:]),
            sizes,
            tuple(outputs["pred_masks"].shape[-2:]),
            device=images.device,
        )
        neck_l = {"neck_features": [f[lab] for f in feats["neck_features"]]}
        neck_u = {"neck_features": [f[unl] for f in feats["neck_features"]]}
        losses.update(
            self.sam_distiller(neck_l, out_l, indices, targets[lab], slice_teacher(warped, lab))
        )
        losses.update(
            self.sam_distiller.forward_unlabeled(
                neck_u, slice_outputs(outputs, unl), slice_teacher(warped, unl)
            )
        )
        if feats.get("fusion_weights") is not None:
            losses["_fusion_weights"] = feats["fusion_weights"].detach()
        return losses


def total_loss(
    losses: dict[str, torch.Tensor], weights: dict[str, float], distill_scale: float = 1.0
) -> torch.Tensor:
    """Sum of the terms of the loss table ``weights`` (:func:`loss_weight_table`), in its order.

    The terms arrive weighted by the modules that compute them; the distillation parts
    (``loss_sr``, ...) are not terms of the table and are not re-added. ``distill_scale``
    multiplies the distillation totals (:data:`DISTILL_TERMS`), e.g. the
    :func:`distill_ramp` factor; at 1 the sum is bit-identical to the plain one.
    """
    if distill_scale == 1.0:
        return sum(losses[k] for k in weights if k in losses)
    return sum(
        losses[k] * distill_scale if k in DISTILL_TERMS else losses[k]
        for k in weights
        if k in losses
    )


def distill_ramp(it: int, warmup_iters: int) -> float:
    """Factor of the distillation terms at iteration ``it`` (0-based): ``min(1, it / N)``.

    ``N = training.distill_warmup_iters``; 0 gives 1 at every iteration. The first step
    (``it = 0``) trains on the task losses alone; the factor reaches 1 at ``it = N``.
    """
    if warmup_iters < 0 or it < 0:
        raise ValueError(f"need it >= 0 and warmup_iters >= 0, got {it} and {warmup_iters}")
    if warmup_iters == 0:
        return 1.0
    return min(1.0, it / warmup_iters)


def check_finite(losses: dict[str, torch.Tensor], it: int) -> None:
    for name, value in losses.items():
        if name.startswith("_"):
            continue
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(
                f"{name} is {value.item()} at iteration {it}; training stopped before the "
                "optimizer step, so the last checkpoint is intact. Lower training.lr, enable "
                "training.grad_clip or check the data and teacher cache."
            )


def first_non_finite(named: Iterator[tuple[str, torch.Tensor]]) -> tuple[str | None, int, int]:
    """``(name of the first non-finite tensor or None, non-finite count, tensor count)``.

    Reads the tensors only (no RNG, no change to them). One fused pass first: the total L2 norm
    is finite exactly when every element is, except that huge finite values can overflow it, so
    only a non-finite norm leads to the per-tensor scan that decides and names the tensor (the
    fused pass costs a few ms per step for the default student on a CPU core; ``isfinite`` per
    tensor costs about 25 ms).
    """
    named = [(n, t.detach()) for n, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not named:
        return None, 0, 0
    if torch.isfinite(torch.nn.utils.get_total_norm([t for _, t in named])).item():
        return None, 0, len(named)
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
    bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
    return (bad[0] if bad else None), len(bad), len(named)


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``("<param>.<state key>", tensor)`` for every tensor of the optimizer state."""
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                yield f"optimizer state {key} of {names.get(id(p), '?')}", value


# ------------------------------------------------------------------------------ helpers
def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def progress_line(
    record: dict[str, Any], it: int, max_iters: int, iters: int, seconds: float, elapsed: float
) -> str:
    """One log line: iteration, total and per-term losses, lr, speed over the last ``iters``
    iterations (``seconds``), data time, elapsed time and ETA at that speed."""
    rate = iters / seconds if seconds > 0 else 0.0
    eta = _hms((max_iters - it) / rate) if rate > 0 else "?"
    terms = " ".join(
        f"{k} {v:.4f}" for k, v in record.items() if k.startswith("loss_") and isinstance(v, float)
    )
    return (
        f"iter {it}/{max_iters}  loss {record['loss']:.4f} ({terms})  lr {record['lr']:.2e}  "
        f"{rate:.2f} it/s, data {record.get('data_time', 0.0):.3f} s/it  "
        f"elapsed {_hms(elapsed)}, ETA {eta}"
    )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
        if commit:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def to_device(sample: dict, device: torch.device) -> dict:
    out = {}
    for k, v in sample.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = to_device(v, device)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


def train_transform(cfg: Config) -> TrainTransform:
    """The train augmentation (labelled and unlabelled images alike)."""
    return TrainTransform(
        crop_size=tuple(cfg.data.crop_size),
        scale_range=tuple(cfg.data.scale_range),
        hflip_prob=cfg.data.hflip_prob,
    )


def build_datasets(cfg: Config) -> PanopticDataset:
    """The labelled train data: the train split, or its labelled subset when
    ``data.labeled_fraction < 1`` (:func:`pipeline.data.unlabeled.labeled_indices`)."""
    image_dir, json_path, png_dir = cfg.split_paths("train")
    dataset = PanopticDataset(
        image_dir,
        json_path,
        png_dir,
        transform=train_transform(cfg),
        on_bad_sample=cfg.data.on_bad_sample,
        seed=cfg.seed,
    )
    if cfg.data.labeled_fraction < 1:
        from pipeline.data.unlabeled import labeled_indices

        keep = labeled_indices(len(dataset), cfg.data.labeled_fraction, cfg.data.labeled_seed)
        log.info(
            "label-scarce: %d of %d train images keep their labels (data.labeled_fraction=%s)",
            len(keep),
            len(dataset),
            cfg.data.labeled_fraction,
        )
        dataset = dataset.subset(keep)
    return dataset


def build_unlabeled_dataset(cfg: Config, categories: Any) -> Any:
    """The unlabelled images of ``cfg`` with the train augmentation (:mod:`pipeline.data.unlabeled`)."""
    from pipeline.data.unlabeled import UnlabeledDataset, unlabeled_images

    return UnlabeledDataset(
        unlabeled_images(cfg),
        categories,
        transform=train_transform(cfg),
        on_bad_sample=cfg.data.on_bad_sample,
        seed=cfg.seed,
    )


def build_criterion(cfg: Config, num_classes: int) -> SetCriterion:
    """The set criterion, its terms' weights and its matcher's costs from the loss table."""
    lc = cfg.model.loss
    weights = loss_weight_table(cfg.model)
    matcher = HungarianMatcher(
        cost_class=weights["loss_cls"],
        cost_mask=weights["loss_mask"],
        cost_dice=weights["loss_dice"],
        num_points=lc.num_points,
    )
    return SetCriterion(
        num_classes,
        matcher,
        weight_dict=weights,
        no_object_weight=lc.no_object_weight,
        num_points=lc.num_points,
        oversample_ratio=lc.oversample_ratio,
        importance_sample_ratio=lc.importance_sample_ratio,
    )


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Trains one student run in ``work_dir`` (resumes from ``work_dir/checkpoints/last.pth``)."""

    def __init__(
        self,
        cfg: Config,
        work_dir: str | Path,
        resume: bool = True,
        progress: bool = True,
        stop_at: int | None = None,
    ):
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.resume = resume
        self.progress = progress
        self.stop_at = stop_at  # end this process early (e.g. a wall-time slice); resumable
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(cfg.training.device, self.local_rank)
        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        self.skips = SkipSummary()
        self.monitor = RunMonitor()  # TensorBoard, opened by train() on rank 0
        self.best: dict[str, Any] | None = None  # {"iteration", "pq"} of best.pth
        self._val_dataset: PanopticDataset | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ building
    def _init_distributed(self) -> None:
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)

    def build(self) -> None:
        """Datasets, student, criterion, distillers, optimizer and schedule (no state restored)."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.dataset = build_datasets(cfg)
        self.categories = self.dataset.categories
        num_classes = len(self.categories)
        student = build_student(cfg.model, num_classes)
        if cfg.training.init_from:
            self._init_from(student, Path(cfg.training.init_from))
        criterion = build_criterion(cfg, num_classes)
        self.loss_weights = loss_weight_table(cfg.model, unlabeled=cfg.training.unlabeled_ratio > 0)

        res = sam = None
        self.teacher = None
        self.unlabeled = self.unlabeled_teacher = None
        if cfg.training.unlabeled_ratio > 0:
            from pipeline.training.teacher_source import UnlabeledTeacherSource

            self.unlabeled = build_unlabeled_dataset(cfg, self.categories)
            self.unlabeled_teacher = UnlabeledTeacherSource.from_config(
                cfg, keep_float16=self.device.type == "cuda"
            )
        if cfg.model.use_resolution_distill:
            from pipeline.models.resolution_distill import ResolutionDistiller

            rd = cfg.model.resolution_distill
            res = ResolutionDistiller(
                in_channels=cfg.model.neck.channels,
                feat_channels=rd.feat_channels,
                sr_loss_weight=rd.sr_loss_weight,
                fa_loss_weight=rd.fa_loss_weight,
                fa_subscale=rd.fa_subscale,
                lr_scale=rd.lr_scale,
                mask_stride=cfg.model.neck.mask_stride,
            )
        if cfg.model.use_sam_distill:
            from pipeline.models.sam_distill import SamDistiller
            from pipeline.training.teacher_source import TeacherSource

            self.teacher = TeacherSource.from_config(cfg, keep_float16=self.device.type == "cuda")
            sd = cfg.model.sam_distill
            sam = SamDistiller(
                student_channels=student.neck_channels,
                teacher_channels=self.teacher.level_channels,
                distill_feat_layers=sd.distill_feat_layers,
                feat_distill_weight=sd.feat_distill_weight,
                output_distill_weight=sd.output_distill_weight,
                temperature=sd.temperature,
                num_points=sd.num_points,
                unlabeled_weight=sd.unlabeled_weight,
                match_costs=(
                    self.loss_weights["loss_cls"],
                    self.loss_weights["loss_mask"],
                    self.loss_weights["loss_dice"],
                ),
            )
        self.step_module = TrainStep(student, criterion, res, sam).to(self.device)
        self.model: nn.Module = self.step_module
        if self.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )

        tc = cfg.training
        backbone_params = list(student.backbone.parameters())
        backbone_ids = {id(p) for p in backbone_params}
        rest = [
            p
            for p in self.step_module.parameters()
            if id(p) not in backbone_ids and p.requires_grad
        ]
        groups = [
            {
                "params": [p for p in backbone_params if p.requires_grad],
                "lr": tc.lr * tc.backbone_lr_mult,
            },
            {"params": rest, "lr": tc.lr},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scheduler = build_scheduler(
            self.optimizer, tc.max_iters, tc.warmup_iters, tc.lr_schedule, tc.poly_power
        )
        self.use_amp = tc.amp and self.device.type == "cuda"
        self.amp_dtype = (
            torch.bfloat16 if (self.use_amp and torch.cuda.is_bf16_supported()) else torch.float16
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )

    def _init_from(self, student: nn.Module, path: Path) -> None:
        exported = path.name.endswith(("final.pth", "best.pth"))
        blob = load_student_weights(path) if exported else load_checkpoint(path)
        state = blob.get("student") or blob.get("model") or blob
        # Switching learnable fusion on or off between stages is allowed: fresh fusion weights
        # start as the plain average, which is what a model without them computed.
        optional = "neck.fusion."
        own = student.state_dict()
        state = {k: v for k, v in state.items() if k in own or not k.startswith(optional)}
        try:
            missing, unexpected = student.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise RuntimeError(
                f"training.init_from={path}: weights do not fit this student: {str(exc)[:600]}"
            ) from None
        missing = [k for k in missing if not k.startswith(optional)]
        if missing or unexpected:
            raise RuntimeError(
                f"training.init_from={path}: weights do not fit this student "
                f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})"
            )
        log.info("initialised student from %s", path)

    # ------------------------------------------------------------------ state
    @property
    def ckpt_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    def _state(self, it: int) -> dict[str, Any]:
        return {
            "iteration": it,
            "model": self.step_module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "skips": dict(self.skips),
            "best": self.best,
            "config": self.cfg.to_dict(),
            "categories": [c.__dict__ for c in self.categories],  # evaluate reads last.pth too
        }

    def _check_parameters(self, it: int, with_optimizer: bool = False) -> None:
        """Raise :class:`NonFiniteParameterError` unless every parameter (and, with
        ``with_optimizer``, every optimizer state tensor) is finite; nothing is saved then."""
        named = list(self.step_module.named_parameters())
        if with_optimizer:
            ids = {id(p): n for n, p in named}
            named += list(optimizer_tensors(self.optimizer, ids))
        first, bad, total = first_non_finite(iter(named))
        if first is not None:
            raise NonFiniteParameterError(
                f"iteration {it}: {first} is not finite after the optimizer step ({bad} of {total} "
                f"tensors are NaN/inf); nothing was saved, the newest checkpoint in "
                f"{self.ckpt_dir} is still the last good one. Lower training.lr (now "
                f"{self.cfg.training.lr}), enable training.grad_clip or check the data."
            )

    def _save(self, it: int) -> None:
        if not self.is_main:
            return
        self._check_parameters(it, with_optimizer=True)
        state = self._state(it)
        rotate_checkpoints(self.ckpt_dir, self.cfg.training.keep_checkpoints)
        save_atomic(state, self.ckpt_dir / "last.pth")
        log.info("checkpoint at iteration %d", it)

    def _restore(self) -> int:
        found = load_latest_checkpoint(self.ckpt_dir) if self.resume else None
        if found is None:
            return 0
        state, path = found
        if self.is_main and path.name != "last.pth":
            # the newer files are unreadable: keep them aside for inspection, out of the rotation
            for bad in checkpoint_candidates(self.ckpt_dir):
                if bad == path:
                    break
                os.replace(bad, bad.with_name(bad.name + ".unreadable"))
            os.replace(path, self.ckpt_dir / "last.pth")
        self.step_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.skips.update(state.get("skips", {}))
        self.best = state.get("best")
        it = int(state["iteration"])
        if self.is_main:
            log.info("resumed from %s at iteration %d", path, it)
        return it

    def export_student(self, path: Path) -> None:
        """Inference weights only: no distillation modules, no optimizer."""
        save_atomic(export_blob(self.step_module.student, self.cfg, self.categories), path)

    def _write_run_info(self, extra: dict[str, Any]) -> None:
        info = {
            "experiment": self.cfg.experiment,
            "seed": self.cfg.seed,
            "git_commit": git_commit(),
            "config": self.cfg.to_dict(),
            "world_size": self.world_size,
            "device": str(self.device),
            "torch": torch.__version__,
        }
        if self.teacher is not None:
            info["cache_fingerprint"] = self.teacher.fingerprint
            info["cache_path"] = str(self.teacher.path)
        if self.unlabeled_teacher is not None:
            info["unlabeled_cache_fingerprint"] = self.unlabeled_teacher.fingerprint
            info["unlabeled_cache_path"] = str(self.unlabeled_teacher.path)
            info["unlabeled_images"] = len(self.unlabeled)
        info.update(extra)
        (self.work_dir / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
        # the resolved config, loadable as it is: `python -m pipeline train --config <it>`
        (self.work_dir / "config.yaml").write_text(
            yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        )

    # ------------------------------------------------------------------ loop
    def _loader(self, start_iter: int) -> DataLoader:
        cfg = self.cfg
        sampler: Sampler[list[Any]]
        dataset: Dataset = EpochIndexed(self.dataset, self.teacher)
        if self.unlabeled is not None:
            sampler = MixedBatchSampler(
                len(self.dataset),
                len(self.unlabeled),
                cfg.training.batch_size,
                round(cfg.training.unlabeled_ratio * cfg.training.batch_size),
                cfg.seed,
                start_iter,
                cfg.training.max_iters,
                self.rank,
                self.world_size,
            )
            dataset = MixedEpochIndexed(
                dataset, EpochIndexed(self.unlabeled, self.unlabeled_teacher)
            )
        else:
            sampler = ResumableBatchSampler(
                len(self.dataset),
                cfg.training.batch_size,
                cfg.seed,
                start_iter,
                cfg.training.max_iters,
                self.rank,
                self.world_size,
            )
        gen = torch.Generator().manual_seed(cfg.seed)  # keeps the global RNG untouched
        nw = cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_training_batch,
            num_workers=nw,
            generator=gen,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if nw > 0 else None,
        )

    def train(self) -> dict[str, Any]:
        """Run (or resume) training to ``training.max_iters``; returns a summary dict."""
        self._init_distributed()
        self.build()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        start = self._restore()
        tc = self.cfg.training
        metrics_path = self.work_dir / "metrics.jsonl"
        if self.is_main:
            self._truncate_metrics(metrics_path, start)
            self._truncate_metrics(self.work_dir / "evaluations.jsonl", start)
            self._write_run_info({"status": "running", "start_iteration": start})
        if start >= tc.max_iters:
            log.info("already trained to %d iterations", start)
            return self._finish(start, 0.0)

        self.step_module.train()
        bar = tqdm(
            total=tc.max_iters,
            initial=start,
            disable=not (self.progress and self.is_main),
            desc=f"train {self.cfg.experiment}",
            dynamic_ncols=True,
        )
        if self.is_main and tc.tensorboard:
            self.monitor = RunMonitor(self.work_dir / "tensorboard", start)
        t_start = time.perf_counter()
        logged = (start, t_start)  # (iteration, time) of the last progress line
        t_data = time.perf_counter()
        it = start
        mfile = open(metrics_path, "a") if self.is_main else None
        try:
            for batch in self._loader(start):
                data_time = time.perf_counter() - t_data
                self.skips.add_batch(batch)
                record = self.step(batch, it)
                it += 1
                if record is not None and mfile is not None:
                    record.update(
                        iter=it,
                        data_time=round(data_time, 4),
                        time=round(time.perf_counter() - t_data, 4),
                    )
                    mfile.write(json.dumps(record) + "\n")
                    self.monitor.log_train(record, it)
                    if it % tc.log_interval == 0 or it == tc.max_iters:
                        mfile.flush()
                        self.monitor.flush()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
                    if not self.progress and (it % tc.log_interval == 0 or it == tc.max_iters):
                        # no bar (Snakemake's log, a batch job): a progress line instead
                        now = time.perf_counter()
                        log.info(
                            progress_line(
                                record,
                                it,
                                tc.max_iters,
                                it - logged[0],
                                now - logged[1],
                                now - t_start,
                            )
                        )
                        logged = (it, now)
                bar.update(1)
                stopping = self.stop_at is not None and it >= self.stop_at
                if tc.eval_interval and (it % tc.eval_interval == 0 or it == tc.max_iters):
                    self.evaluate(it)
                if it % tc.checkpoint_interval == 0 or it == tc.max_iters or stopping:
                    if mfile is not None:
                        mfile.flush()
                    self._save(it)
                if stopping:
                    break
                t_data = time.perf_counter()
        finally:
            bar.close()
            if mfile is not None:
                mfile.close()
            self.monitor.close()
        if it < tc.max_iters:
            log.info("stopped at iteration %d of %d (stop_at); rerun to resume", it, tc.max_iters)
            return {"status": "stopped", "iterations": it}
        return self._finish(it, time.perf_counter() - t_start)

    def step(self, batch: dict, it: int) -> dict[str, Any] | None:
        """One optimisation step on a collated batch (:func:`collate_training_batch`) at
        iteration ``it``: forward, loss checks, backward, clipping, optimizer and schedule.

        Returns the iteration's record (``lr``, ``loss``, every loss term, ``grad_norm``,
        ``fusion_weights``), or None for a batch whose samples were all skipped.
        """
        targets = [to_device(t, self.device) for t in batch["targets"]]
        num_labeled = None
        if self.unlabeled is not None:  # labelled samples first (MixedBatchSampler)
            flags = [bool(t.get("unlabeled")) for t in targets]
            num_labeled = flags.count(False)
            if flags != [False] * num_labeled + [True] * (len(flags) - num_labeled):
                raise ValueError("a mixed batch must hold its labelled samples first")
            if num_labeled == 0:  # every labelled sample of the batch was skipped
                targets = []
            elif num_labeled == len(targets):
                num_labeled = None  # every unlabelled one was skipped: a labelled batch
        if not targets:
            self.scheduler.step()
            return None
        images = self.step_module.student.normalize(
            batch["images"].to(self.device, non_blocking=True)
        )
        teacher = batch.get("teacher") if self.teacher is not None else None
        if teacher is not None:
            teacher = to_device(teacher, self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            if num_labeled is None:
                losses = self.model(images, targets, teacher)
            else:
                losses = self.model(images, targets, teacher, num_labeled)
        fusion = losses.pop("_fusion_weights", None)
        check_finite(losses, it)
        distill_scale = distill_ramp(it, self.cfg.training.distill_warmup_iters)
        loss = total_loss(losses, self.loss_weights, distill_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.training.grad_clip:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.step_module.parameters(), self.cfg.training.grad_clip
            )
        else:
            grad_norm = self._grad_norm()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._check_parameters(it + 1)
        lr = self.optimizer.param_groups[-1]["lr"]
        self.scheduler.step()
        record: dict[str, Any] = {"lr": lr, "loss": float(loss.detach())}
        record.update({k: float(v.detach()) for k, v in losses.items()})
        record["grad_norm"] = float(grad_norm)
        if distill_scale != 1.0:
            record["distill_scale"] = distill_scale
        if fusion is not None:
            record["fusion_weights"] = [round(float(w), 5) for w in fusion]
        return record

    def _grad_norm(self) -> torch.Tensor:
        """Total L2 norm of the unscaled gradients, computed without touching them."""
        grads = [p.grad for p in self.step_module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        return norm / self.scaler.get_scale() if self.scaler.is_enabled() else norm

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, it: int) -> dict[str, Any] | None:
        """Evaluate the student on the val split at iteration ``it`` and keep ``best.pth``.

        Rank 0 evaluates the whole split (the other ranks wait at a barrier); the metrics go to
        ``evaluations/iter_<it>/metrics.json``, a line of ``evaluations.jsonl``, the log and
        TensorBoard. ``best.pth`` (an exported student, as ``final.pth``) is rewritten when PQ
        beats every earlier evaluation of the run. The training is not disturbed: the RNG
        states are restored afterwards and the model's train/eval mode is put back, so a run
        with evaluations ends with the weights of a run without them. Returns the headline
        numbers (None on other ranks).
        """
        summary = None
        if self.is_main:
            from pipeline.evaluation.evaluate import evaluate_model
            from pipeline.evaluation.run import val_dataset

            if self._val_dataset is None:
                self._val_dataset = val_dataset(self.cfg)
            ev = self.cfg.evaluation
            panels: list[tuple[str, Any]] = []
            saved_rng = rng_state()
            try:
                metrics = evaluate_model(
                    self.step_module.student,
                    self._val_dataset,
                    self.categories,
                    self.device,
                    out_dir=self.work_dir / "evaluations" / f"iter_{it:07d}",
                    max_images=ev.max_images,
                    object_mask_threshold=ev.object_mask_threshold,
                    overlap_threshold=ev.overlap_threshold,
                    num_visualize=ev.num_visualize,
                    progress=False,
                    instance_topk=ev.instance_topk,
                    distributed=False,
                    on_panel=lambda image_id, panel: panels.append((image_id, panel)),
                    extra_settings={"iteration": it},
                )
            finally:
                set_rng_state(saved_rng)
            summary = {"iter": it, **eval_summary(metrics)}
            if self.best is None or summary["PQ"] > self.best["pq"]:
                self.best = {"iteration": it, "pq": summary["PQ"]}
                save_atomic(
                    export_blob(self.step_module.student, self.cfg, self.categories),
                    self.work_dir / "best.pth",
                )
            summary["best_iteration"] = self.best["iteration"]
            with open(self.work_dir / "evaluations.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
            self.monitor.log_eval(metrics, it, panels)
            log.info(
                "evaluation at iteration %d: PQ %.2f (best %.2f at %d), AP %s, mIoU %s",
                it,
                summary["PQ"],
                self.best["pq"],
                self.best["iteration"],
                _fmt(summary["AP"]),
                _fmt(summary["mIoU"]),
            )
        if dist.is_initialized():
            dist.barrier()
        return summary

    @staticmethod
    def _truncate_metrics(path: Path, start: int) -> None:
        """Drop metric lines past the resumed iteration (written after the last checkpoint)."""
        if not path.exists():
            return
        keep = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln).get("iter", 0) <= start
        ]
        path.write_text("".join(ln + "\n" for ln in keep))

    def _plateau_exit(self, it: int) -> int | None:
        """When ``loss_cls`` left its starting plateau in this run's ``metrics.jsonl``
        (:func:`pipeline.evaluation.dynamics.plateau_exit`; None when it did not or the run logged
        fewer than its window), with a warning when that came late in a run trained from
        scratch (a run started from ``training.init_from`` may have no plateau to leave)."""
        path = self.work_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        records = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a diagnostic: a torn line must not fail a finished run
            if isinstance(row, dict) and isinstance(row.get("iter"), int) and row["iter"] <= it:
                records.append(row)
        iters, _ = loss_trace(records)
        if iters.size < PLATEAU_WINDOW:
            return None
        exit_iter = plateau_exit(records, window=PLATEAU_WINDOW)
        if self.cfg.training.init_from is None and late_plateau_exit(exit_iter, it):
            when = "never" if exit_iter is None else f"only at iteration {exit_iter} of {it}"
            log.warning(
                "loss_cls left its starting plateau %s (its %d-iteration mean halving): the "
                "classes had little of the schedule left to be learned, and such runs can miss "
                "whole classes; a longer schedule (training.max_iters) helps (README, ablation "
                "section)",
                when,
                PLATEAU_WINDOW,
            )
        return exit_iter

    def _finish(self, it: int, seconds: float) -> dict[str, Any]:
        summary = {
            "status": "done",
            "iterations": it,
            "train_seconds": round(seconds, 1),
            "skipped_samples": dict(self.skips),
        }
        if self.best is not None:
            summary["best"] = {**self.best, "path": "best.pth"}
        if self.is_main:
            self.export_student(self.work_dir / "final.pth")
            prev = {}
            info_path = self.work_dir / "run_info.json"
            if info_path.exists():
                prev = json.loads(info_path.read_text())
            total_seconds = prev.get("train_seconds_total", 0.0) + seconds
            summary["train_seconds_total"] = round(total_seconds, 1)
            summary["loss_cls_plateau_exit"] = self._plateau_exit(it)
            self._write_run_info(summary)
            log.info("data summary: %s", self.skips.report())
        if dist.is_initialized():
            dist.barrier()
        return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def train(
    cfg: Config,
    work_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Entry point used by the CLI and the Snakemake rule."""
    return Trainer(cfg, work_dir, resume=resume, progress=progress, stop_at=stop_at).train()


__all__ = [
    "Trainer",
    "TrainStep",
    "ResumableBatchSampler",
    "MixedBatchSampler",
    "MixedEpochIndexed",
    "build_datasets",
    "build_unlabeled_dataset",
    "EpochIndexed",
    "NonFiniteLossError",
    "NonFiniteParameterError",
    "train",
    "total_loss",
    "distill_ramp",
    "check_finite",
    "progress_line",
]
