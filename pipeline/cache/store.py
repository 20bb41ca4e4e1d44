"""The on-disk teacher cache: one Zarr v3 group (LocalStore) plus JSON files beside it.

Layout of a cache directory (N images in dataset order, L levels, P = ``max_segments``)::

    manifest.json                      fingerprint, its sha256, layout, PCA digest once fitted
    COMPLETE.json                      summary, written last by a finished run (Snakemake output)
    skips/<index>.json                 why image <index> was skipped (status 2)
    data.zarr/                         the Zarr group holding every array below:
      status                    uint8    [N]            0 todo, 1 done, 2 skipped; written last
      features/<level>/values   f16|i8   [N, C_l, h, w] PCA coefficients (or raw, if C <= channels)
      features/<level>/scale    float32  [N, C_l]       int8 only: x = values * scale + offset
      features/<level>/offset   float32  [N, C_l]       int8 only
      segments/mask_logits/values  f16|i8 [N, P, m, m] SAM's mask logits, padded with zeros
      segments/mask_logits/scale   float32 [N, P]      int8 only (per segment)
      segments/mask_logits/offset  float32 [N, P]      int8 only
      segments/segment_ids      int64    [N, P]         panoptic ids, padded with -1
      segments/labels           int64    [N, P]         train ids, padded with -1
      segments/iou              float32  [N, P]
      segments/embeddings       float32  [N, P, 256]
      images/orig_size          int32    [N, 2]         (H0, W0)
      segments/stability        float32  [N, P]         unlabelled caches only: SAM's stability score
      segments/confidence       float32  [N, P]         unlabelled caches only (see runner)
      pca/<level>/mean          float64  [C]            only levels wider than cache.channels
      pca/<level>/components    float64  [C, k]
      pca/<level>/explained_variance  float64 [k]
      prototypes/embeddings     float32  [K, 256]
      prototypes/counts         int64    [K]

Every per-image array has one chunk per image (chunk index = dataset index), so dask workers
write their images concurrently without locks. Chunks are compressed with Blosc
(``cache.compressor``, ``cache.clevel``, byte shuffle; :func:`blosc_codec`): numcodecs' Blosc
does the compression, declared in the store as the Zarr v3 specification's ``blosc`` codec so
that any Zarr v3 reader can open the cache. Zarr's LocalStore writes each chunk to a
temporary file and renames it, so a killed writer leaves whole chunks (and stray ``*.partial``
files, removed on reopening). An image counts as done only once ``status`` says so, and
``status`` is written after all of the image's other arrays.

An image with more than ``max_segments`` segments is an error naming the image.

Missing chunks. Zarr answers a read of a chunk that does not exist with the fill value, so a
deleted chunk file would read as zeros. Every chunk is therefore written even when it equals the
fill value (``write_empty_chunks``), and a done image must have a chunk in every per-image array:
:meth:`CacheStore.missing_chunks` lists the arrays whose chunk of an image is gone (one ``exists``
per array), :meth:`CacheStore.read_image` refuses such an image with
:class:`CacheIntegrityError` naming the store, the image and the array, and the class
prototypes and PCA bases are checked the same way when read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

# zarr's bridge to its IO event loop (what zarr.Array itself uses). Internal API: pyproject.toml
# bounds zarr to the versions that have it. It lets one image's arrays be read/written
# concurrently, 1.4x faster per image than one public ``Array[...]`` call per array.
from zarr.core.sync import sync
from zarr.storage import LocalStore

from pipeline.cache.fingerprint import (
    FingerprintMismatchError,
    describe_differences,
    fingerprint_sha256,
)
from pipeline.cache.pca import PcaBasis, basis_sha256
from pipeline.cache.quant import dequantize_int8, quantize_int8, to_float16

__all__ = [
    "blosc_codec",
    "COMPLETE_FILE",
    "CacheLayout",
    "CacheIntegrityError",
    "CacheStore",
    "CacheWriteError",
    "ImageRecord",
    "MANIFEST_FILE",
    "UNLABELED_ARRAYS",
    "ZARR_DIR",
    "STATUS_DONE",
    "STATUS_NAMES",
    "STATUS_SKIPPED",
    "STATUS_TODO",
    "atomic_write_json",
    "translate_os_errors",
]

STATUS_TODO, STATUS_DONE, STATUS_SKIPPED = 0, 1, 2
STATUS_NAMES = {STATUS_TODO: "todo", STATUS_DONE: "done", STATUS_SKIPPED: "skipped"}
MANIFEST_FILE = "manifest.json"
COMPLETE_FILE = "COMPLETE.json"
SKIPS_DIR = "skips"
ZARR_DIR = "data.zarr"
MASKS = "segments/mask_logits"


def blosc_codec(compressor: str, clevel: int) -> BloscCodec:
    """The chunk codec of every cache array: Blosc with byte shuffle.

    Compression runs in numcodecs' Blosc (the compressor must be built into it: checked here,
    before any image is computed). The codec is declared as the Zarr v3 specification's
    ``blosc`` codec (``zarr.codecs.BloscCodec``, which delegates to ``numcodecs.Blosc``) rather
    than numcodecs' own Zarr v3 wrapper, whose ``numcodecs.blosc`` metadata other Zarr v3
    implementations do not read.
    """
    available = numcodecs.blosc.list_compressors()
    if compressor not in available:
        raise ValueError(
            f"cache.compressor={compressor!r} is not built into this Blosc "
            f"(numcodecs {numcodecs.__version__}): choose one of {available}"
        )
    return BloscCodec(cname=compressor, clevel=clevel, shuffle=BloscShuffle.shuffle)


async def _get_all(arrays: Sequence[Any], index: int) -> list[np.ndarray]:
    return list(await asyncio.gather(*(a.getitem(index) for a in arrays)))


async def _set_all(arrays: Sequence[Any], values: Sequence[np.ndarray], index: int) -> None:
    await asyncio.gather(*(a.setitem(index, v) for a, v in zip(arrays, values)))


class CacheIntegrityError(ValueError):
    """Data of a done image (or of the prototypes / PCA basis) is gone from the store: names the
    store, the image and the array."""


_WRITE_ALL_CHUNKS = {"write_empty_chunks": True}  # a chunk equal to the fill value is written too


class CacheWriteError(OSError):
    """The cache directory cannot be written (permissions, full disk, ...); names the path."""


@contextlib.contextmanager
def translate_os_errors(path: Path | str, action: str) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block into a :class:`CacheWriteError` naming
    ``path`` and the cause (full disk, quota, permissions, read-only file system)."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as exc:
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            why = "no space left on the device (disk or quota full); free space or move cache.root"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "not writable (permissions or read-only file system); set cache.root to a writable folder"
        elif code in (errno.ENOTDIR, errno.EEXIST):
            why = "a path component is a file, not a folder; set cache.root to a writable folder"
        else:
            why = f"{type(exc).__name__}: {exc.strerror or exc}"
        raise CacheWriteError(code, f"{action} {path}: {why} ({exc})") from exc


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``."""
    with translate_os_errors(path, "cannot write"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@dataclass(frozen=True)
class CacheLayout:
    """Shapes and storage settings of a cache.

    Attributes:
      image_ids: ``image_id`` (string) of each dataset index.
      level_names: per level ``"block{i}"`` or ``"neck"``.
      teacher_channels: per level the teacher's width C_l.
      level_channels: per level the stored width (``min(C_l, cache.channels)``).
      grid_sizes: per level ``(h, w)``.
      input_size: S.
      mask_size: m.
      max_segments: P, per-image segment capacity.
      embed_dim: width of the segment embeddings (256).
      dtype: ``"float16"`` or ``"int8"``.
      compressor, clevel: Blosc settings.
      categories: ``{"id", "name", "isthing", "train_id"}`` per class, by train id.
      unlabeled: a cache of unlabelled images (SAM's automatic segments, ``labels`` = the
        pseudo-class, plus ``segments/stability`` and ``segments/confidence``).
    """

    image_ids: list[str]
    level_names: list[str]
    teacher_channels: list[int]
    level_channels: list[int]
    grid_sizes: list[tuple[int, int]]
    input_size: int
    mask_size: int
    max_segments: int
    embed_dim: int
    dtype: str
    compressor: str
    clevel: int
    categories: list[dict[str, Any]] = field(default_factory=list)
    unlabeled: bool = False

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def pca_levels(self) -> list[bool]:
        """Which levels are PCA-reduced."""
        return [c > k for c, k in zip(self.teacher_channels, self.level_channels)]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid_sizes"] = [list(g) for g in self.grid_sizes]
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "CacheLayout":
        d = dict(d)
        d["grid_sizes"] = [tuple(g) for g in d["grid_sizes"]]
        return CacheLayout(**d)


@dataclass
class ImageRecord:
    """Everything cached for one image, in float32 before quantisation.

    Attributes:
      features: per level ``[C_l, h, w]`` (already PCA-projected).
      mask_logits: ``[M, m, m]``.
      iou: ``[M]``.
      embeddings: ``[M, 256]``.
      segment_ids: int64 ``[M]``.
      labels: int64 ``[M]`` train ids (pseudo-classes in an unlabelled cache).
      orig_size: (H0, W0).
      stability, confidence: float32 ``[M]``, unlabelled caches only.
    """

    features: list[np.ndarray]
    mask_logits: np.ndarray
    iou: np.ndarray
    embeddings: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray
    orig_size: tuple[int, int]
    stability: np.ndarray | None = None
    confidence: np.ndarray | None = None


UNLABELED_ARRAYS = ("segments/stability", "segments/confidence")


def _padded(x: np.ndarray, rows: int, dtype: Any, fill: Any) -> np.ndarray:
    out = np.full((rows, *x.shape[1:]), fill, dtype=dtype)
    out[: x.shape[0]] = x
    return out


class CacheStore:
    """Reads and writes one cache directory (see the module docstring for the layout).

    Use :meth:`create_or_open` to start or resume a build and :meth:`open` to read. The Zarr
    group is opened lazily in each process, so a store can be pickled to dask workers or
    DataLoader workers (only the path travels).

    Arguments:
      path: the cache directory (holding ``manifest.json``).
      writable: open the Zarr group for writing.
    """

    def __init__(self, path: str | Path, writable: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        manifest = self.path / MANIFEST_FILE
        if not manifest.is_file():
            raise FileNotFoundError(f"no teacher cache at {self.path} ({MANIFEST_FILE} missing)")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
            self.layout = CacheLayout.from_json(self.manifest["layout"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{manifest}: unreadable cache manifest ({exc}); delete {self.path} "
                "and rebuild the cache"
            ) from exc
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._pid = -1

    # ------------------------------------------------------------------ creation
    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        fingerprint: dict[str, Any],
        layout: CacheLayout,
        annotation_sha256: str | None = None,
    ) -> "CacheStore":
        """Open the store at ``path`` for writing, creating it if it has no manifest yet.

        An existing store must have the same fingerprint (else :class:`FingerprintMismatchError`
        listing the differing fields), the same ``annotation_sha256`` (when both are known) and
        the same layout.
        """
        path = Path(path)
        if (path / MANIFEST_FILE).is_file():
            store = cls(path, writable=True)
            store.check_fingerprint(fingerprint)
            recorded = store.manifest.get("annotation_sha256")
            if annotation_sha256 is not None and recorded not in (None, annotation_sha256):
                raise FingerprintMismatchError(
                    f"teacher cache {path} was built from other annotations than asked:\n  "
                    f"annotation_sha256: cache {recorded[:12]}, asked {annotation_sha256[:12]}\n"
                    f"The panoptic JSON changed after the cache was started. Move or delete {path} "
                    "and run `snakemake cache_teacher` again."
                )
            if store.layout != layout:
                raise ValueError(
                    f"{path}: the cache layout differs from the dataset's (another "
                    "image list or category set under the same fingerprint); delete "
                    "the folder and rebuild"
                )
            store.remove_partial_files()
            return store
        with translate_os_errors(path, "cannot create the teacher cache"):
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_probe"
            probe.write_bytes(b"")
            probe.unlink()
            cls._create_arrays(path, layout)  # mode "w": clears a half-created group first
            (path / SKIPS_DIR).mkdir(exist_ok=True)
        atomic_write_json(
            path / MANIFEST_FILE,
            {
                "fingerprint": fingerprint,
                "fingerprint_sha256": fingerprint_sha256(fingerprint),
                "layout": layout.to_json(),
                "annotation_sha256": annotation_sha256,
                "pca": None,
            },
        )
        return cls(path, writable=True)

    @staticmethod
    def _create_arrays(path: Path, layout: CacheLayout) -> None:
        group = zarr.open_group(LocalStore(path / ZARR_DIR), mode="w", zarr_format=3)
        blosc = blosc_codec(layout.compressor, layout.clevel)
        n, p, m = layout.num_images, layout.max_segments, layout.mask_size

        def create(name: str, shape: tuple[int, ...], dtype: str, fill: Any = 0) -> None:
            group.create_array(
                name,
                shape=shape,
                chunks=(1, *shape[1:]),
                dtype=dtype,
                compressors=blosc,
                fill_value=fill,
                overwrite=True,
            )

        def create_quantized(name: str, shape: tuple[int, ...]) -> None:
            create(f"{name}/values", shape, layout.dtype)
            if layout.dtype == "int8":
                create(f"{name}/scale", shape[:2], "float32")
                create(f"{name}/offset", shape[:2], "float32")

        create("status", (n,), "uint8")
        for name, c, (h, w) in zip(layout.level_names, layout.level_channels, layout.grid_sizes):
            create_quantized(f"features/{name}", (n, c, h, w))
        create_quantized(MASKS, (n, p, m, m))
        create("segments/segment_ids", (n, p), "int64", -1)
        create("segments/labels", (n, p), "int64", -1)
        create("segments/iou", (n, p), "float32")
        create("segments/embeddings", (n, p, layout.embed_dim), "float32")
        create("images/orig_size", (n, 2), "int32")
        if layout.unlabeled:
            for name in UNLABELED_ARRAYS:
                create(name, (n, p), "float32")

    # ------------------------------------------------------------------ access
    @classmethod
    def open(cls, path: str | Path) -> "CacheStore":
        """Open an existing cache read-only."""
        return cls(path, writable=False)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["fingerprint"]

    @property
    def fingerprint_sha256(self) -> str:
        return self.manifest["fingerprint_sha256"]

    @property
    def group(self) -> zarr.Group:
        """The Zarr group, (re)opened on first use in each process."""
        if self._group is None or self._pid != os.getpid():
            store = LocalStore(self.path / ZARR_DIR, read_only=not self.writable)
            self._group = zarr.open_group(store, mode="r+" if self.writable else "r", zarr_format=3)
            self._arrays = {}
            self._pid = os.getpid()
        return self._group

    def array(self, name: str) -> zarr.Array:
        """A Zarr array of the group by path, e.g. ``"segments/iou"`` (handles are cached)."""
        group = self.group
        if name not in self._arrays:
            arr = group[name]
            if self.writable:  # every written chunk exists on disk, even an all-fill one
                arr = arr.with_config(_WRITE_ALL_CHUNKS)  # type: ignore[union-attr]
            self._arrays[name] = arr  # type: ignore[assignment]
        return self._arrays[name]

    def image_array_names(self) -> list[str]:
        """Every array holding one chunk per image (``status`` first)."""
        levels = [
            n for name in self.layout.level_names for n in self._quantized_names(f"features/{name}")
        ]
        return [
            "status",
            *levels,
            *self._quantized_names(MASKS),
            "segments/segment_ids",
            "segments/labels",
            "segments/iou",
            "segments/embeddings",
            "images/orig_size",
            *(UNLABELED_ARRAYS if self.layout.unlabeled else ()),
        ]

    def missing_chunks(self, index: int, names: Sequence[str] | None = None) -> list[str]:
        """The arrays among ``names`` (default: :meth:`image_array_names`) whose chunk of image
        ``index`` does not exist in the store (one ``exists`` call per array)."""
        names = list(names or self.image_array_names())
        arrays = [self.array(n) for n in names]

        async def probe() -> list[bool]:
            return list(
                await asyncio.gather(
                    *(
                        a.store_path.store.exists(
                            f"{a.path}/{a.metadata.encode_chunk_key((index,) + (0,) * (a.ndim - 1))}"
                        )
                        for a in arrays
                    )
                )
            )

        return [n for n, ok in zip(names, sync(probe())) if not ok]

    def _whole_array_missing(self, name: str) -> bool:
        arr = self.array(name)
        return arr.nchunks_initialized < arr.nchunks

    def _refuse_missing(self, index: int, missing: Sequence[str]) -> None:
        image_id = self.layout.image_ids[index]
        raise CacheIntegrityError(
            f"teacher cache {self.path}: image {image_id!r} (index {index}) has no data in "
            f"{', '.join(missing)} (chunk file deleted or lost); the store is damaged. Run "
            f"`python -m pipeline cache-verify {self.path}` for the full list, then move the "
            "folder away and rebuild it with `snakemake cache_teacher`."
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_group=None, _arrays={}, _pid=-1)
        return state

    def check_fingerprint(self, expected: dict[str, Any]) -> None:
        """Raise :class:`FingerprintMismatchError` listing every field where the stored
        fingerprint differs from ``expected``."""
        diffs = describe_differences(self.fingerprint, expected)
        if diffs:
            raise FingerprintMismatchError(
                f"teacher cache {self.path} was built with other settings than asked:\n  "
                + "\n  ".join(diffs)
                + "\nRun `snakemake cache_teacher` (or `python -m pipeline cache-teacher`) for this "
                "config; it writes a cache of its own."
            )

    def remove_partial_files(self) -> int:
        """Delete temporary ``*.partial`` chunk files left by a killed writer; returns the count."""
        removed = 0
        for p in self.path.rglob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
        return removed

    # ------------------------------------------------------------------ status
    def status(self) -> np.ndarray:
        """uint8 ``[N]`` status of every image (reads one small chunk per image)."""
        return self.array("status")[:]

    def status_of(self, index: int) -> int:
        return int(self.array("status")[index])

    def skip_info(self, index: int) -> dict[str, Any] | None:
        """The sidecar of a skipped image, or None."""
        p = self.path / SKIPS_DIR / f"{index:08d}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    # ------------------------------------------------------------------ writing
    def write_image(self, index: int, record: ImageRecord) -> None:
        """Write one image's arrays (concurrently), then mark it done."""
        lay = self.layout
        image_id = lay.image_ids[index]
        m = int(record.segment_ids.shape[0])
        if m > lay.max_segments:
            raise ValueError(
                f"image {image_id!r} (index {index}) has {m} segments, more than the "
                f"cache's max_segments={lay.max_segments}; raise cache.max_segments"
            )
        if len(record.features) != len(lay.level_names):
            raise ValueError(
                f"image {image_id!r}: {len(record.features)} feature levels, the cache "
                f"has {len(lay.level_names)}"
            )
        chunks: dict[str, np.ndarray] = {}
        for name, x in zip(lay.level_names, record.features):
            chunks.update(
                self._quantized_chunks(f"features/{name}", x, f"image {image_id!r} level {name}")
            )
        masks = np.zeros((lay.max_segments, lay.mask_size, lay.mask_size), np.float32)
        masks[:m] = record.mask_logits
        chunks.update(self._quantized_chunks(MASKS, masks, f"image {image_id!r} mask logits"))
        p = lay.max_segments
        chunks["segments/segment_ids"] = _padded(record.segment_ids, p, np.int64, -1)
        chunks["segments/labels"] = _padded(record.labels, p, np.int64, -1)
        chunks["segments/iou"] = _padded(record.iou, p, np.float32, 0)
        chunks["segments/embeddings"] = _padded(record.embeddings, p, np.float32, 0)
        chunks["images/orig_size"] = np.asarray(record.orig_size, np.int32)
        if lay.unlabeled:
            for name, x in zip(UNLABELED_ARRAYS, (record.stability, record.confidence)):
                if x is None or x.shape != (m,):
                    raise ValueError(
                        f"image {image_id!r}: an unlabelled cache needs {name.split('/')[1]} "
                        f"[{m}] per segment, got {None if x is None else list(x.shape)}"
                    )
                chunks[name] = _padded(x, p, np.float32, 0)
        with translate_os_errors(self.path, "cannot write to the teacher cache"):
            sync(
                _set_all([self.array(n).async_array for n in chunks], list(chunks.values()), index)
            )
            self.array("status")[index] = STATUS_DONE  # last: the image is complete

    def write_skip(self, index: int, reason: str, message: str = "", **extra: Any) -> None:
        """Record why image ``index`` is skipped (sidecar JSON), then mark it skipped."""
        info = {
            "index": index,
            "image_id": self.layout.image_ids[index],
            "reason": reason,
            "message": message,
            **extra,
        }
        atomic_write_json(self.path / SKIPS_DIR / f"{index:08d}.json", info)
        with translate_os_errors(self.path, "cannot write to the teacher cache"):
            self.array("status")[index] = STATUS_SKIPPED

    def _quantized_chunks(self, name: str, x: np.ndarray, what: str) -> dict[str, np.ndarray]:
        if not np.isfinite(x).all():
            raise ValueError(f"{what}: the teacher produced NaN or inf")
        if self.layout.dtype == "int8":
            q, scale, offset = quantize_int8(x)
            return {f"{name}/values": q, f"{name}/scale": scale, f"{name}/offset": offset}
        return {f"{name}/values": to_float16(x, what)}

    # ------------------------------------------------------------------ reading
    def _quantized_names(self, name: str) -> list[str]:
        suffixes = ("values", "scale", "offset") if self.layout.dtype == "int8" else ("values",)
        return [f"{name}/{k}" for k in suffixes]

    def _dequantize(
        self, parts: Sequence[np.ndarray], rows: int | None = None, keep_float16: bool = False
    ) -> np.ndarray:
        cut = slice(None) if rows is None else slice(rows)
        if self.layout.dtype == "int8":
            return dequantize_int8(parts[0][cut], parts[1][cut], parts[2][cut])
        if keep_float16:
            return parts[0][cut]
        return parts[0][cut].astype(np.float32)

    def read_quantized(self, name: str, index: int) -> np.ndarray:
        """Dequantised float32 values of image ``index`` of a quantised array group."""
        names = self._quantized_names(name)
        return self._dequantize(sync(_get_all([self.array(n).async_array for n in names], index)))

    def read_image(self, index: int, keep_float16: bool = False) -> dict[str, Any]:
        """One image's stored arrays as float32 / int64 numpy (segments cut to the real count).

        All chunks of the image are fetched concurrently. ``keep_float16=True`` returns the
        features and mask logits of a float16 store as stored (half the memory of float32); an
        int8 store is always dequantised to float32.

        Returns:
          dict with ``features`` (per level ``[C_l, h, w]``), ``segment_ids [M]``, ``labels [M]``,
          ``mask_logits [M, m, m]``, ``iou [M]``, ``embeddings [M, 256]``, ``orig_size (H0, W0)``.
        """
        levels = [self._quantized_names(f"features/{n}") for n in self.layout.level_names]
        masks = self._quantized_names(MASKS)
        plain = [
            "segments/segment_ids",
            "segments/labels",
            "segments/iou",
            "segments/embeddings",
            "images/orig_size",
            *(UNLABELED_ARRAYS if self.layout.unlabeled else ()),
        ]
        names = [n for group in levels for n in group] + masks + plain
        missing = self.missing_chunks(index, ["status", *names])
        if missing:
            self._refuse_missing(index, missing)
        got = dict(zip(names, sync(_get_all([self.array(n).async_array for n in names], index))))
        ids = got["segments/segment_ids"]
        m = int((ids >= 0).sum())
        return {
            "features": [
                self._dequantize([got[n] for n in group], None, keep_float16) for group in levels
            ],
            "segment_ids": ids[:m],
            "labels": got["segments/labels"][:m],
            "mask_logits": self._dequantize([got[n] for n in masks], m, keep_float16),
            "iou": got["segments/iou"][:m],
            "embeddings": got["segments/embeddings"][:m],
            "orig_size": (int(got["images/orig_size"][0]), int(got["images/orig_size"][1])),
            **{n.split("/")[1]: got[n][:m] for n in plain if n in UNLABELED_ARRAYS},
        }

    def read_segments(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings [M, 256], labels [M])`` of image ``index``."""
        labels = self.array("segments/labels")[index]
        m = int((labels >= 0).sum())
        return self.array("segments/embeddings")[index][:m], labels[:m]

    # ------------------------------------------------------------------ PCA
    def write_pca(self, bases: Sequence[PcaBasis | None]) -> str:
        """Store the per-level bases and record their sha256 in the manifest; returns it."""
        blosc = blosc_codec(self.layout.compressor, self.layout.clevel)
        levels = {}
        with translate_os_errors(self.path, "cannot write the PCA basis to"):
            for name, b in zip(self.layout.level_names, bases):
                if b is None:
                    continue
                for key, value in (
                    ("mean", b.mean),
                    ("components", b.components),
                    ("explained_variance", b.explained_variance),
                ):
                    arr = self.group.create_array(
                        f"pca/{name}/{key}",
                        shape=value.shape,
                        dtype="float64",
                        compressors=blosc,
                        overwrite=True,
                        config=_WRITE_ALL_CHUNKS,
                        attributes={
                            "total_variance": b.total_variance,
                            "num_samples": b.num_samples,
                        },
                    )
                    arr[...] = value
                levels[name] = {
                    "explained_variance_ratio": b.explained_variance_ratio,
                    "num_samples": b.num_samples,
                }
        digest = basis_sha256(bases)
        self.manifest["pca"] = {"sha256": digest, "levels": levels}
        atomic_write_json(self.path / MANIFEST_FILE, self.manifest)
        return digest

    @property
    def pca_fitted(self) -> bool:
        return self.manifest.get("pca") is not None

    def read_pca(self) -> list[PcaBasis | None]:
        """Per level the stored basis (None for levels stored unreduced)."""
        if not self.pca_fitted:
            raise ValueError(
                f"{self.path}: no PCA basis stored yet (the cache build did not get "
                "past its PCA pass)"
            )
        out: list[PcaBasis | None] = []
        for name, reduced in zip(self.layout.level_names, self.layout.pca_levels):
            if not reduced:
                out.append(None)
                continue
            gone = [
                k
                for k in ("mean", "components", "explained_variance")
                if self._whole_array_missing(f"pca/{name}/{k}")
            ]
            if gone:
                raise CacheIntegrityError(
                    f"teacher cache {self.path}: pca/{name}/{gone[0]} has no data (chunk file "
                    "deleted or lost); move the folder away and rebuild the cache"
                )
            mean = self.array(f"pca/{name}/mean")
            out.append(
                PcaBasis(
                    mean=mean[...],
                    components=self.array(f"pca/{name}/components")[...],
                    explained_variance=self.array(f"pca/{name}/explained_variance")[...],
                    total_variance=float(mean.attrs["total_variance"]),
                    num_samples=int(mean.attrs["num_samples"]),
                )
            )
        return out

    # ------------------------------------------------------------------ prototypes
    def write_prototypes(self, prototypes: np.ndarray, counts: np.ndarray) -> None:
        blosc = blosc_codec(self.layout.compressor, self.layout.clevel)
        with translate_os_errors(self.path, "cannot write the class prototypes to"):
            self.group.create_array(
                "prototypes/embeddings",
                shape=prototypes.shape,
                dtype="float32",
                compressors=blosc,
                overwrite=True,
                config=_WRITE_ALL_CHUNKS,
            )[...] = prototypes
            self.group.create_array(
                "prototypes/counts",
                shape=counts.shape,
                dtype="int64",
                compressors=blosc,
                overwrite=True,
                config=_WRITE_ALL_CHUNKS,
            )[...] = counts
        self._arrays.pop("prototypes/embeddings", None)
        self._arrays.pop("prototypes/counts", None)

    def has_prototypes(self) -> bool:
        return "prototypes" in self.group and "embeddings" in self.group["prototypes"]  # type: ignore[operator]

    def read_prototypes(self) -> np.ndarray:
        """float32 ``[K, 256]`` unit class prototypes."""
        if not self.has_prototypes():
            raise ValueError(
                f"{self.path}: no class prototypes stored (the cache build did not "
                "finish); rerun `snakemake cache_teacher`"
            )
        if self._whole_array_missing("prototypes/embeddings"):
            raise CacheIntegrityError(
                f"teacher cache {self.path}: prototypes/embeddings has no data (chunk file "
                "deleted or lost); the store is damaged. Move the folder away and rebuild it "
                "with `snakemake cache_teacher`."
            )
        return self.array("prototypes/embeddings")[...]

    # ------------------------------------------------------------------ completion
    @property
    def complete(self) -> dict[str, Any] | None:
        """The ``COMPLETE.json`` summary, or None while the build is unfinished."""
        p = self.path / COMPLETE_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def write_complete(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / COMPLETE_FILE, summary)
