"""Build and load the SAM teacher (``vit_h``, ``vit_l``, ``vit_b`` and the toy ``sam_tiny``).

The three official types are assembled from segment-anything's own modules with exactly the
arguments of ``segment_anything/build_sam.py``; ``sam_tiny`` uses the same modules at the sizes
of :class:`pipeline.config.SamTinyConfig`, keeping SAM's 256-d prompt/image-embedding width.

Checkpoints are official-layout state dicts (``sam_vit_b_01ec64.pth`` and friends). They are
read with ``torch.load(path, map_location="cpu", weights_only=True)`` and checked before
``load_state_dict(strict=True)``: a missing file, an unreadable file, an object that is not a
flat state dict, weights of another SAM type and missing/unexpected/mis-shaped keys each raise
an error that names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from tqdm import tqdm

from pipeline.config import SamTinyConfig

__all__ = [
    "CheckpointError",
    "PATCH_SIZE",
    "PROMPT_EMBED_DIM",
    "TEACHER_SPECS",
    "TeacherSpec",
    "build_sam",
    "build_teacher",
    "default_layers",
    "identify_checkpoint",
    "load_state_dict_file",
    "sha256_file",
    "spec_for",
    "tiny_spec",
]

logger = logging.getLogger(__name__)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256  # SAM's image-embedding / prompt width, shared by every type
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A teacher checkpoint cannot be used; the message names the file."""


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


def build_sam(spec: TeacherSpec) -> Sam:
    """A randomly initialised :class:`Sam` of these sizes, as segment-anything's ``_build_sam``."""
    embedding_size = spec.embedding_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=spec.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=PROMPT_EMBED_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth,
                embedding_dim=PROMPT_EMBED_DIM,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=8,
            ),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )


# ------------------------------------------------------------------------ checkpoints
def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official-layout checkpoint: a flat ``{name: tensor}`` mapping, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"{path}: cannot read the teacher checkpoint (corrupt, truncated or "
            f"not a torch file): {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of parameter names to "
            f"tensors), got {type(obj).__name__}"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(obj[k], Mapping)]
        hint = (
            f"; it wraps a nested mapping under {nested[:3]} - save the bare SAM state dict "
            f"(the official layout) instead"
            if nested
            else ""
        )
        raise CheckpointError(
            f"{path}: not a flat state dict: {len(bad)} entries are not tensors, "
            f"e.g. {[str(k) for k in bad[:3]]}{hint}"
        )
    return dict(obj)


def _encoder_shape(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(embed_dim, number of ViT blocks) read from the tensors, None without a patch embedding."""
    weight = state_dict.get(_PATCH_KEY)
    if weight is None or weight.ndim != 4:
        return None
    blocks = [int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))]
    return int(weight.shape[0]), (max(blocks) + 1 if blocks else 0)


def identify_checkpoint(
    state_dict: Mapping[str, torch.Tensor], tiny: SamTinyConfig | None = None
) -> str | None:
    """The SAM type whose encoder width and depth the tensors have, or None if no type fits.

    ``sam_tiny`` (with the sizes of ``tiny``) is only considered when ``tiny`` is given.
    """
    shape = _encoder_shape(state_dict)
    if shape is None:
        return None
    specs = dict(TEACHER_SPECS)
    if tiny is not None:
        specs["sam_tiny"] = tiny_spec(tiny)
    for name, spec in specs.items():
        if (spec.embed_dim, spec.depth) == shape:
            return name
    return None


def _check_type(
    state_dict: Mapping[str, torch.Tensor],
    teacher_type: str,
    spec: TeacherSpec,
    tiny: SamTinyConfig | None,
    path: Path,
) -> None:
    shape = _encoder_shape(state_dict)
    if shape is None:
        return  # no encoder tensors: reported as missing keys against the built model
    if shape == (spec.embed_dim, spec.depth):
        return
    want = f"config says {teacher_type} (embed_dim {spec.embed_dim}, {spec.depth} blocks)"
    got = f"embed_dim {shape[0]}, {shape[1]} blocks"
    found = identify_checkpoint(state_dict, tiny)
    if found is not None:
        raise CheckpointError(
            f"{path}: checkpoint looks like {found} ({got}), {want}; set "
            f"teacher.type: {found} or point teacher.checkpoint at "
            f"{teacher_type} weights"
        )
    raise CheckpointError(f"{path}: checkpoint has {got}, which matches no SAM type, {want}")


def _check_keys(
    state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, path: Path, show: int = 5
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or mis_shaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[:show]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:show]}")
    if mis_shaped:
        parts.append(
            f"{len(mis_shaped)} keys with another shape (file vs model), e.g. {mis_shaped[:show]}"
        )
    msg = f"{path}: checkpoint does not fit the SAM model: " + "; ".join(parts)
    if unexpected and all(k.startswith("module.") for k in unexpected):
        msg += " (keys carry a 'module.' prefix from DataParallel/DDP; strip it before saving)"
    raise CheckpointError(msg)


def build_teacher(
    teacher_type: str,
    checkpoint: str | Path | None,
    tiny: SamTinyConfig | None = None,
    seed: int = 0,
) -> Sam:
    """Build the SAM teacher in eval mode with frozen weights.

    Arguments:
      teacher_type: ``"vit_h"``, ``"vit_l"``, ``"vit_b"`` or ``"sam_tiny"``.
      checkpoint: path of an official-layout state dict, or None for random weights.
      tiny: sizes of ``sam_tiny`` (ignored for the other types; default sizes if None).
      seed: seed of the random initialisation (used without a checkpoint; the global torch
        RNG state is left untouched).

    Returns:
      A :class:`Sam` on the CPU, in eval mode, with ``requires_grad=False`` everywhere.
    """
    spec = spec_for(teacher_type, tiny)
    state_dict = None
    if checkpoint is not None:
        path = Path(checkpoint)
        state_dict = load_state_dict_file(path)
        _check_type(state_dict, teacher_type, spec, tiny, path)
    else:
        logger.warning(
            "teacher %s has no checkpoint: using RANDOMLY INITIALISED weights (seed %d). A random "
            "teacher only exercises the plumbing; its features, masks and IoUs carry no "
            "knowledge. Set teacher.checkpoint to an official SAM .pth for real distillation.",
            teacher_type,
            seed,
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = build_sam(spec)
    if state_dict is not None:
        _check_keys(state_dict, sam, path)
        sam.load_state_dict(state_dict, strict=True)
        logger.info("loaded %s teacher weights from %s", teacher_type, path)
    sam.eval()
    sam.requires_grad_(False)
    return sam


def default_layers(sam: Sam) -> list[int | str]:
    """The levels cached by default: the global-attention blocks, the final block via the neck.

    The final ViT block feeds SAM's neck, so it is replaced by ``"neck"`` (the official 256-d
    image embedding); every other global-attention block is returned by index. For the
    official types this is the global indexes with the last one replaced, e.g. vit_b ->
    ``[2, 5, 8, "neck"]``.
    """
    blocks = sam.image_encoder.blocks
    last = len(blocks) - 1
    return [i for i, blk in enumerate(blocks) if blk.window_size == 0 and i != last] + ["neck"]


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
