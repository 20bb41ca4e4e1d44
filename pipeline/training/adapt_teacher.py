"""Stage zero: adapt the SAM teacher to the training data with SAM's own objective.

A segment-anything :class:`Sam` (``sam_tiny`` from scratch, or ``vit_b``/``vit_l``/``vit_h`` from
``teacher.checkpoint``) is fine-tuned on the train split with promptable segmentation, as in the
SAM paper's training recipe:

* prompts come from the ground-truth segments (``pipeline.teacher.prompts``): a thing is prompted
  by its box with Gaussian corner noise (``box_prob``) or by 1..``max_points`` positive points,
  stuff by points;
* a single point is ambiguous: SAM's three candidate masks, the mask loss on the best one; a box
  or several points ask for the fourth, single-mask output (the one the cache uses), as in SAM
  (``pipeline.losses.promptable``: focal x 20 + dice, IoU head regressed with an MSE);
* ``corrective_rounds`` further rounds add one point drawn from the error region of the previous
  best mask (positive on a miss, negative on a false alarm) and feed that mask's logits back as
  the dense prompt, with the single-mask output;
* void, crowd and padding pixels are ignored, as in stage two.

Every random draw (data order, segments, prompt kinds, points, noise, corrective points) comes
from a generator seeded by the run seed and the stream position, so the run holds no RNG state:
a checkpoint (model, optimizer, scheduler, iteration) is enough for an exact resume after a kill.
Checkpoints and the final weights are written atomically and read with ``weights_only=True``.

Output (``pipeline.teacher.adapted.adapted_dir``): ``sam_adapted.pth`` in the official layout
(``Sam.state_dict()``; ``sam_model_registry[type](checkpoint=...)`` loads it for the official
types), ``adapt_info.json`` and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.cache.fingerprint import TEACHER_INIT_SEED
from pipeline.config import Config, TeacherAdaptConfig
from pipeline.data.coco_panoptic import PanopticDataset
from pipeline.losses.promptable import PROMPTABLE_TERMS, promptable_loss
from pipeline.teacher.adapted import ADAPTED_FILE, adapt_identity, adapted_dir
from pipeline.teacher.prompts import corrective_points, mask_boxes, noisy_boxes, sample_points
from pipeline.teacher.sam_builder import build_teacher, sha256_file
from pipeline.training.checkpoint import load_latest_checkpoint, rotate_checkpoints, save_atomic
from pipeline.training.schedule import build_scheduler
from pipeline.device import resolve_device
from pipeline.training.trainer import NonFiniteLossError, ResumableBatchSampler, git_commit

__all__ = ["AdaptDataset", "AdaptStep", "adapt_teacher", "select_trainable"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pth"


def _generator(*keys: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


def _resize_bool(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool ``[N, H, W]`` -> bool ``[N, h, w]``: a pixel is set where over half its area is."""
    if masks.shape[-2:] == size:
        return masks.clone()
    x = masks[None].float()
    shrink = size[0] < masks.shape[-2] or size[1] < masks.shape[-1]
    return (
        F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)[0] > 0.5
    )


# ------------------------------------------------------------------------------- data
def _random_flips(
    sample: dict[str, Any], hflip_prob: float, vflip_prob: float, g: torch.Generator
) -> dict[str, Any]:
    """Mirror ``image`` ``[3, H, W]``, ``masks`` ``[K, H, W]`` and ``ignore`` ``[H, W]``
    left-right with chance ``hflip_prob`` and top-bottom with chance ``vflip_prob``.

    SAM's objective is class-agnostic, so either flip keeps every prompt and target valid. Two
    numbers are always drawn from ``g`` (when either chance is above 0), so the prompts drawn
    after them do not depend on whether an image was flipped."""
    u = torch.rand(2, generator=g)
    probs = (hflip_prob, vflip_prob)
    dims = [d for d, draw, p in zip((-1, -2), u.tolist(), probs) if draw < p]
    if not dims:
        return sample
    out = dict(sample)
    for key in ("image", "masks", "ignore"):
        out[key] = sample[key].flip(dims)
    return out


class AdaptDataset(Dataset):
    """Samples of the train split in the teacher frame, with their prompts already drawn.

    Key ``epoch * N + i`` (the :class:`ResumableBatchSampler` encoding) gives image ``i`` with
    prompts drawn from a generator seeded by ``(seed, key)``. A sample is a dict:

    * ``image``: uint8 ``[3, h, w]``, resized so its longest side is S (SAM's preprocessing
      resizes; normalisation and padding happen on the device);
    * ``targets``: bool ``[P, L, L]`` the prompted segments on the loss grid (L = loss size, the
      frame scaled by L/S, padding false);
    * ``valid``: bool ``[L, L]`` pixels that count (inside the image, not void or crowd);
    * ``boxes``: float ``[P, 4]`` frame boxes (NaN rows for point prompts);
    * ``points``: float ``[P, N, 2]`` frame points, ``labels`` int64 ``[P, N]`` (-1 = padding);
    * ``is_box``: bool ``[P]``; ``image_id``: str.
    """

    def __init__(
        self, dataset: PanopticDataset, input_size: int, loss_size: int, adapt: TeacherAdaptConfig
    ) -> None:
        self.dataset = dataset
        self.S, self.L = int(input_size), int(loss_size)
        self.adapt = adapt
        self.resize = ResizeLongestSide(self.S)
        self.isthing = torch.tensor([c.isthing for c in dataset.categories], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict[str, Any]:
        index = int(key) % len(self.dataset)
        sample = self.dataset[index]
        if "skip_reason" in sample:
            return sample
        a, S, L = self.adapt, self.S, self.L
        H0, W0 = sample["orig_size"]
        g = _generator(self.adapt.seed, int(key))
        if a.hflip_prob > 0 or a.vflip_prob > 0:
            sample = _random_flips(sample, a.hflip_prob, a.vflip_prob, g)
        image = self.resize.apply_image(sample["image"].permute(1, 2, 0).numpy())
        h, w = image.shape[:2]
        hl, wl = max(1, round(h * L / S)), max(1, round(w * L / S))

        masks = sample["masks"]
        count = masks.shape[0]
        pick = torch.randperm(count, generator=g)[: a.prompts_per_image].sort().values
        masks_l = _resize_bool(masks[pick], (hl, wl))
        # a segment that vanishes on the loss grid cannot be prompted there
        keep = masks_l.flatten(1).any(dim=1)
        pick, masks_l = pick[keep], masks_l[keep]
        P = int(pick.numel())
        targets = torch.zeros(P, L, L, dtype=torch.bool)
        targets[:, :hl, :wl] = masks_l
        valid = torch.zeros(L, L, dtype=torch.bool)
        valid[:hl, :wl] = ~_resize_bool(sample["ignore"][None], (hl, wl))[0]

        things = self.isthing[sample["labels"][pick]]
        is_box = things & (torch.rand(P, generator=g) < a.box_prob)
        f = S / L  # loss grid -> frame pixels
        boxes = torch.full((P, 4), float("nan"))
        if bool(is_box.any()):
            tight = mask_boxes(masks_l[is_box])
            tight = torch.stack(
                [
                    tight[:, 0] * f,
                    tight[:, 1] * f,
                    (tight[:, 2] + 1) * f - 1,
                    (tight[:, 3] + 1) * f - 1,
                ],
                dim=1,
            )
            boxes[is_box] = noisy_boxes(tight, a.box_noise, a.box_noise_max, (h, w), g)
        counts = torch.randint(1, a.max_points + 1, (P,), generator=g)
        points, labels = (
            sample_points(masks_l, counts, g)
            if P
            else (torch.zeros(0, 1, 2), torch.zeros(0, 1, dtype=torch.int64))
        )
        points = (points + 0.5) * f - 0.5
        labels[is_box] = -1  # box prompts carry no first-round points
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "targets": targets,
            "valid": valid,
            "boxes": boxes,
            "points": points,
            "labels": labels,
            "is_box": is_box,
            "image_id": sample["image_id"],
            "orig_size": (H0, W0),
        }


def collate_adapt(samples: list[dict]) -> dict[str, Any]:
    """Keep the samples as a list; count and drop skip records."""
    kept = [s for s in samples if "skip_reason" not in s]
    return {"samples": kept, "skipped": [s for s in samples if "skip_reason" in s]}


# ------------------------------------------------------------------------------- step
class AdaptStep(nn.Module):
    """The SAM model and one promptable-segmentation step; ``forward`` returns the loss terms.

    Arguments:
      sam: the model being adapted.
      adapt: the ``teacher_adapt`` section.
      loss_size: L, the side of the loss grid.
      encoder_grad: whether the image encoder has trainable parameters (else it runs under
        ``no_grad``).
    """

    def __init__(
        self, *, sam: Sam, adapt: TeacherAdaptConfig, loss_size: int, encoder_grad: bool
    ) -> None:
        super().__init__()
        self.sam = sam
        self.adapt = adapt
        self.loss_size = int(loss_size)
        self.encoder_grad = encoder_grad

    def _decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.sam.prompt_encoder
        pts = None if points is None else (points, labels)
        sparse, dense = pe(points=pts, boxes=boxes, masks=mask_input)
        low, iou = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return low, iou

    def _to_loss_grid(self, low: torch.Tensor) -> torch.Tensor:
        if low.shape[-1] == self.loss_size:
            return low
        return F.interpolate(
            low.float(), size=(self.loss_size, self.loss_size), mode="bilinear", align_corners=False
        )

    def forward(
        self, samples: list[dict[str, Any]], corrective_seed: int
    ) -> dict[str, torch.Tensor]:
        """
        Arguments:
          samples: the batch (:class:`AdaptDataset` samples, tensors on the device).
          corrective_seed: seeds the corrective points of this step.

        Returns:
          ``loss_focal``, ``loss_dice``, ``loss_iou`` (weighted, averaged over rounds) and
          ``_miou`` (mean true IoU of the first round's best candidates, for logging).
        """
        a = self.adapt
        images = torch.cat([self.sam.preprocess(s["image"][None].float()) for s in samples])
        with torch.set_grad_enabled(self.encoder_grad and torch.is_grad_enabled()):
            embeddings = self.sam.image_encoder(images)
        g = _generator(corrective_seed)
        # one group per image and prompt kind (segment-anything's decoder repeats one image's
        # embedding over the prompts of a call): boxes, single points, several points (padded
        # with label -1). As in SAM's training, only a single point is ambiguous: it gets the
        # three-mask output with the loss on the best; a box or several points get the fourth,
        # single-mask output, which is what the cache asks for.
        groups = []
        for b, s in enumerate(samples):
            npts = (s["labels"] >= 0).sum(dim=1)
            for kind in ("box", "point", "points"):
                m = (
                    s["is_box"]
                    if kind == "box"
                    else ~s["is_box"] & ((npts == 1) if kind == "point" else (npts > 1))
                )
                if not bool(m.any()):
                    continue
                gr = {
                    "emb": embeddings[b : b + 1],
                    "boxes": None,
                    "points": None,
                    "labels": None,
                    "multimask": kind == "point",
                    "target": s["targets"][m],
                    "valid": s["valid"][None].expand(int(m.sum()), -1, -1),
                }
                if kind == "box":
                    gr["boxes"] = s["boxes"][m]
                else:
                    n = int(npts[m].max())
                    gr["points"], gr["labels"] = s["points"][m][:, :n], s["labels"][m][:, :n]
                groups.append(gr)
        total = sum(gr["target"].shape[0] for gr in groups)

        rounds: list[dict[str, torch.Tensor]] = []
        ious = []
        for round_index in range(1 + a.corrective_rounds):
            losses = {k: 0.0 for k in PROMPTABLE_TERMS}
            for gr in groups:
                low, iou = self._decode(
                    gr["emb"],
                    gr["points"],
                    gr["labels"],
                    gr["boxes"],
                    gr.get("mask_input"),
                    multimask=gr["multimask"],
                )
                part, true_iou, best = promptable_loss(
                    self._to_loss_grid(low),
                    iou,
                    gr["target"],
                    gr["valid"],
                    a.focal_weight,
                    a.dice_weight,
                    a.iou_weight,
                    a.focal_alpha,
                )
                share = gr["target"].shape[0] / total  # every prompt weighs the same
                for k in PROMPTABLE_TERMS:
                    losses[k] = losses[k] + share * part[k]
                gr["low"], gr["best"] = low, best
                if round_index == 0:
                    ious.append(true_iou.gather(1, best[:, None])[:, 0])
            rounds.append(losses)
            if round_index == a.corrective_rounds:
                break
            # next round: one point in the error region of the best mask, which is also fed
            # back as the dense (mask) prompt; single-mask output from now on
            for gr in groups:
                k = gr["low"].shape[0]
                prev_low = gr["low"].detach()[torch.arange(k), gr["best"]][:, None]
                prev = self._to_loss_grid(prev_low)[:, 0] > 0
                cp, cl = corrective_points(prev, gr["target"], gr["valid"], g)
                cp = (cp.to(prev.device) + 0.5) * (
                    self.sam.image_encoder.img_size / self.loss_size
                ) - 0.5
                cl = cl.to(prev.device)
                gr["points"] = cp if gr["points"] is None else torch.cat([gr["points"], cp], 1)
                gr["labels"] = cl if gr["labels"] is None else torch.cat([gr["labels"], cl], 1)
                gr["mask_input"] = prev_low
                gr["multimask"] = False
        miou = torch.cat(ious).mean().detach()
        out = {k: sum(r[k] for r in rounds) / len(rounds) for k in PROMPTABLE_TERMS}
        out["_miou"] = miou
        return out


def select_trainable(sam: Sam, adapt: TeacherAdaptConfig) -> list[str]:
    """Set ``requires_grad`` as the config asks; returns the names of the trainable tensors."""
    sam.requires_grad_(False)
    if adapt.train_image_encoder:
        enc = sam.image_encoder
        if adapt.image_encoder_last_blocks is None:
            enc.requires_grad_(True)
        else:
            n = adapt.image_encoder_last_blocks
            for blk in list(enc.blocks)[len(enc.blocks) - n :] if n else []:
                blk.requires_grad_(True)
            enc.neck.requires_grad_(True)
    if adapt.train_prompt_encoder:
        sam.prompt_encoder.requires_grad_(True)
    if adapt.train_mask_decoder:
        sam.mask_decoder.requires_grad_(True)
    return [n for n, p in sam.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------- loop
def _to_device(sample: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in sample.items()
    }


def _check_finite(losses: dict[str, torch.Tensor], it: int) -> None:
    for name, value in losses.items():
        if not name.startswith("_") and not bool(torch.isfinite(value).all()):
            raise NonFiniteLossError(
                f"teacher adaptation: {name} is {value.item()} at iteration {it}; stopped before "
                "the optimizer step, so the last checkpoint is intact. Lower teacher_adapt.lr or "
                "check the data."
            )


def adapt_teacher(
    cfg: Config,
    out_dir: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Fine-tune the teacher of ``cfg`` and write ``sam_adapted.pth`` into ``out_dir``.

    Arguments:
      cfg: the experiment config (``teacher``, ``teacher_adapt``, ``data`` are read).
      out_dir: default :func:`pipeline.teacher.adapted.adapted_dir`.
      resume: continue from ``out_dir/checkpoints/last.pth`` when present.
      progress: tqdm bar (rank 0).
      stop_at: checkpoint and return after this iteration (a wall-time slice; rerun to resume).

    Returns:
      the summary written to ``adapt_info.json`` (``finished`` false after ``stop_at``).
    """
    a = cfg.teacher_adapt
    out = Path(out_dir) if out_dir is not None else adapted_dir(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.teacher.device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    started = time.perf_counter()

    image_dir, json_path, png_dir = cfg.split_paths("train")
    data = PanopticDataset(
        image_dir,
        json_path,
        png_dir,
        transform=None,
        on_bad_sample=cfg.data.on_bad_sample,
        seed=a.seed,
    )
    if cfg.data.labeled_fraction < 1:  # label-scarce: the teacher sees only the labelled part
        from pipeline.data.unlabeled import labeled_indices

        data = data.subset(
            labeled_indices(len(data), cfg.data.labeled_fraction, cfg.data.labeled_seed)
        )
    train_sha = sha256_file(json_path)
    sam = build_teacher(
        cfg.teacher.type, cfg.teacher.checkpoint, cfg.teacher.tiny, seed=TEACHER_INIT_SEED
    )
    S = sam.image_encoder.img_size
    L = a.loss_size or S
    trainable = select_trainable(sam, a)
    sam.train()
    step = AdaptStep(
        sam=sam,
        adapt=a,
        loss_size=L,
        encoder_grad=any(p.requires_grad for p in sam.image_encoder.parameters()),
    )
    step.to(device)
    model: nn.Module = step
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
    scheduler = build_scheduler(optimizer, a.iters, a.warmup_iters, a.lr_schedule)
    use_amp = a.amp and device.type == "cuda"

    identity = adapt_identity(cfg)
    ckpt_path = out / CHECKPOINT
    start = 0
    found = load_latest_checkpoint(ckpt_path.parent) if resume else None
    if found is not None:
        state, resumed_from = found
        if (
            state.get("identity") != json.dumps(identity, sort_keys=True)
            or state.get("train_json_sha256") != train_sha
        ):
            raise RuntimeError(
                f"{resumed_from} belongs to another adaptation (config or "
                f"{json_path} changed); delete it or pass --no-resume"
            )
        sam.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["iteration"])
        log.info("resuming the teacher adaptation from %s at iteration %d", resumed_from, start)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        kept = []
        if start and metrics_path.is_file():
            kept = [
                ln
                for ln in metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["iteration"] < start
            ]
        metrics_path.write_text("".join(ln + "\n" for ln in kept))

    stop = a.iters if stop_at is None else min(a.iters, int(stop_at))
    dataset = AdaptDataset(data, S, L, a)
    sampler = ResumableBatchSampler(len(dataset), a.batch_size, a.seed, start, stop, rank, world)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=a.num_workers,
        collate_fn=collate_adapt,
        persistent_workers=False,
    )
    log.info(
        "adapting %s teacher (%s) on %s: %d iterations x %d images x <= %d prompts, loss grid "
        "%d, %d trainable tensors, device %s",
        cfg.teacher.type,
        cfg.teacher.checkpoint or "random init",
        json_path,
        a.iters,
        a.batch_size * world,
        a.prompts_per_image,
        L,
        len(trainable),
        device,
    )
    skipped = 0
    bar = tqdm(
        total=stop,
        initial=start,
        desc="adapt_teacher",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    it = start
    t_last = time.perf_counter()
    for it, batch in zip(range(start, stop), loader):
        skipped += len(batch["skipped"])
        samples = [_to_device(s, device) for s in batch["samples"]]
        if not samples:
            raise RuntimeError(
                f"iteration {it}: every image of the batch was skipped "
                f"({[s['skip_reason'] for s in batch['skipped']]})"
            )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            losses = model(samples, corrective_seed=a.seed * 1_000_003 + it)
        _check_finite(losses, it)
        total = sum(losses[k] for k in PROMPTABLE_TERMS)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
            if a.grad_clip
            else torch.tensor(float("nan"))
        )
        optimizer.step()
        scheduler.step()
        done = it + 1
        bar.update(1)
        if rank == 0 and (done % a.log_interval == 0 or done == a.iters):
            now = time.perf_counter()
            row = {
                "iteration": it,
                **{
                    k: round(float(v.detach()), 6)
                    for k, v in losses.items()
                    if not k.startswith("_")
                },
                "miou_train": round(float(losses["_miou"]), 4),
                "loss": round(float(total.detach()), 6),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": round(float(grad_norm), 4),
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rate = a.log_interval / max(now - t_last, 1e-9)
            eta = (stop - done) / max(rate, 1e-9)
            log.info(
                "adapt_teacher it %d/%d loss %.4f (focal %.4f dice %.4f iou %.4f) train mIoU "
                "%.3f, %.2f it/s, ETA %s",
                done,
                a.iters,
                row["loss"],
                row["loss_focal"],
                row["loss_dice"],
                row["loss_iou"],
                row["miou_train"],
                rate,
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
            t_last = now
        if rank == 0 and (done % a.checkpoint_interval == 0 or done == stop) and done < a.iters:
            rotate_checkpoints(ckpt_path.parent, cfg.training.keep_checkpoints)
            save_atomic(
                {
                    "model": sam.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "iteration": done,
                    "identity": json.dumps(identity, sort_keys=True),
                    "train_json_sha256": train_sha,
                },
                ckpt_path,
            )
    bar.close()
    finished = stop >= a.iters
    summary = {
        "finished": finished,
        "iterations": stop,
        "teacher_type": cfg.teacher.type,
        "base_checkpoint": cfg.teacher.checkpoint,
        "base_checkpoint_sha256": (
            sha256_file(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else None
        ),
        "train_json": str(json_path),
        "train_json_sha256": train_sha,
        "trainable_tensors": len(trainable),
        "trainable_parameters": int(sum(p.numel() for p in params)),
        "skipped_samples": skipped,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "git_commit": git_commit(),
        "identity": identity,
    }
    if rank == 0 and finished:
        sam.eval()
        final = out / ADAPTED_FILE
        save_atomic({k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}, final)
        summary["checkpoint"] = str(final)
        summary["checkpoint_sha256"] = sha256_file(final)
        (out / "adapt_info.json").write_text(json.dumps(summary, indent=1))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        log.info(
            "adapted teacher written to %s (%.1f min)", final, summary["seconds_this_run"] / 60
        )
    if world > 1:
        dist.barrier()
    return summary
