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

import logging
import re
from collections.abc import Mapping
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

from pipeline.config import SamTinyConfig
from pipeline.teacher.specs import (
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_EMBED_DIM,
    TEACHER_SPECS,
    TeacherSpec,
    sha256_file,
    spec_for,
    tiny_spec,
)

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

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A teacher checkpoint cannot be used; the message names the file."""


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
