"""Data layer: COCO-panoptic reader, augmentations with exact affine bookkeeping, generators."""

from pipeline.data.coco_panoptic import (
    Category,
    DataError,
    PanopticDataset,
    SkipSummary,
    collate_panoptic,
    load_image_rgb,
    load_panoptic_png,
)
from pipeline.data.geometry import hflip_matrix, scale_matrix, translate_matrix, warp_affine
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    normalize_images,
)

__all__ = [
    "Category",
    "DataError",
    "PanopticDataset",
    "SkipSummary",
    "collate_panoptic",
    "load_image_rgb",
    "load_panoptic_png",
    "warp_affine",
    "scale_matrix",
    "translate_matrix",
    "hflip_matrix",
    "TrainTransform",
    "EvalTransform",
    "normalize_images",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
