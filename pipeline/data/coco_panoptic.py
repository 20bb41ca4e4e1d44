"""Reader of the COCO panoptic format (COCO 2017, Cityscapes via ``csCreatePanopticImgs``, synthetic).

A split is an image folder, a ``panoptic_<split>.json`` and a folder of PNGs whose pixels hold
segment ids ``id = R + 256 * G + 256**2 * B`` (0 = void). Category ids need not be contiguous:
they are mapped to train ids ``0..K-1`` in increasing id order.

Cheap checks (JSON structure, references between images / annotations / categories) run when the
dataset is built and always raise :class:`DataError`. Per-sample problems found while loading
(missing or undecodable files, size mismatches, PNG ids absent from the JSON, images without any
non-crowd segment) raise :class:`DataError` with ``on_bad_sample="error"``, or with
``on_bad_sample="skip"`` turn the sample into ``{"skip_reason", "message", "file_name",
"image_id"}``, which :func:`collate_panoptic` drops and reports.

Documented, counted (not fatal) behaviour, reported through the sample's ``events`` list:

* a grayscale, RGBA, CMYK, palette, ... image is converted to RGB (``"converted_to_rgb:<mode>"``);
* a JSON segment with no pixel in its PNG is dropped (``"dropped_empty_segment"``).

EXIF orientation is not applied: COCO panoptic PNGs are stored in the raw pixel orientation.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "Category",
    "PanopticDataset",
    "collate_panoptic",
    "SkipSummary",
    "load_image_rgb",
    "read_image_rgb",
    "load_panoptic_png",
    "rgb_to_id",
    "id_to_rgb",
    "parse_panoptic_json",
]

# Reasons a sample can be skipped (``skip_reason``); also ``DataError.kind``.
SKIP_REASONS = (
    "missing_image",
    "corrupt_image",
    "missing_png",
    "corrupt_png",
    "png_not_rgb",
    "size_mismatch",
    "unknown_png_id",
    "no_segments",
)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


class DataError(ValueError):
    """A dataset file is missing, malformed or inconsistent.

    Attributes:
        kind: short reason code (one of ``SKIP_REASONS`` or ``"bad_json"``).
        path: the offending file.
    """

    def __init__(self, kind: str, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.kind = kind
        self.path = str(path)


@dataclass(frozen=True)
class Category:
    """One dataset category.

    Attributes:
        id: the dataset's (possibly non-contiguous) category id.
        name: human-readable name.
        isthing: countable object (instances) rather than amorphous stuff.
        color: RGB display colour.
        train_id: contiguous index in ``[0, K)`` (categories sorted by ``id``).
    """

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]
    train_id: int


@dataclass(frozen=True)
class _Segment:
    id: int
    category_id: int
    train_id: int
    isthing: bool
    iscrowd: bool


@dataclass(frozen=True)
class _Record:
    image_id: Any
    file_name: str
    png_name: str
    width: int | None
    height: int | None
    segments: tuple[_Segment, ...]


# ------------------------------------------------------------------------------ decoding
def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` panoptic PNG pixels -> int64 ``[H, W]`` ids ``R + 256 G + 256^2 B``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """int ``[H, W]`` segment ids in ``[0, 2^24)`` -> uint8 ``[H, W, 3]`` panoptic PNG pixels."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError("segment ids must lie in [0, 2^24)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_image_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode an image file to RGB.

    Returns:
        ``(image, mode)``: uint8 ``[H, W, 3]`` and the file's original PIL mode (``"RGB"`` when no
        conversion happened).

    Raises:
        DataError: ``missing_image`` or ``corrupt_image`` (truncated, undecodable), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("missing_image", path, "image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            rgb = im if mode == "RGB" else im.convert("RGB")
            array = np.array(rgb, dtype=np.uint8)
    except _DECODE_ERRORS as e:
        raise DataError(
            "corrupt_image", path, f"cannot decode image ({type(e).__name__}: {e})"
        ) from e
    return array, mode


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB ``[H, W, 3]`` (any PIL mode is converted; see :func:`read_image_rgb`)."""
    return read_image_rgb(path)[0]


def load_panoptic_png(path: str | Path) -> np.ndarray:
    """Decode a COCO panoptic PNG to int64 segment ids ``[H, W]`` (0 = void).

    Raises:
        DataError: ``missing_png``, ``corrupt_png`` or ``png_not_rgb`` (the PNG must be 8-bit RGB),
            naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("missing_png", path, "panoptic PNG not found")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                raise DataError(
                    "png_not_rgb",
                    path,
                    f"panoptic PNG must be 8-bit RGB (id = R + 256 G + 256^2 B), "
                    f"got PIL mode {im.mode!r}",
                )
            rgb = np.array(im, dtype=np.uint8)
    except DataError:
        raise
    except _DECODE_ERRORS as e:
        raise DataError("corrupt_png", path, f"cannot decode PNG ({type(e).__name__}: {e})") from e
    return rgb_to_id(rgb)


# ------------------------------------------------------------------------------ JSON
def _require(
    obj: Any, key: str, types: type | tuple[type, ...], where: str, json_path: Path
) -> Any:
    if not isinstance(obj, dict):
        raise DataError(
            "bad_json", json_path, f"{where} must be an object, got {type(obj).__name__}"
        )
    if key not in obj:
        raise DataError("bad_json", json_path, f"{where} has no field {key!r}")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise DataError(
            "bad_json",
            json_path,
            f"field {key!r} of {where} must be {names}, got {type(value).__name__}",
        )
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _default_color(category_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(category_id)
    return tuple(int(c) for c in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _parse_categories(raw: list, json_path: Path) -> list[Category]:
    parsed = []
    seen: set[int] = set()
    for i, c in enumerate(raw):
        where = f"categories[{i}]"
        cid = _require(c, "id", int, where, json_path)
        name = _require(c, "name", str, where, json_path)
        isthing = _require(c, "isthing", (int, bool), where, json_path)
        if cid in seen:
            raise DataError("bad_json", json_path, f"{where}: duplicate category id {cid}")
        seen.add(cid)
        color = c.get("color")
        if color is None:
            color = _default_color(cid)
        elif not (
            isinstance(color, (list, tuple))
            and len(color) == 3
            and all(isinstance(v, int) and 0 <= v < 256 for v in color)
        ):
            raise DataError(
                "bad_json", json_path, f"field 'color' of {where} must be 3 ints in [0, 255]"
            )
        parsed.append((cid, name, bool(isthing), tuple(int(v) for v in color)))
    if not parsed:
        raise DataError("bad_json", json_path, "field 'categories' is empty")
    parsed.sort(key=lambda t: t[0])
    return [
        Category(cid, name, isthing, color, train_id)  # type: ignore[arg-type]
        for train_id, (cid, name, isthing, color) in enumerate(parsed)
    ]


def parse_panoptic_json(json_path: str | Path) -> tuple[list[Category], list[_Record]]:
    """Read and cross-check a COCO panoptic JSON.

    Returns:
        ``(categories ordered by train_id, one record per annotation in file order)``.

    Raises:
        DataError: (kind ``bad_json``) the file is not JSON, a field is missing or of the wrong
            type, an annotation names an image absent from ``images``, a segment names an unknown
            category, or ids are duplicated. The message names the file and the field/segment.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError("bad_json", json_path, "panoptic JSON not found")
    try:
        data = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError("bad_json", json_path, f"not valid JSON ({e})") from e
    images = _require(data, "images", list, "the top level", json_path)
    annotations = _require(data, "annotations", list, "the top level", json_path)
    categories = _parse_categories(
        _require(data, "categories", list, "the top level", json_path), json_path
    )
    by_cat = {c.id: c for c in categories}

    image_info: dict[Any, dict] = {}
    for i, im in enumerate(images):
        where = f"images[{i}]"
        iid = _require(im, "id", (int, str), where, json_path)
        _require(im, "file_name", str, where, json_path)
        if iid in image_info:
            raise DataError("bad_json", json_path, f"{where}: duplicate image id {iid!r}")
        image_info[iid] = im

    records: list[_Record] = []
    annotated: set[Any] = set()
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        iid = _require(ann, "image_id", (int, str), where, json_path)
        png_name = _require(ann, "file_name", str, where, json_path)
        seg_list = _require(ann, "segments_info", list, where, json_path)
        if iid not in image_info:
            raise DataError(
                "bad_json", json_path, f"{where} has image_id {iid!r}, which is not in 'images'"
            )
        if iid in annotated:
            raise DataError(
                "bad_json", json_path, f"{where}: second annotation for image_id {iid!r}"
            )
        annotated.add(iid)
        segments = []
        seen: set[int] = set()
        for k, s in enumerate(seg_list):
            swhere = f"{where}.segments_info[{k}] (image_id {iid!r})"
            sid = _require(s, "id", int, swhere, json_path)
            cat_id = _require(s, "category_id", int, swhere, json_path)
            crowd = s.get("iscrowd", 0)
            if not isinstance(crowd, (int, bool)):
                raise DataError(
                    "bad_json", json_path, f"field 'iscrowd' of {swhere} must be 0 or 1"
                )
            if not 0 < sid < 1 << 24:
                raise DataError(
                    "bad_json", json_path, f"{swhere}: segment id {sid} outside [1, 2^24)"
                )
            if sid in seen:
                raise DataError("bad_json", json_path, f"{swhere}: duplicate segment id {sid}")
            seen.add(sid)
            if cat_id not in by_cat:
                raise DataError(
                    "bad_json",
                    json_path,
                    f"{swhere}: segment id {sid} has unknown category_id {cat_id}",
                )
            cat = by_cat[cat_id]
            segments.append(_Segment(sid, cat_id, cat.train_id, cat.isthing, bool(crowd)))
        im = image_info[iid]
        width, height = im.get("width"), im.get("height")
        records.append(
            _Record(
                image_id=iid,
                file_name=im["file_name"],
                png_name=png_name,
                width=width if isinstance(width, int) else None,
                height=height if isinstance(height, int) else None,
                segments=tuple(segments),
            )
        )
    return categories, records


def image_path_candidates(image_dir: Path, file_name: str) -> list[Path]:
    """Where an image named ``file_name`` in the JSON may live under ``image_dir``.

    COCO keeps images flat. Cityscapes (``csCreatePanopticImgs``) writes file names such as
    ``aachen_000000_000019_gtFine_leftImg8bit.png`` while the image is
    ``leftImg8bit/<split>/aachen/aachen_000000_000019_leftImg8bit.png``: the city is the part of the
    name before the first underscore.
    """
    names = [file_name]
    if file_name.endswith("_gtFine_leftImg8bit.png"):
        names.append(file_name[: -len("_gtFine_leftImg8bit.png")] + "_leftImg8bit.png")
    out = [image_dir / n for n in names]
    if "_" in file_name:
        city = file_name.split("_")[0]
        out += [image_dir / city / n for n in names]
    return out


# ------------------------------------------------------------------------------ dataset
class PanopticDataset(Dataset):
    """A COCO-panoptic-format split as data samples (see ``docs/architecture.md``).

    Arguments:
        image_dir: folder of images (flat, or ``<city>/`` sub-folders for Cityscapes).
        json_path: ``panoptic_<split>.json``.
        png_dir: folder of panoptic PNGs.
        transform: ``callable(sample, generator) -> sample`` (e.g. ``TrainTransform``); ``None``
            returns the original image and labels with an identity ``transform``.
        on_bad_sample: ``"error"`` raises :class:`DataError`; ``"skip"`` returns a skip record.
        require_segments: an image with no non-crowd segment is bad input (``no_segments``) when
            True (training: nothing to learn from); False keeps it (evaluation scores it).
        seed: augmentation seed. Sample ``i`` of epoch ``e`` draws from a generator seeded by
            ``(seed, e, i)`` only, so it is identical across workers, restarts and resumes.
    """

    def __init__(
        self,
        image_dir: str | Path,
        json_path: str | Path,
        png_dir: str | Path,
        transform: Callable[[dict, torch.Generator], dict] | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        seed: int = 0,
        require_segments: bool = True,
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.image_dir = Path(image_dir)
        self.json_path = Path(json_path)
        self.png_dir = Path(png_dir)
        if not self.image_dir.is_dir():
            raise DataError("missing_image", self.image_dir, "image folder not found")
        if not self.png_dir.is_dir():
            raise DataError("missing_png", self.png_dir, "panoptic PNG folder not found")
        self.categories, self._records = parse_panoptic_json(self.json_path)
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.seed = int(seed)
        self.require_segments = bool(require_segments)
        self.epoch = 0
        self._index = {str(r.image_id): i for i, r in enumerate(self._records)}

    # ---------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return len(self._records)

    @property
    def num_classes(self) -> int:
        """K, the number of categories."""
        return len(self.categories)

    @property
    def image_ids(self) -> list[str]:
        """``image_id`` of every sample, as strings, in dataset order."""
        return [str(r.image_id) for r in self._records]

    def index_of(self, image_id: str) -> int:
        """Dataset index of an ``image_id`` (given as a string)."""
        try:
            return self._index[str(image_id)]
        except KeyError:
            raise KeyError(f"{self.json_path}: no annotation for image_id {image_id!r}") from None

    def subset(self, indices: Sequence[int]) -> "PanopticDataset":
        """A copy holding only samples ``indices`` (in that order; e.g. the labelled part of a
        label-scarce split). Sample ``k`` of the copy augments as index ``k`` of a dataset."""
        out = copy.copy(self)
        out._records = [self._records[int(i)] for i in indices]
        out._index = {str(r.image_id): k for k, r in enumerate(out._records)}
        return out

    def segments(self, index: int) -> list[dict[str, Any]]:
        """Raw JSON segments of sample ``index``: dicts with ``id``, ``category_id``, ``train_id``,
        ``isthing`` and ``iscrowd`` (crowd and pixel-less segments included)."""
        return [
            dict(
                id=s.id,
                category_id=s.category_id,
                train_id=s.train_id,
                isthing=s.isthing,
                iscrowd=s.iscrowd,
            )
            for s in self._records[index].segments
        ]

    def image_path(self, index: int) -> Path:
        """The image file of sample ``index`` (see :func:`image_path_candidates`).

        Raises:
            DataError: ``missing_image``, listing the paths tried.
        """
        rec = self._records[index]
        candidates = image_path_candidates(self.image_dir, rec.file_name)
        for p in candidates:
            if p.is_file():
                return p
        tried = ", ".join(str(p) for p in candidates)
        raise DataError("missing_image", candidates[0], f"image file not found (tried {tried})")

    def png_path(self, index: int) -> Path:
        """The panoptic PNG of sample ``index``."""
        return self.png_dir / self._records[index].png_name

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = int(epoch)

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        """The augmentation generator of sample ``index`` in ``epoch`` (default: current epoch)."""
        epoch = self.epoch if epoch is None else int(epoch)
        state = np.random.SeedSequence([self.seed, epoch, int(index)]).generate_state(2, np.uint32)
        g = torch.Generator()
        g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
        return g

    # ---------------------------------------------------------------- loading
    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of ``index``, or a skip record ``{"skip_reason", "message", "file_name",
        "image_id"}`` when it is bad and ``on_bad_sample="skip"``."""
        rec = self._records[index]
        try:
            sample = self.load_original(index)
        except DataError as e:
            if self.on_bad_sample == "error":
                raise
            return {
                "skip_reason": e.kind,
                "message": str(e),
                "file_name": rec.file_name,
                "image_id": str(rec.image_id),
            }
        if self.transform is not None:
            sample = self.transform(sample, self.generator(index))
        return sample

    def load_original(self, index: int) -> dict[str, Any]:
        """Sample ``index`` at its original resolution, without augmentation.

        Raises:
            DataError: the image or PNG is missing / undecodable, their sizes differ, the PNG holds
                an id absent from ``segments_info``, or no non-crowd segment has a pixel.
        """
        rec = self._records[index]
        image, mode = read_image_rgb(self.image_path(index))
        png = self.png_path(index)
        ids = load_panoptic_png(png)
        events: list[str] = [] if mode == "RGB" else [f"converted_to_rgb:{mode}"]
        if image.shape[:2] != ids.shape:
            raise DataError(
                "size_mismatch",
                png,
                f"PNG is {ids.shape[1]}x{ids.shape[0]} (WxH) but image {rec.file_name} "
                f"is {image.shape[1]}x{image.shape[0]}",
            )
        if (
            rec.width is not None
            and rec.height is not None
            and (rec.height, rec.width) != ids.shape
        ):
            raise DataError(
                "size_mismatch",
                png,
                f"PNG is {ids.shape[1]}x{ids.shape[0]} (WxH) but {self.json_path} "
                f"says image {rec.image_id!r} is {rec.width}x{rec.height}",
            )
        present = set(np.unique(ids).tolist())
        known = {s.id for s in rec.segments}
        unknown = sorted(present - known - {0})
        if unknown:
            shown = ", ".join(str(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataError(
                "unknown_png_id",
                png,
                f"PNG holds segment id(s) {shown} absent from segments_info of image_id "
                f"{rec.image_id!r} in {self.json_path}",
            )
        kept = [s for s in rec.segments if s.id in present]
        events += ["dropped_empty_segment"] * (len(rec.segments) - len(kept))
        things = [s for s in kept if not s.iscrowd]
        if not things and self.require_segments:
            raise DataError(
                "no_segments",
                png,
                f"image_id {rec.image_id!r} has no non-crowd segment with pixels",
            )

        ids_t = torch.from_numpy(ids)
        seg_ids = torch.tensor([s.id for s in things], dtype=torch.int64)
        crowd_ids = torch.tensor([s.id for s in kept if s.iscrowd], dtype=torch.int64)
        H, W = ids.shape
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "masks": ids_t[None] == seg_ids[:, None, None],
            "labels": torch.tensor([s.train_id for s in things], dtype=torch.int64),
            "segment_ids": seg_ids,
            "ignore": (ids_t == 0) | torch.isin(ids_t, crowd_ids),
            "valid": torch.ones((H, W), dtype=torch.bool),
            "transform": np.eye(3, dtype=np.float64),
            "image_id": str(rec.image_id),
            "orig_size": (H, W),
            "file_name": rec.file_name,
            "events": events,
        }


# ------------------------------------------------------------------------------ batching
def _pad_to(t: Tensor, size: tuple[int, int], value: bool | int) -> Tensor:
    H, W = size
    out = torch.full((*t.shape[:-2], H, W), value, dtype=t.dtype)
    out[..., : t.shape[-2], : t.shape[-1]] = t
    return out


def collate_panoptic(
    batch: Sequence[Mapping[str, Any]], size_divisibility: int = 32
) -> dict[str, Any]:
    """Batch data samples, dropping skip records.

    Arguments:
        batch: samples and/or skip records from :class:`PanopticDataset`.
        size_divisibility: padded height and width are multiples of this.

    Returns:
        ``images``: uint8 ``[B, 3, Hp, Wp]``, zero-padded bottom/right;
        ``targets``: the B samples with ``masks``/``ignore``/``valid`` padded the same way
        (padding: masks false, ignore true, valid false; ``transform`` is unchanged);
        ``skipped``: ``(file_name, skip_reason)`` per dropped record;
        ``events``: ``(file_name, event)`` per counted conversion / dropped segment.
    """
    samples = [b for b in batch if "skip_reason" not in b]
    skipped = [(b["file_name"], b["skip_reason"]) for b in batch if "skip_reason" in b]
    events = [(s["file_name"], e) for s in samples for e in s.get("events", ())]
    if not samples:
        return {
            "images": torch.zeros((0, 3, 0, 0), dtype=torch.uint8),
            "targets": [],
            "skipped": skipped,
            "events": events,
        }
    d = size_divisibility
    Hp = math.ceil(max(s["image"].shape[-2] for s in samples) / d) * d
    Wp = math.ceil(max(s["image"].shape[-1] for s in samples) / d) * d
    images = torch.stack([_pad_to(s["image"], (Hp, Wp), 0) for s in samples])
    targets = []
    for s in samples:
        t = dict(s)
        t["masks"] = _pad_to(s["masks"], (Hp, Wp), False)
        t["ignore"] = _pad_to(s["ignore"], (Hp, Wp), True)
        t["valid"] = _pad_to(s["valid"], (Hp, Wp), False)
        targets.append(t)
    return {"images": images, "targets": targets, "skipped": skipped, "events": events}


class SkipSummary(Counter):
    """Counts skipped samples (``"skipped:<reason>"``) and counted events
    (``"converted_to_rgb:<mode>"``, ``"dropped_empty_segment"``) over collated batches."""

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Count one :func:`collate_panoptic` output."""
        for _, reason in batch.get("skipped", ()):
            self[f"skipped:{reason}"] += 1
        for _, event in batch.get("events", ()):
            self[event] += 1

    @property
    def num_skipped(self) -> int:
        return sum(n for k, n in self.items() if k.startswith("skipped:"))

    def report(self) -> str:
        """One human-readable line, e.g. ``skipped 2 samples (missing_image 2); converted_to_rgb:L 1``."""
        if not self:
            return "no samples skipped, converted or trimmed"
        skipped = {
            k.split(":", 1)[1]: n for k, n in sorted(self.items()) if k.startswith("skipped:")
        }
        parts = []
        if skipped:
            detail = ", ".join(f"{k} {n}" for k, n in skipped.items())
            parts.append(f"skipped {sum(skipped.values())} samples ({detail})")
        parts += [f"{k} {n}" for k, n in sorted(self.items()) if not k.startswith("skipped:")]
        return "; ".join(parts)
