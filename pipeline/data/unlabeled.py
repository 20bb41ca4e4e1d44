"""Unlabelled images: where they come from, the label-scarce split, and their data samples.

Two kinds of images make up the unlabelled set of a config, in this order:

1. **The held-out part of the train split** when ``data.labeled_fraction < 1``: a fixed subset of
   ``round(fraction * N)`` train images keeps its labels (:func:`labeled_indices`, a seeded
   permutation of ``data.labeled_seed``, independent of the training seed so every seed of a
   benchmark shares one split and one cache); the others lose them and are listed here by their
   COCO ``image_id``.
2. **The sources of** ``data.unlabeled``, each a folder under ``data.root`` (every ``.jpg``,
   ``.jpeg`` and ``.png`` directly in it, sorted by name) or a folder plus a COCO image-info JSON
   (``{"images": [{"id", "file_name"}, ...]}``, e.g. ``image_info_unlabeled2017.json``) that
   lists which of its files to use. Their image id is ``<folder>/<file name>`` (never a plain
   integer, so it cannot collide with a train image id).

:class:`UnlabeledDataset` reads them with the labelled reader's image checks
(:func:`pipeline.data.coco_panoptic.read_image_rgb`): a missing or undecodable file raises a
:class:`~pipeline.data.coco_panoptic.DataError` naming it (``on_bad_sample: error``) or becomes a
counted skip record (``skip``); a grayscale, CMYK, palette or RGBA file is converted to RGB and
counted (``converted_to_rgb:<mode>``). A sample has the fields of a labelled one with no segment
(``masks [0, H, W]``, ``labels [0]``, ``segment_ids [0]``, nothing ignored) and
``unlabeled: True``; the train augmentation gives it a view and its exact ``transform`` the
same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.coco_panoptic import (
    Category,
    DataError,
    PanopticDataset,
    read_image_rgb,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "UnlabeledDataset",
    "UnlabeledImage",
    "heldout_train_images",
    "labeled_indices",
    "source_images",
    "unlabeled_images",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABELED_STREAM = 0x1ABE1  # generator stream of the labelled subset
UNLABELED_AUG_STREAM = 0x0A11  # augmentation stream of unlabelled samples (not the labelled one's)


@dataclass(frozen=True)
class UnlabeledImage:
    """One unlabelled image: its id (the key in the unlabelled teacher cache) and its file."""

    image_id: str
    path: Path


def labeled_indices(num_images: int, fraction: float, seed: int) -> np.ndarray:
    """The train indices that keep their labels: ``max(1, round(fraction * N))`` of them.

    A pure function of ``(N, fraction, seed)``: the first indices of the permutation of the
    generator ``(seed, LABELED_STREAM)``, sorted. ``fraction >= 1`` keeps every index.

    Returns:
        int64 ``[k]``, increasing.
    """
    if num_images < 1:
        raise ValueError(f"the train split has no images (num_images={num_images})")
    if not 0 < fraction <= 1:
        raise ValueError(f"data.labeled_fraction must lie in (0, 1], got {fraction}")
    if fraction >= 1:
        return np.arange(num_images, dtype=np.int64)
    k = min(num_images, max(1, round(fraction * num_images)))
    perm = np.random.default_rng([int(seed), LABELED_STREAM]).permutation(num_images)
    return np.sort(perm[:k]).astype(np.int64)


def source_images(
    root: str | Path, images: str, image_list: str | None = None
) -> list[UnlabeledImage]:
    """The images of one ``data.unlabeled`` source (see the module docstring).

    Raises:
        DataError: the folder or the list is missing, or the list is not an image-info JSON
            (naming the file and the field).
    """
    folder = Path(root) / images
    if not folder.is_dir():
        raise DataError(
            "missing_image", folder, f"unlabelled image folder not found (data.unlabeled: {images})"
        )
    if image_list is None:
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        return [UnlabeledImage(f"{images}/{p.name}", p) for p in files]
    list_path = Path(root) / image_list
    if not list_path.is_file():
        raise DataError("bad_json", list_path, "unlabelled image list not found")
    try:
        doc = json.loads(list_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError("bad_json", list_path, f"not valid JSON ({exc})") from exc
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise DataError("bad_json", list_path, "expected an object with an 'images' list")
    out = []
    for k, entry in enumerate(entries):
        name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError("bad_json", list_path, f"images[{k}] has no string field 'file_name'")
        out.append(UnlabeledImage(f"{images}/{name}", folder / name))
    return out


def heldout_train_images(
    train: PanopticDataset, fraction: float, seed: int
) -> list[UnlabeledImage]:
    """The train images outside :func:`labeled_indices`, in dataset order, keyed by image id."""
    keep = set(labeled_indices(len(train), fraction, seed).tolist())
    out = []
    for i, image_id in enumerate(train.image_ids):
        if i in keep:
            continue
        try:
            path = train.image_path(i)
        except DataError as exc:  # a missing file becomes a counted skip when it is read
            path = Path(exc.path)
        out.append(UnlabeledImage(image_id, path))
    return out


def unlabeled_images(cfg: Any) -> list[UnlabeledImage]:
    """Every unlabelled image of a config: the held-out train images, then ``data.unlabeled``.

    Raises:
        DataError: a source is missing or malformed, or two images share an id.
    """
    out: list[UnlabeledImage] = []
    if cfg.data.labeled_fraction < 1:
        image_dir, json_path, png_dir = cfg.split_paths("train")
        train = PanopticDataset(image_dir, json_path, png_dir)
        out += heldout_train_images(train, cfg.data.labeled_fraction, cfg.data.labeled_seed)
    for source in cfg.data.unlabeled:
        out += source_images(cfg.data.root, source.images, source.image_list)
    seen: dict[str, Path] = {}
    for img in out:
        if img.image_id in seen:
            raise DataError(
                "bad_json",
                img.path,
                f"unlabelled image id {img.image_id!r} appears twice ({seen[img.image_id]}); "
                "data.unlabeled lists the same image more than once",
            )
        seen[img.image_id] = img.path
    return out


class UnlabeledDataset(Dataset):
    """Unlabelled images as data samples (see the module docstring).

    Arguments:
        images: the images, in cache order (:func:`unlabeled_images`).
        categories: the label set of the labelled data (the teacher's pseudo-classes use it).
        transform: ``callable(sample, generator) -> sample`` (``TrainTransform``), or None for the
            original image with an identity ``transform``.
        on_bad_sample: ``"error"`` raises :class:`DataError` naming the file; ``"skip"`` returns
            a skip record ``{"skip_reason", "message", "file_name", "image_id"}``.
        seed: augmentation seed; sample ``i`` of epoch ``e`` draws from ``(seed, e, i)`` and a
            stream tag of its own, so it never repeats a labelled sample's draw.
    """

    def __init__(
        self,
        images: Sequence[UnlabeledImage],
        categories: Sequence[Category] = (),
        transform: Callable[[dict, torch.Generator], dict] | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        seed: int = 0,
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.images = list(images)
        self.categories = list(categories)
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[str]:
        return [img.image_id for img in self.images]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        epoch = self.epoch if epoch is None else int(epoch)
        state = np.random.SeedSequence(
            [self.seed, epoch, int(index), UNLABELED_AUG_STREAM]
        ).generate_state(2, np.uint32)
        g = torch.Generator()
        g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
        return g

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.images[index]
        try:
            sample = self.load_original(index)
        except DataError as e:
            if self.on_bad_sample == "error":
                raise
            return {
                "skip_reason": e.kind,
                "message": str(e),
                "file_name": str(img.path),
                "image_id": img.image_id,
            }
        if self.transform is not None:
            sample = self.transform(sample, self.generator(index))
        return sample

    def load_original(self, index: int) -> dict[str, Any]:
        """Sample ``index`` at its original resolution (no segment).

        Raises:
            DataError: ``missing_image`` / ``corrupt_image`` naming the file.
        """
        img = self.images[index]
        image, mode = read_image_rgb(img.path)
        H, W = image.shape[:2]
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "masks": torch.zeros((0, H, W), dtype=torch.bool),
            "labels": torch.zeros(0, dtype=torch.int64),
            "segment_ids": torch.zeros(0, dtype=torch.int64),
            "ignore": torch.zeros((H, W), dtype=torch.bool),
            "valid": torch.ones((H, W), dtype=torch.bool),
            "transform": np.eye(3, dtype=np.float64),
            "image_id": img.image_id,
            "orig_size": (H, W),
            "file_name": str(img.path),
            "events": [] if mode == "RGB" else [f"converted_to_rgb:{mode}"],
            "unlabeled": True,
        }
