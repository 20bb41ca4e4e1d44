"""Files a config needs before any work, checked up front with messages a user can act on.

Each check returns ``None`` or one short paragraph that names the config key, the path it
resolved to and what to do (where the official SAM checkpoints and timm weights come from,
which folders COCO panoptic and Cityscapes need). :func:`require` joins the paragraphs of the
failed checks into one :class:`MissingInputError`; the CLI and the Snakefile print it without a
traceback (``--debug`` shows one).

Nothing here opens a model file: the loaders (:func:`pipeline.teacher.sam_builder.build_teacher`,
:class:`pipeline.models.backbone.RegNetBackbone`) check contents when a job starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.config import Config

__all__ = [
    "MissingInputError",
    "SAM_CHECKPOINT_URLS",
    "check_backbone_weights",
    "check_cityscapes_root",
    "check_split",
    "check_teacher_checkpoint",
    "check_unlabeled",
    "require",
    "workflow_checks",
]

# The official files listed in segment-anything's README ("Model Checkpoints").
SAM_CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}

COCO_LAYOUT = (
    "COCO panoptic 2017 needs, under data.root: train2017/ and val2017/ (the images, "
    "train2017.zip and val2017.zip from https://cocodataset.org/#download) and "
    "annotations/panoptic_train2017.json, annotations/panoptic_val2017.json with the PNG folders "
    "annotations/panoptic_train2017/ and annotations/panoptic_val2017/ (from "
    "panoptic_annotations_trainval2017.zip: unzip it, then unzip the two panoptic_*2017.zip "
    "inside it into annotations/)."
)


class MissingInputError(FileNotFoundError):
    """A file or folder the config points at does not exist; the message says what to do."""


def check_teacher_checkpoint(cfg: Config) -> str | None:
    """``teacher.checkpoint`` must exist when set (``null`` = randomly initialised teacher)."""
    path = cfg.teacher.checkpoint
    if path is None or Path(path).is_file():
        return None
    t = cfg.teacher.type
    if t in SAM_CHECKPOINT_URLS:
        url = SAM_CHECKPOINT_URLS[t]
        todo = (
            f"download SAM's official {t} weights ({url}; every type is listed under "
            "'Model Checkpoints' in https://github.com/facebookresearch/segment-anything) "
            f"to that path, or point teacher.checkpoint in the config at your copy"
        )
    else:
        todo = (
            "save the state dict of a sam_tiny model there, or set teacher.checkpoint: null "
            "for a randomly initialised teacher (plumbing only)"
        )
    return f"teacher.checkpoint = {path}: file not found ({t} teacher). To fix: {todo}."


def check_backbone_weights(cfg: Config) -> str | None:
    """``model.backbone.pretrained_path`` must exist when set (``null`` = random init)."""
    path = cfg.model.backbone.pretrained_path
    if path is None or Path(path).is_file():
        return None
    name = cfg.model.backbone.name
    return (
        f"model.backbone.pretrained_path = {path}: file not found. The backbone's ImageNet "
        "weights are read from a local file in timm's layout (nothing is downloaded): on a "
        'machine with internet run python -c "import timm, torch; torch.save(timm.'
        f"create_model('{name}', pretrained=True).state_dict(), '{Path(path).name}')\" and "
        f"copy the file to {path}, or set model.backbone.pretrained_path: null to start from "
        "random weights."
    )


def check_split(cfg: Config, *splits: str) -> str | None:
    """The image folder, panoptic JSON and PNG folder of COCO-panoptic-format splits."""
    if cfg.data.dataset == "synthetic":
        return None  # written by `python -m pipeline synthetic` / the synthetic_data rule
    root = Path(cfg.data.root)
    missing = []
    for split in splits:
        paths = getattr(cfg.data, split)
        for key, rel, is_dir in (
            (f"data.{split}.images", paths.images, True),
            (f"data.{split}.json", paths.json_file, False),
            (f"data.{split}.png_dir", paths.png_dir, True),
        ):
            if not ((root / rel).is_dir() if is_dir else (root / rel).is_file()):
                missing.append(f"{key} = {rel}")
    if not missing:
        return None
    where = "does not exist" if not root.is_dir() else f"lacks {', '.join(missing)}"
    if cfg.data.dataset == "cityscapes":
        todo = (
            "run `snakemake convert_cityscapes` (or `python -m pipeline convert-cityscapes "
            "--config ...`) first; it writes the panoptic JSON and PNG folders under gtFine/"
        )
    else:
        todo = f"{COCO_LAYOUT} Set data.root to the folder that holds them"
    return f"data.root = {root} {where}. {todo}."


def check_unlabeled(cfg: Config) -> str | None:
    """Every ``data.unlabeled`` source: its image folder and, when set, its image-list JSON.

    The synthetic dataset's ``unlabeled/`` folder is written by ``python -m pipeline synthetic``
    (the synthetic_data rule), so it is not required beforehand. What the files hold is checked
    when they are read (:func:`pipeline.data.unlabeled.source_images`).
    """
    if cfg.data.dataset == "synthetic":
        return None
    root = Path(cfg.data.root)
    missing = []
    for k, source in enumerate(cfg.data.unlabeled):
        if not (root / source.images).is_dir():
            missing.append(
                f"data.unlabeled[{k}].images = {source.images} (folder {root / source.images})"
            )
        if source.image_list is not None and not (root / source.image_list).is_file():
            missing.append(
                f"data.unlabeled[{k}].image_list = {source.image_list} "
                f"(file {root / source.image_list})"
            )
    if not missing:
        return None
    return (
        f"unlabelled images not found under data.root = {root}: {'; '.join(missing)}. Point "
        "data.unlabeled at folders of images relative to data.root (for COCO: unlabeled2017/ from "
        "unlabeled2017.zip, with image_list: annotations/image_info_unlabeled2017.json from "
        "image_info_unlabeled2017.zip, https://cocodataset.org/#download), or remove the entry."
    )


def check_cityscapes_root(cfg: Config) -> str | None:
    """``data.cityscapes_root`` must hold the official ``gtFine/`` and ``leftImg8bit/``."""
    if cfg.data.dataset != "cityscapes":
        return None
    root = cfg.data.cityscapes_root
    if root is None:
        return (
            "data.cityscapes_root is not set. Point it at the Cityscapes folder holding "
            "gtFine/ and leftImg8bit/."
        )
    missing = [d for d in ("gtFine", "leftImg8bit") if not (Path(root) / d).is_dir()]
    if not missing:
        return None
    return (
        f"data.cityscapes_root = {root}: missing {', '.join(m + '/' for m in missing)}. "
        "Download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from "
        "https://www.cityscapes-dataset.com/downloads/ (registration needed) and unzip both "
        "there; `snakemake convert_cityscapes` then writes the panoptic annotations."
    )


def require(problems: Iterable[str | None]) -> None:
    """Raise one :class:`MissingInputError` holding every non-empty paragraph of ``problems``."""
    found = list(dict.fromkeys(p for p in problems if p))
    if found:
        raise MissingInputError("\n\n".join(found))


def workflow_checks(main: Config, runs: Iterable[Config]) -> list[str | None]:
    """Everything the Snakemake workflow reads that it does not produce itself.

    The dataset (for Cityscapes the official tree; the conversion is a rule), the teacher
    checkpoint (its sha256 names the cache), the unlabelled image sources and every run's
    backbone weights.
    """
    checks: list[str | None] = [check_teacher_checkpoint(main)]
    if main.data.dataset == "cityscapes":
        checks.append(check_cityscapes_root(main))
    else:
        checks.append(check_split(main, "train", "val"))
    runs = list(runs)
    checks += [check_unlabeled(c) for c in [main, *runs] if c.data.unlabeled]
    checks += [check_backbone_weights(c) for c in runs]
    return checks
