"""Typed experiment configuration.

YAML files under ``configs/`` are merged along their ``_base_`` chain (a path or a list of
paths relative to the file) and validated by the pydantic models below before any work starts.
Key names follow the original RegSAM design (``model.use_learnable_fusion``,
``model.resolution_distill.fa_subscale``, ``model.sam_distill.temperature``, ...).

Errors are :class:`ConfigError` and name the offending key, the file that set it and, for unknown
keys, the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "load_config_dict",
    "apply_overrides",
    "config_digest",
    "is_timm_model",
    "missing_input_files",
    "OBJECT_MASK_THRESHOLD",
    "OVERLAP_THRESHOLD",
]

FLOAT32_MAX = 3.4028234663852886e38

# Panoptic post-processing defaults: the config's and every Python signature's (one place).
OBJECT_MASK_THRESHOLD = 0.5  # a query is kept when its class probability is above this
OVERLAP_THRESHOLD = 0.8  # a segment is kept when it keeps this fraction of its own mask


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _finite_float32(cls, v: Any) -> Any:
        """Every number must be finite and fit float32 (the tensors it ends up in)."""
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, float) and not (math.isfinite(x) and abs(x) <= FLOAT32_MAX):
                raise ValueError(
                    f"must be a finite number of magnitude at most {FLOAT32_MAX:.3g} (float32)"
                )
        return v


# ----------------------------------------------------------------------------- data
class SplitPaths(_Section):
    """Where one split of a COCO-panoptic-format dataset lives (relative to ``data.root``)."""

    images: str
    json_file: str = Field(alias="json")
    png_dir: str

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SyntheticConfig(_Section):
    num_train: int = Field(64, ge=1)
    num_val: int = Field(16, ge=1)
    num_tune: int = Field(0, ge=0, description="images of the separate tuning split (0 = none)")
    image_size: tuple[int, int] = (256, 256)
    num_thing_classes: int = Field(3, ge=1)
    num_stuff_classes: int = Field(2, ge=1)
    seed: int = 0
    num_unlabeled: int = Field(
        0,
        ge=0,
        description="images of the unlabelled split (folder `unlabeled/`, no annotations, its "
        "own generator stream; 0 = none)",
    )


class UnlabeledSource(_Section):
    """One source of unlabelled images, relative to ``data.root``.

    ``images`` is a folder; without ``image_list`` every ``.jpg``/``.jpeg``/``.png`` directly in
    it is used (sorted by name), with it only the images a COCO image-info JSON lists
    (``{"images": [{"id", "file_name"}, ...]}``, e.g. COCO's ``image_info_unlabeled2017.json``).
    """

    images: str
    image_list: str | None = None


class DataConfig(_Section):
    dataset: Literal["synthetic", "coco_panoptic", "cityscapes"] = "synthetic"
    root: str = "data/synthetic"
    train: SplitPaths = SplitPaths(
        images="train", json="annotations/panoptic_train.json", png_dir="annotations/panoptic_train"
    )
    val: SplitPaths = SplitPaths(
        images="val", json="annotations/panoptic_val.json", png_dir="annotations/panoptic_val"
    )
    tune: SplitPaths = SplitPaths(
        images="tune", json="annotations/panoptic_tune.json", png_dir="annotations/panoptic_tune"
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    cityscapes_root: str | None = None
    crop_size: tuple[int, int] = (256, 256)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip_prob: float = Field(0.5, ge=0.0, le=1.0)
    test_size: int = Field(256, ge=32, description="longest side at evaluation")
    size_divisibility: int = Field(32, ge=1)
    on_bad_sample: Literal["error", "skip"] = "error"
    num_workers: int = Field(2, ge=0)
    unlabeled: list[UnlabeledSource] = Field(
        default_factory=list,
        description="unlabelled image sources (folders or image-list JSONs under data.root); "
        "cached by `cache-teacher --split unlabeled` with SAM's automatic mode",
    )
    labeled_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="fraction of the train split that keeps its labels (a fixed subset drawn "
        "with labeled_seed); the rest joins the unlabelled images. 1 = all labelled",
    )
    labeled_seed: int = Field(0, ge=0, description="seed of the labelled subset of the train split")

    @field_validator("unlabeled", mode="before")
    @classmethod
    def _folder_shorthand(cls, v: Any) -> Any:
        """A plain string is a folder: ``- unlabeled2017`` = ``- {images: unlabeled2017}``."""
        if isinstance(v, list):
            return [{"images": x} if isinstance(x, str) else x for x in v]
        return v

    @field_validator("scale_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"must satisfy 0 < min <= max, got {list(v)}")
        return v

    @field_validator("crop_size")
    @classmethod
    def _positive_crop(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 32:
            raise ValueError(f"both sides must be >= 32, got {list(v)}")
        return v


# -------------------------------------------------------------------------- teacher
class SamTinyConfig(_Section):
    """Sizes of the ``sam_tiny`` teacher built from segment-anything's own modules."""

    img_size: int = Field(256, ge=64)
    embed_dim: int = Field(64, ge=8)
    depth: int = Field(8, ge=1)
    num_heads: int = Field(2, ge=1)
    global_attn_indexes: list[int] = [1, 3, 5, 7]
    window_size: int = Field(4, ge=0)
    decoder_depth: int = Field(1, ge=1)
    decoder_mlp_dim: int = Field(256, ge=8)


TeacherType = Literal["sam_tiny", "vit_b", "vit_l", "vit_h"]


class AutomaticConfig(_Section):
    """SAM's automatic mask generation (``SamAutomaticMaskGenerator``'s settings, one crop layer):
    a grid of ``points_per_side``^2 single-point prompts, three masks each, kept when the
    predicted IoU exceeds ``pred_iou_thresh`` and the stability score reaches
    ``stability_score_thresh``, de-duplicated by box NMS at ``box_nms_thresh``."""

    points_per_side: int = Field(32, ge=1)
    points_per_batch: int = Field(64, ge=1)
    pred_iou_thresh: float = Field(0.88, ge=0, le=1)
    stability_score_thresh: float = Field(0.95, ge=0, le=1)
    stability_score_offset: float = Field(1.0, ge=0)
    box_nms_thresh: float = Field(0.7, gt=0, le=1)


class TeacherConfig(_Section):
    type: TeacherType = "sam_tiny"
    checkpoint: str | None = None
    tiny: SamTinyConfig = SamTinyConfig()
    layers: list[int | Literal["neck"]] | None = Field(
        None,
        description="ViT block indices to cache; 'neck' = SAM's 256-d image embedding; "
        "null = the global-attention blocks, the last one through the neck",
    )
    points_per_stuff: int = Field(3, ge=1)
    device: str = "auto"
    automatic: AutomaticConfig = Field(
        AutomaticConfig(),
        description="SAM's automatic mode, used for the teacher segments of unlabelled images",
    )

    @field_validator("layers")
    @classmethod
    def _layers_in_range(
        cls, v: list[int | str] | None, info: ValidationInfo
    ) -> list[int | str] | None:
        if v is None or "type" not in info.data or "tiny" not in info.data:
            return v
        depth = teacher_depth(info.data["type"], info.data["tiny"])
        bad = [x for x in v if x != "neck" and not 0 <= x < depth]
        if bad or len(set(map(str, v))) != len(v):
            raise ValueError(
                f"expected distinct block indices in [0, {depth}) (teacher.type="
                f"{info.data['type']!r} has {depth} blocks) and/or 'neck'"
            )
        return v

    def num_levels(self) -> int:
        """How many feature levels the cache of this teacher stores."""
        if self.layers is not None:
            return len(self.layers)
        from pipeline.cache.fingerprint import resolve_layers

        return len(resolve_layers(self))


def teacher_depth(teacher_type: str, tiny: SamTinyConfig) -> int:
    """Number of ViT blocks of a teacher type (``tiny.depth`` for ``sam_tiny``)."""
    from pipeline.teacher.specs import spec_for  # imported late: it imports this module

    return spec_for(teacher_type, tiny).depth


class TeacherAdaptConfig(_Section):
    """Stage zero: fine-tune the SAM teacher on the train split with SAM's promptable objective.

    Prompts are drawn from the ground-truth segments as in the SAM paper's training recipe:
    things by a noisy box or by points, stuff by points, then ``corrective_rounds`` rounds that
    add one point in the error region and feed the previous mask logits back as a mask prompt.
    As in SAM, a single point (ambiguous) gets the three-mask output with the loss on the best
    mask, a box or several points the single-mask output; the mask loss is ``focal_weight`` x
    focal + ``dice_weight`` x dice (SAM's 20:1 by default; the embedded sam_tiny, trained from
    scratch, uses 2:1), the IoU head is trained with the MSE against each mask's true IoU.
    """

    enabled: bool = False
    iters: int = Field(1000, ge=1)
    batch_size: int = Field(4, ge=1, description="images per iteration (per process)")
    prompts_per_image: int = Field(16, ge=1, description="segments prompted per image and step")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_iters: int = Field(50, ge=0)
    lr_schedule: Literal["poly", "cosine"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0)
    train_image_encoder: bool = True
    image_encoder_last_blocks: int | None = Field(
        None,
        ge=0,
        description="with train_image_encoder: train only the last N ViT blocks and "
        "the neck (null = the whole encoder)",
    )
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True
    box_prob: float = Field(
        0.5, ge=0, le=1, description="chance that a thing is prompted by its box"
    )
    hflip_prob: float = Field(
        0.0, ge=0, le=1, description="chance that an image and its segments are mirrored left-right"
    )
    vflip_prob: float = Field(
        0.0, ge=0, le=1, description="chance that an image and its segments are flipped top-bottom"
    )
    box_noise: float = Field(0.1, ge=0, description="box corner noise std, fraction of the side")
    box_noise_max: float = Field(20.0, ge=0, description="cap of that std, in frame pixels")
    max_points: int = Field(3, ge=1, description="point prompts are 1..max_points positives")
    corrective_rounds: int = Field(1, ge=0)
    focal_weight: float = Field(20.0, ge=0)
    focal_alpha: float = Field(
        0.25,
        ge=0,
        le=1,
        description="focal loss alpha (weight of the foreground term; 0.25 as in DETR/torchvision)",
    )
    dice_weight: float = Field(1.0, ge=0)
    iou_weight: float = Field(1.0, ge=0)
    loss_size: int | None = Field(
        None,
        ge=16,
        description="side of the square frame the mask loss is computed on "
        "(null = the teacher's input size S; 256 = SAM's low-res logits for the ViT types)",
    )
    amp: bool = True
    seed: int = 0
    checkpoint_interval: int = Field(100, ge=1)
    log_interval: int = Field(20, ge=1)
    num_workers: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _something_trains(self) -> "TeacherAdaptConfig":
        if self.enabled and not (
            self.train_image_encoder or self.train_prompt_encoder or self.train_mask_decoder
        ):
            raise ValueError(
                "teacher_adapt.enabled is true but train_image_encoder, "
                "train_prompt_encoder and train_mask_decoder are all false"
            )
        return self


# ---------------------------------------------------------------------------- cache
class CacheConfig(_Section):
    root: str = "cache"
    channels: int = Field(64, ge=1, description="levels wider than this are PCA-reduced")
    dtype: Literal["float16", "int8"] = "float16"
    mask_size: int = Field(64, ge=8)
    # Per-segment arrays are padded to this many non-crowd segments (padding compresses to almost
    # nothing). 200 keeps even the uncompressed worst case of the default settings (vit_h,
    # 4 levels x 64 channels x 64 x 64 float16 = 2 MiB, + 9236 B per segment) under 4 MB/image.
    max_segments: int = Field(200, ge=1, description="per-image segment capacity of the store")
    compressor: Literal["zstd", "lz4", "blosclz", "zlib"] = "zstd"
    clevel: int = Field(5, ge=0, le=9)
    pca_samples: int = Field(32, ge=1)
    prototype_scale: float = Field(10.0, gt=0)
    scheduler_address: str | None = None
    n_workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)


# ---------------------------------------------------------------------------- model
def _timm_names_file(version: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "regsam" / f"timm-{version}-models.json"


def is_timm_model(name: str) -> bool:
    """Whether timm knows the architecture ``name`` (``arch`` or ``arch.pretrained_tag``).

    Importing timm (and with it torch and torchvision) takes about 5 s, which Snakemake would pay
    at every DAG build. So the architecture names of the installed timm version are kept in
    ``~/.cache/regsam/timm-<version>-models.json`` (``$XDG_CACHE_HOME`` respected), written the
    first time timm is imported for this check. The file only ever confirms a name: a name it
    lacks, an unreadable file or a process that has imported timm already asks timm itself, so a
    stale or edited list can delay an error to the student's construction but never reject a
    valid name.
    """
    import sys
    from importlib.metadata import PackageNotFoundError, version

    arch = name.split(".", 1)[0]
    if "timm" not in sys.modules:
        try:
            names_file = _timm_names_file(version("timm"))
            names = json.loads(names_file.read_text())
            if isinstance(names, list) and arch in names:
                return True
        except (OSError, ValueError, RuntimeError, PackageNotFoundError):
            pass  # no file yet, unreadable, or no home directory: timm decides
    import timm

    known = timm.is_model(name)
    try:
        names_file = _timm_names_file(timm.__version__)
        if not names_file.is_file():
            names_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = names_file.with_name(f".{names_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(sorted(timm.list_models())))
            os.replace(tmp, names_file)
    except (OSError, RuntimeError):
        pass  # a read-only or missing home: every check imports timm
    return known


class BackboneConfig(_Section):
    name: str = "regnetx_002"
    pretrained_path: str | None = None
    freeze_bn: bool = False

    @field_validator("name")
    @classmethod
    def _timm_model(cls, v: str) -> str:
        # the model's own check (strides 4-32) runs when the student is built
        if not is_timm_model(v):
            raise ValueError(
                f"must be a timm model name with features_only support (e.g. "
                f"regnetx_002, resnet18, mobilenetv3_large_100), got {v!r}"
            )
        return v


class NeckConfig(_Section):
    channels: int = Field(128, ge=8)
    mask_stride: Literal[4, 8] = 4
    use_coord: bool = True
    separable: bool = Field(
        False,
        description="depthwise-separable (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU) "
        "instead of dense 3x3 conv + GroupNorm + ReLU for the FPN output convs and the mask "
        "conv; fewer MACs, different state-dict keys (false: every existing checkpoint loads)",
    )


class HeadConfig(_Section):
    num_queries: int = Field(100, ge=1)
    num_stages: int = Field(3, ge=1)
    ffn_dim: int = Field(512, ge=8)
    num_mask_fcs: int = Field(
        1,
        ge=0,
        description="(Linear, LayerNorm, ReLU) blocks of the "
        "kernel -> mask-kernel embedding, before its last Linear",
    )
    kernel_size: int = Field(
        3, ge=1, description="taps of the separable dynamic convolution across queries (odd)"
    )

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 != 1:
            raise ValueError(f"must be odd, got {v}")
        return v


class LossConfig(_Section):
    cls_weight: float = Field(2.0, ge=0)
    mask_weight: float = Field(5.0, ge=0)
    dice_weight: float = Field(5.0, ge=0)
    iou_weight: float = Field(1.0, ge=0)
    no_object_weight: float = Field(0.1, ge=0)
    num_points: int = Field(12544, ge=16)
    oversample_ratio: float = Field(3.0, ge=1)
    importance_sample_ratio: float = Field(0.75, ge=0, le=1)


class ResolutionDistillConfig(_Section):
    feat_channels: int = Field(128, ge=1)
    sr_loss_weight: float = Field(0.5, ge=0)
    fa_loss_weight: float = Field(0.5, ge=0)
    fa_subscale: float = Field(0.0625, gt=0, le=1)
    lr_scale: float = Field(0.5, gt=0, lt=1)

    @field_validator("fa_subscale")
    @classmethod
    def _inverse_integer(cls, v: float) -> float:
        n = round(1.0 / v)
        if abs(1.0 / v - n) > 1e-6 * n:
            raise ValueError(f"must be 1/n for a positive integer n (e.g. 0.0625 = 1/16), got {v}")
        return v


class SamDistillConfig(_Section):
    teacher_model: TeacherType | None = Field(
        None, description="null = teacher.type; if set it must equal teacher.type"
    )
    teacher_checkpoint: str | None = Field(
        None, description="null = teacher.checkpoint; if set it must equal teacher.checkpoint"
    )
    feat_distill_weight: float = Field(1.0, ge=0)
    output_distill_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    distill_feat_layers: list[int] = [0, 1, 2, 3]
    teacher_mode: Literal["cache", "live"] = "cache"
    num_points: int = Field(4096, ge=16)
    unlabeled_weight: float = Field(
        1.0, ge=0, description="weight of loss_sam_distill_unlabeled in the total loss"
    )
    unlabeled_min_confidence: float = Field(
        0.5,
        ge=0,
        le=1,
        description="teacher segments of unlabelled images below this confidence are ignored",
    )

    @field_validator("distill_feat_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct non-negative level indices, got {v}")
        return v


class ModelConfig(_Section):
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    head: HeadConfig = HeadConfig()
    loss: LossConfig = LossConfig()
    use_learnable_fusion: bool = True
    use_resolution_distill: bool = False
    resolution_distill: ResolutionDistillConfig = ResolutionDistillConfig()
    use_sam_distill: bool = False
    sam_distill: SamDistillConfig = SamDistillConfig()


# ------------------------------------------------------------------------- training
class TrainingConfig(_Section):
    max_iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    backbone_lr_mult: float = Field(1.0, gt=0)
    warmup_iters: int = Field(50, ge=0)
    lr_schedule: Literal["poly", "cosine"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    distill_warmup_iters: int = Field(
        0,
        ge=0,
        description="ramp the distillation terms (loss_resolution_distill, loss_sam_distill, "
        "loss_sam_distill_unlabeled) linearly from 0 to their full weight over the first N "
        "iterations (factor min(1, it / N) at iteration it); 0 = full weight from the start",
    )
    amp: bool = True
    checkpoint_interval: int = Field(100, ge=1)
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="newest checkpoints kept; resume falls "
        "back to an older one when the newest is unreadable",
    )
    log_interval: int = Field(10, ge=1)
    eval_interval: int | None = Field(
        None,
        ge=0,
        description="evaluate on the val split every N iterations and keep best.pth "
        "(by PQ); 0 or null = off",
    )
    tensorboard: bool = Field(True, description="TensorBoard event files in <run>/tensorboard")
    init_from: str | None = Field(None, description="weights to start from (progressive training)")
    device: str = "auto"
    num_threads: int | None = Field(None, ge=1)
    unlabeled_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of every batch drawn from the unlabelled images "
        "(round(ratio x batch_size) images); 0 = labelled images only",
    )


class EvaluationConfig(_Section):
    object_mask_threshold: float = Field(OBJECT_MASK_THRESHOLD, ge=0, le=1)
    overlap_threshold: float = Field(OVERLAP_THRESHOLD, ge=0, le=1)
    instance_topk: int = Field(100, ge=1, description="scored thing queries per image for AP")
    max_images: int | None = Field(None, ge=1)
    num_visualize: int = Field(8, ge=0)


class Config(_Section):
    experiment: str = "regsam"
    seed: int = 0
    output_root: str = "runs"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    teacher_adapt: TeacherAdaptConfig = TeacherAdaptConfig()
    cache: CacheConfig = CacheConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _teacher_consistency(self) -> "Config":
        sd = self.model.sam_distill
        if sd.teacher_model is not None and sd.teacher_model != self.teacher.type:
            raise ValueError(
                f"model.sam_distill.teacher_model={sd.teacher_model!r} differs from "
                f"teacher.type={self.teacher.type!r}; the cache is built by the teacher section"
            )
        if sd.teacher_checkpoint is not None and sd.teacher_checkpoint != self.teacher.checkpoint:
            raise ValueError(
                f"model.sam_distill.teacher_checkpoint={sd.teacher_checkpoint!r} differs from "
                f"teacher.checkpoint={self.teacher.checkpoint!r}"
            )
        if self.training.unlabeled_ratio > 0:
            n_u = round(self.training.unlabeled_ratio * self.training.batch_size)
            if not self.model.use_sam_distill:
                raise ValueError(
                    f"training.unlabeled_ratio={self.training.unlabeled_ratio}: unlabelled images "
                    "are learned from the teacher only; set model.use_sam_distill: true"
                )
            if n_u < 1 or n_u >= self.training.batch_size:
                raise ValueError(
                    f"training.unlabeled_ratio={self.training.unlabeled_ratio}: with "
                    f"training.batch_size={self.training.batch_size} a batch would hold {n_u} "
                    "unlabelled images; need at least 1 and at least one labelled image"
                )
            if not self.data.unlabeled and self.data.labeled_fraction >= 1:
                raise ValueError(
                    f"training.unlabeled_ratio={self.training.unlabeled_ratio} but there are no "
                    "unlabelled images: set data.unlabeled and/or data.labeled_fraction < 1"
                )
        if self.model.use_sam_distill:
            levels = self.teacher.num_levels()
            bad = [i for i in sd.distill_feat_layers if i >= levels]
            if bad:
                raise ValueError(
                    f"model.sam_distill.distill_feat_layers={sd.distill_feat_layers}: levels {bad} "
                    f"do not exist; the teacher cache of teacher.type={self.teacher.type!r} with "
                    f"teacher.layers={self.teacher.layers} stores {levels} levels (allowed: "
                    f"indices in [0, {levels}))"
                )
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def has_unlabeled(self) -> bool:
        """Whether the config declares unlabelled images (sources or a held-out train part)."""
        return bool(self.data.unlabeled) or self.data.labeled_fraction < 1

    def split_paths(self, split: Literal["train", "val", "tune"]) -> tuple[Path, Path, Path]:
        """(image_dir, json_path, png_dir) of a split, resolved against ``data.root``."""
        paths = getattr(self.data, split)
        root = Path(self.data.root)
        return root / paths.images, root / paths.json_file, root / paths.png_dir

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------------- loading
def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        raise ConfigError(
            f"{path}: the config file is empty (no keys); give at least "
            "`_base_: <file>` or the keys to set"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, over: dict, origin: dict[str, str], src: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origin, src, dotted + ".")
        else:
            out[key] = copy.deepcopy(value)
            _record(value, origin, src, dotted)
    return out


def _record(value: Any, origin: dict[str, str], src: str, dotted: str) -> None:
    origin[dotted] = src
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, origin, src, f"{dotted}.{k}")


def _resolve(path: Path, origin: dict[str, str], stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"circular _base_ chain: {chain}")
    raw = _read_yaml(path)
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, _resolve(path.parent / b, origin, (*stack, path)), {}, "")
    # re-record provenance of the bases, then this file's own keys
    merged = _merge(merged, raw, origin, str(path))
    return merged


def apply_overrides(raw: dict, overrides: list[str] | None, origin: dict[str, str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
        _record(node[parts[-1]], origin, "command-line override", key.strip())
    return out


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        keys.append(prefix + key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + key + "."))
    return keys


def _allowed_range(loc: tuple) -> str:
    """The numeric bounds of the field at ``loc`` as text, e.g. ``"finite, > 0"`` ('' if none)."""
    model: Any = Config
    field = None
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            break
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        model = field.annotation
    if field is None or "float" not in str(field.annotation):
        return ""
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [f"{ops[k]} {getattr(m, k)}" for m in field.metadata for k in ops if hasattr(m, k)]
    return ", ".join(["finite", *bounds, f"|x| <= {FLOAT32_MAX:.3g}"])


_NAMED_KEY = re.compile(r"^Value error, ((?:[a-z_]+\.)+[a-z_]+)=")


def _format_errors(exc: ValidationError, origin: dict[str, str], default_src: str) -> str:
    lines = []
    valid = _valid_keys(Config)
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        src = origin.get(loc, default_src)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, valid, n=1, cutoff=0.5)
            if not close:  # compare the leaf names within the same section
                section = loc.rsplit(".", 1)[0] + "." if "." in loc else ""
                same = [k for k in valid if k.startswith(section) and "." not in k[len(section) :]]
                close = difflib.get_close_matches(loc, same, n=1, cutoff=0.0)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            lines.append(f"unknown key '{loc}' in {src}{hint}")
        elif err["type"] == "value_error" and (named := _NAMED_KEY.match(err["msg"])):
            # a check across sections names its key and value itself
            key = named.group(1)
            lines.append(
                f"invalid value for '{key}' in {origin.get(key, default_src)}: "
                f"{err['msg'].removeprefix('Value error, ')}"
            )
        else:
            bad = err.get("input")
            allowed = _allowed_range(err["loc"])
            lines.append(
                f"invalid value for '{loc or 'config'}' in {src}: {err['msg']} "
                f"(got {bad!r}{'; allowed: ' + allowed if allowed else ''})"
            )
    return "\n".join(lines)


def load_config_dict(
    raw: dict, origin: dict[str, str] | None = None, source: str = "<dict>"
) -> Config:
    """Validate a raw (already merged) dict; errors name keys and their source files."""
    origin = origin if origin is not None else {}
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config with its ``_base_`` chain and optional ``key=value`` overrides."""
    origin: dict[str, str] = {}
    raw = _resolve(Path(path), origin)
    raw = apply_overrides(raw, overrides, origin)
    return load_config_dict(raw, origin, str(Path(path).resolve()))


INPUT_KEYS = (
    "teacher.checkpoint",
    "model.backbone.pretrained_path",
    "training.init_from",
    "data.root",
    "data.cityscapes_root",
)


def missing_input_files(cfg: Config, keys: tuple[str, ...] = INPUT_KEYS) -> list[str]:
    """One line per input file or folder named by ``keys`` of the config that does not exist.

    ``keys`` is a subset of :data:`INPUT_KEYS` (``data.cityscapes_root`` is only checked for
    ``data.dataset: cityscapes``). The workflow creates some inputs (the synthetic dataset, a
    progressive stage's ``final.pth``), so the commands (``check-config``, ``train``,
    ``cache-teacher``, ``evaluate``) run this before any work, not the Snakefile at parse time.
    """
    kinds = {
        "teacher.checkpoint": (cfg.teacher.checkpoint, "file"),
        "model.backbone.pretrained_path": (cfg.model.backbone.pretrained_path, "file"),
        "training.init_from": (cfg.training.init_from, "file"),
        "data.root": (cfg.data.root, "folder"),
        "data.cityscapes_root": (cfg.data.cityscapes_root, "folder"),
    }
    checks = [
        (k, *kinds[k])
        for k in keys
        if k != "data.cityscapes_root" or cfg.data.dataset == "cityscapes"
    ]
    out = []
    for key, value, kind in checks:
        if value is None:
            if key == "data.cityscapes_root":
                out.append(f"{key} is not set (data.dataset=cityscapes needs the Cityscapes root)")
            continue
        p = Path(value)
        ok = p.is_file() if kind == "file" else p.is_dir()
        if not ok:
            what = "no such file" if not p.exists() else f"not a {kind}"
            out.append(f"{key}={value}: {what} ({p.resolve()})")
    return out


def config_digest(cfg: Config, sections: tuple[str, ...] | None = None) -> str:
    """A short sha256 digest of (parts of) a resolved config, for run identities."""
    d = cfg.to_dict()
    if sections:
        d = {k: d[k] for k in sections}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
