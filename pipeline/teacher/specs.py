"""Sizes of the SAM variants, SAM's pixel statistics and file digests: nothing here imports torch.

Snakemake computes the cache fingerprint (:mod:`pipeline.cache.fingerprint`) at DAG time from
these alone, so planning a workflow does not pay for importing torch, torchvision and
segment-anything. :mod:`pipeline.teacher.sam_builder` builds the models from the specs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.config import SamTinyConfig

__all__ = [
    "PATCH_SIZE",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "PROMPT_EMBED_DIM",
    "TEACHER_SPECS",
    "TeacherSpec",
    "sha256_file",
    "spec_for",
    "tiny_spec",
]

logger = logging.getLogger(__name__)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256  # SAM's image-embedding / prompt width, shared by every type
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class TeacherSpec:
    """Sizes of one SAM variant.

    Arguments:
      embed_dim: ViT width C of the image encoder (block outputs are ``[B, h, w, C]``).
      depth: number of ViT blocks.
      num_heads: attention heads per block.
      global_attn_indexes: blocks with global attention; all others use windows.
      img_size: input side S of the padded square frame.
      window_size: side of the attention windows (0 = every block global).
      decoder_depth: layers of the mask decoder's two-way transformer.
      decoder_mlp_dim: MLP width inside the two-way transformer.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    window_size: int = 14
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048

    @property
    def embedding_size(self) -> int:
        """Side h = w = S / 16 of the image embedding and of every ViT block output."""
        return self.img_size // PATCH_SIZE


# The official variants, as in segment_anything/build_sam.py.
TEACHER_SPECS: dict[str, TeacherSpec] = {
    "vit_h": TeacherSpec(
        embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)
    ),
    "vit_l": TeacherSpec(
        embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_b": TeacherSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
}


def tiny_spec(tiny: SamTinyConfig) -> TeacherSpec:
    """The :class:`TeacherSpec` of ``sam_tiny``; inconsistent sizes name the config field."""
    field = "teacher.tiny"
    if tiny.img_size % PATCH_SIZE:
        raise ValueError(
            f"{field}.img_size={tiny.img_size} must be a multiple of the patch size {PATCH_SIZE}"
        )
    if tiny.embed_dim % tiny.num_heads:
        raise ValueError(
            f"{field}.num_heads={tiny.num_heads} must divide {field}.embed_dim={tiny.embed_dim}"
        )
    bad = [i for i in tiny.global_attn_indexes if not 0 <= i < tiny.depth]
    if bad or len(set(tiny.global_attn_indexes)) != len(tiny.global_attn_indexes):
        raise ValueError(
            f"{field}.global_attn_indexes={tiny.global_attn_indexes} must be distinct "
            f"block indices in [0, {tiny.depth}) ({field}.depth={tiny.depth})"
        )
    return TeacherSpec(
        embed_dim=tiny.embed_dim,
        depth=tiny.depth,
        num_heads=tiny.num_heads,
        global_attn_indexes=tuple(sorted(tiny.global_attn_indexes)),
        img_size=tiny.img_size,
        window_size=tiny.window_size,
        decoder_depth=tiny.decoder_depth,
        decoder_mlp_dim=tiny.decoder_mlp_dim,
    )


def spec_for(teacher_type: str, tiny: SamTinyConfig | None = None) -> TeacherSpec:
    """The sizes of ``teacher_type``; ``sam_tiny`` takes them from ``tiny`` (defaults if None)."""
    if teacher_type == "sam_tiny":
        return tiny_spec(tiny if tiny is not None else SamTinyConfig())
    if teacher_type not in TEACHER_SPECS:
        raise ValueError(
            f"teacher.type={teacher_type!r} is not one of {['sam_tiny', *TEACHER_SPECS]}"
        )
    return TEACHER_SPECS[teacher_type]


# --------------------------------------------------------------------------- sha256
_DIGESTS: dict[tuple, str] = {}  # per process: (path, dev, inode, size, mtime_ns, ctime_ns) -> hex


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's whole content.

    The content is read in full in every process (about 1.6 GB/s on one core, 2 s for vit_h), so
    a flipped byte always changes the digest, even when the file's size and mtime were put
    back. Within one process the digest is reused while the file's device, inode, size, mtime
    and ctime are unchanged (ctime cannot be set by a user: any write changes it).

    The digest is also recorded in a ``<file>.sha256`` sidecar (JSON ``{"size", "mtime_ns",
    "sha256"}``) for people and tools. It is never trusted: when it disagrees with the content
    although size and mtime match, a warning says the file changed in place (tampering or bit
    rot) and the sidecar is rewritten. If the sidecar cannot be written (read-only directory)
    the digest is simply returned.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot hash {path}: no such file")
    stat = path.stat()
    key = (
        str(path.resolve()),
        stat.st_dev,
        stat.st_ino,
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
    )
    if key in _DIGESTS:
        return _DIGESTS[key]
    sidecar = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(sidecar.read_text())
        recorded = (cached["size"], cached["mtime_ns"], str(cached["sha256"]))
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None  # no sidecar or an unreadable one

    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        tqdm(
            total=stat.st_size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=stat.st_size < (256 << 20),
        ) as bar,
    ):
        while chunk := f.read(chunk_size):
            digest.update(chunk)
            bar.update(len(chunk))
    hexdigest = digest.hexdigest()
    _DIGESTS[key] = hexdigest
    if recorded == (stat.st_size, stat.st_mtime_ns, hexdigest):
        return hexdigest
    if recorded is not None and recorded[:2] == (stat.st_size, stat.st_mtime_ns):
        logger.warning(
            "%s: content differs from its sidecar %s (sha256 %s, recorded %s) although "
            "size and mtime match: the file was changed in place (tampering or bit "
            "rot); using the digest of the content",
            path,
            sidecar.name,
            hexdigest[:12],
            recorded[2][:12],
        )

    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": hexdigest}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, sidecar)
        tmp = None
    except OSError as exc:
        logger.debug("not caching the sha256 of %s: %s", path, exc)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return hexdigest
