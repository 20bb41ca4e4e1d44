"""Warp cached SAM outputs onto the student's grids for one augmented view.

A cached dense map ``[C, h, w]`` and a cached mask ``[m, m]`` cover SAM's padded ``S x S`` input
frame (the image resized so its longest side is ``S``, top-left, zero-padded). The matrix that
takes a cached map grid to a destination grid of size ``(h', w')`` laid over the view is composed
as in ``docs/architecture.md``::

    grid <- view:      diag(w' / W, h' / H)              (view of size H x W)
    view <- original:  A_view                            (the data sample's ``transform``)
    original <- frame: diag(1 / s, 1 / s)                (s = S / max(H0, W0))
    frame <- map grid: diag(S / w, S / h)

and :func:`pipeline.data.geometry.warp_affine` resamples bilinearly under the pixel-centre
convention. A destination pixel is valid when its centre comes from inside the original image
``[0, W0) x [0, H0)`` (not SAM's zero padding, not the view's padding) and lies inside the view.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.geometry import scale_matrix, warp_affine

__all__ = [
    "map_to_view_matrix",
    "view_to_grid_matrix",
    "inside_extent",
    "stack_teacher_items",
    "batch_warp_teacher_targets",
    "warp_teacher_targets",
]

REQUIRED_KEYS = (
    "features",
    "segment_ids",
    "mask_logits",
    "cls_logits",
    "scale",
    "input_size",
    "orig_size",
)


def map_to_view_matrix(
    transform: Any, scale: float, input_size: int, map_size: tuple[int, int]
) -> np.ndarray:
    """Matrix from a cached map grid (covering the ``S x S`` frame) to view coordinates.

    Arguments:
        transform: ``[3, 3]`` original -> view matrix (array or tensor).
        scale: ``s``, original -> frame scale.
        input_size: ``S``, side of the teacher frame.
        map_size: ``(h, w)`` of the cached map.

    Returns:
        float64 ``[3, 3]``: ``A_view @ diag(1/s, 1/s) @ diag(S/w, S/h)``.
    """
    h, w = map_size
    a_view = _matrix(transform)
    return (
        a_view
        @ scale_matrix(1.0 / scale, 1.0 / scale)
        @ scale_matrix(input_size / w, input_size / h)
    )


def view_to_grid_matrix(view_size: tuple[int, int], grid_size: tuple[int, int]) -> np.ndarray:
    """``diag(w' / W, h' / H)``: view coordinates -> a ``(h', w')`` grid laid over the view."""
    (H, W), (h, w) = view_size, grid_size
    return scale_matrix(w / W, h / H)


def inside_extent(matrices: Tensor, grid_size: tuple[int, int], extents: Tensor) -> Tensor:
    """Which grid pixel centres come from inside a source extent.

    Arguments:
        matrices: float64 ``[B, 3, 3]`` source -> grid matrices.
        grid_size: ``(h, w)`` of the grid.
        extents: float64 ``[B, 2]`` source ``(width, height)``.

    Returns:
        bool ``[B, h, w]``: the pre-image of the centre lies in ``[0, width) x [0, height)``.
    """
    h, w = grid_size
    if matrices.device.type == "cpu":  # numpy's batched 3x3 inverse: ~10x less overhead
        inv = torch.from_numpy(np.linalg.inv(matrices.to(torch.float64).numpy()))
    else:
        inv = torch.linalg.inv(matrices.to(torch.float64))
    kw = dict(dtype=torch.float64, device=matrices.device)
    xc = (torch.arange(w, **kw) + 0.5).view(1, 1, w)
    yc = (torch.arange(h, **kw) + 0.5).view(1, h, 1)
    ew = extents[:, 0, None, None].to(torch.float64)
    eh = extents[:, 1, None, None].to(torch.float64)
    if not (inv[:, 0, 1].any() or inv[:, 1, 0].any()):
        # axis-aligned (scale, flip, translate: every training view): x depends on the column
        # only and y on the row only, so test [B, 1, w] and [B, h, 1] and combine once
        x = inv[:, 0, 0, None, None] * xc + inv[:, 0, 2, None, None]
        y = inv[:, 1, 1, None, None] * yc + inv[:, 1, 2, None, None]
        return ((x >= 0) & (x < ew)) & ((y >= 0) & (y < eh))
    x = inv[:, 0, 0, None, None] * xc + inv[:, 0, 1, None, None] * yc + inv[:, 0, 2, None, None]
    y = inv[:, 1, 0, None, None] * xc + inv[:, 1, 1, None, None] * yc + inv[:, 1, 2, None, None]
    return (x >= 0) & (x < ew) & (y >= 0) & (y < eh)


def _matrix(transform: Any) -> np.ndarray:
    m = np.asarray(
        transform.detach().cpu() if isinstance(transform, Tensor) else transform, dtype=np.float64
    )
    if m.shape != (3, 3):
        raise ValueError(f"transform must be a [3, 3] original -> view matrix, got {m.shape}")
    return m


def _check_item(item: dict, index: int, num_levels: int) -> tuple[float, int, int, int]:
    """Validate one cache entry; returns (scale, S, H0, W0)."""
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        raise KeyError(
            f"teacher entry {index} lacks {missing}; expected a TeacherCache.get dict "
            f"with keys {list(REQUIRED_KEYS)}"
        )
    scale, size = float(item["scale"]), int(item["input_size"])
    h0, w0 = (int(v) for v in item["orig_size"])
    if scale <= 0 or abs(scale - size / max(h0, w0)) > 1e-3 * scale:
        raise ValueError(
            f"teacher entry {index}: scale {scale} disagrees with input_size {size} "
            f"and orig_size {(h0, w0)} (expected {size / max(h0, w0):.6g})"
        )
    if len(item["features"]) != num_levels:
        raise ValueError(
            f"teacher entry {index} has {len(item['features'])} feature levels, "
            f"the first entry of the batch {num_levels}"
        )
    m = item["mask_logits"].shape[0]
    if item["segment_ids"].shape != (m,) or item["cls_logits"].shape[0] != m:
        raise ValueError(
            f"teacher entry {index}: segment_ids {tuple(item['segment_ids'].shape)}, "
            f"mask_logits {tuple(item['mask_logits'].shape)} and cls_logits "
            f"{tuple(item['cls_logits'].shape)} disagree on the segment count"
        )
    return scale, size, h0, w0


def stack_teacher_items(items: Sequence[dict | None]) -> dict[str, Any]:
    """Batch the cached teacher outputs of a batch's images, in their stored dtype.

    Runs in the DataLoader workers (:func:`pipeline.training.trainer.collate_training_batch`),
    so the training step receives one tensor per feature level instead of one per image and
    level; float16 caches stay float16 until :func:`batch_warp_teacher_targets` has resampled
    them onto the (smaller) student grids.

    Arguments:
        items: per image a :meth:`TeacherCache.get` dict, or None for an image without a cache
            entry (all its outputs invalid downstream).

    Returns:
        dict with
            ``features``: per cached level ``[B, C_l, h, w]`` (zeros for absent images), in
            channels-last memory format;
            ``mask_logits``: ``[sum M_b, m, m]``, the images' masks one after the other;
            ``mask_counts``: ``[M_b]`` per image (list of int);
            ``segment_ids``: per image int64 ``[M_b]``; ``cls_logits``: per image ``[M_b, K]``;
            ``scale``: float64 ``[B]``; ``input_size``: int64 ``[B]``; ``orig_size``: int64
            ``[B, 2]`` ``(H0, W0)`` (1, 0 and (0, 0) for absent images); ``present``: bool ``[B]``.

    Raises:
        ValueError: no image has an entry, or entries disagree on levels or shapes.
        KeyError: an entry lacks a key.
    """
    present = [it is not None for it in items]
    if not any(present):
        raise ValueError("no image of the batch has a teacher cache entry")
    first = next(it for it in items if it is not None)
    num_levels = len(first["features"])
    meta = {i: _check_item(it, i, num_levels) for i, it in enumerate(items) if it is not None}
    features = []
    for level, ref in enumerate(first["features"]):
        maps = []
        for i, it in enumerate(items):
            fmap = ref.new_zeros(ref.shape) if it is None else it["features"][level]
            if fmap.shape != ref.shape:
                raise ValueError(
                    f"teacher entry {i}: feature level {level} has shape "
                    f"{tuple(fmap.shape)}, the first entry of the batch "
                    f"{tuple(ref.shape)}"
                )
            maps.append(fmap.to(ref.dtype).permute(1, 2, 0))
        # channels-last ([B, h, w, C] in memory, [B, C, h, w] in shape): grid_sample reads the
        # C values of a tap from one place instead of C planes apart (measured on 2 CPU cores:
        # 2.6 ms instead of 7 ms for 4 levels of 8 x 64 x 64 x 64 onto the default grids)
        features.append(torch.stack(maps).permute(0, 3, 1, 2))
    ref_masks = first["mask_logits"]
    counts = [int(it["mask_logits"].shape[0]) if it is not None else 0 for it in items]
    masks = [it["mask_logits"].to(ref_masks.dtype) for it in items if it is not None]
    if any(m.shape[1:] != ref_masks.shape[1:] for m in masks):
        raise ValueError(
            f"teacher entries disagree on the mask size: "
            f"{sorted({tuple(m.shape[1:]) for m in masks})}"
        )
    num_classes = first["cls_logits"].shape[1]
    return {
        "features": features,
        "mask_logits": torch.cat(masks),
        "mask_counts": counts,
        "segment_ids": [
            it["segment_ids"].to(torch.int64)
            if it is not None
            else torch.zeros(0, dtype=torch.int64)
            for it in items
        ],
        "cls_logits": [
            it["cls_logits"] if it is not None else first["cls_logits"].new_zeros(0, num_classes)
            for it in items
        ],
        "scale": torch.tensor(
            [meta[i][0] if present[i] else 1.0 for i in range(len(items))], dtype=torch.float64
        ),
        "input_size": torch.tensor(
            [meta[i][1] if present[i] else 0 for i in range(len(items))], dtype=torch.int64
        ),
        "orig_size": torch.tensor(
            [[meta[i][2], meta[i][3]] if present[i] else [0, 0] for i in range(len(items))],
            dtype=torch.int64,
        ),
        "present": torch.tensor(present, dtype=torch.bool),
    }


def batch_warp_teacher_targets(
    teacher: Sequence[dict | None] | Mapping[str, Any],
    transforms: Sequence[Any] | Tensor,
    view_size: tuple[int, int],
    level_sizes: Sequence[tuple[int, int] | None],
    mask_size_out: tuple[int, int],
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Warp the cached teacher outputs of a batch onto its (shared) view grids.

    Each feature level is resampled with one ``grid_sample`` for the whole batch, and all cached
    masks of the batch with one more; the results are float32.

    Arguments:
        teacher: the batch's :func:`stack_teacher_items` dict, or the per-image list it is made
            from (per image a :meth:`TeacherCache.get` dict, or None for an image without a
            cache entry: counted in ``present``, all its pixels invalid).
        transforms: per image the ``[3, 3]`` original -> view matrix (or one ``[B, 3, 3]``).
        view_size: ``(H, W)`` of the (padded) batch images.
        level_sizes: per cached level the destination grid ``(h, w)`` laid over the view (e.g. a
            student level ``(H / stride, W / stride)``), or None to skip that level.
        mask_size_out: ``(h4, w4)`` destination of the mask logits (the student's mask grid).
        device: where the outputs live (default: where the cached tensors are).

    Returns:
        dict with
            ``features``: per level ``[B, C_l, h, w]`` float32 (0 where invalid), or None;
            ``feature_valid``: per level bool ``[B, h, w]``, or None;
            ``mask_logits``: per image ``[M_b, h4, w4]`` float32;
            ``mask_valid``: bool ``[B, h4, w4]``;
            ``segment_ids``: per image int64 ``[M_b]``;
            ``cls_logits``: per image ``[M_b, K]`` float32;
            ``present``: bool ``[B]``.
    """
    stacked = teacher if isinstance(teacher, Mapping) else stack_teacher_items(teacher)
    present_t = stacked["present"].cpu()
    batch = int(present_t.numel())
    present = present_t.tolist()
    if isinstance(transforms, Tensor) and transforms.ndim == 3:
        transforms = list(transforms)
    if len(transforms) != batch:
        raise ValueError(f"got {batch} teacher entries but {len(transforms)} transforms")
    if len(stacked["features"]) != len(level_sizes):
        raise ValueError(
            f"the teacher entries have {len(stacked['features'])} feature levels, "
            f"level_sizes has {len(level_sizes)}"
        )
    if device is None:
        device = stacked["mask_logits"].device
    device = torch.device(device)
    scales = stacked["scale"].cpu().tolist()
    input_sizes = stacked["input_size"].cpu().tolist()
    orig = stacked["orig_size"].cpu()
    view_h, view_w = (int(v) for v in view_size)

    # original -> view, per image (identity for absent images: their outputs are all invalid)
    a_view = [_matrix(t) for t in transforms]
    orig_ext = orig.flip(1).to(torch.float64)  # (W0, H0); zero extent for absent images
    view_ext = torch.tensor([[view_w, view_h]] * batch, dtype=torch.float64)

    def region_valid(grid_size: tuple[int, int]) -> Tensor:
        g = view_to_grid_matrix((view_h, view_w), grid_size)
        to_grid = torch.as_tensor(np.stack([g @ a for a in a_view]))
        view_to_grid = torch.as_tensor(g)[None].expand(batch, 3, 3)
        ok = inside_extent(to_grid, grid_size, orig_ext) & inside_extent(
            view_to_grid, grid_size, view_ext
        )
        return (ok & present_t[:, None, None]).to(device)

    def map_matrices(map_size: tuple[int, int], grid_size: tuple[int, int]) -> np.ndarray:
        g = view_to_grid_matrix((view_h, view_w), grid_size)
        return np.stack(
            [
                g @ map_to_view_matrix(a_view[i], scales[i], input_sizes[i], map_size)
                if present[i]
                else np.eye(3)
                for i in range(batch)
            ]
        )

    features: list[Tensor | None] = []
    feature_valid: list[Tensor | None] = []
    for maps, size in zip(stacked["features"], level_sizes):
        if size is None:
            features.append(None)
            feature_valid.append(None)
            continue
        size = (int(size[0]), int(size[1]))
        maps = maps.to(device=device, dtype=torch.float32)
        warped, ok = warp_affine(
            maps, map_matrices(tuple(maps.shape[-2:]), size), size, "bilinear", fill=None
        )  # masked below
        ok = ok & region_valid(size)
        features.append(warped * ok[:, None].to(warped.dtype))
        feature_valid.append(ok)

    # all masks of the batch in one resampling: [sum M, 1, m, m] with per-mask matrices
    mask_size_out = (int(mask_size_out[0]), int(mask_size_out[1]))
    counts = [int(c) for c in stacked["mask_counts"]]
    mask_valid = region_valid(mask_size_out)
    if sum(counts):
        masks = stacked["mask_logits"].to(device=device, dtype=torch.float32)[:, None]
        per_image = map_matrices(tuple(masks.shape[-2:]), mask_size_out)
        matrices = np.repeat(per_image, counts, axis=0)
        warped_masks, _ = warp_affine(masks, matrices, mask_size_out, "bilinear")
        mask_logits = list(warped_masks[:, 0].split(counts))
    else:
        mask_logits = [torch.zeros(0, *mask_size_out, device=device) for _ in range(batch)]

    return {
        "features": features,
        "feature_valid": feature_valid,
        "mask_logits": mask_logits,
        "mask_valid": mask_valid,
        "segment_ids": [ids.to(device=device, dtype=torch.int64) for ids in stacked["segment_ids"]],
        "cls_logits": [c.to(device=device, dtype=torch.float32) for c in stacked["cls_logits"]],
        "present": present_t.to(device),
    }


def warp_teacher_targets(
    item: dict,
    transform: Any,
    view_size: tuple[int, int],
    level_sizes: Sequence[tuple[int, int]],
    mask_size_out: tuple[int, int],
) -> dict[str, Any]:
    """Warp one image's cached teacher outputs onto its view.

    See :func:`batch_warp_teacher_targets` for the arguments.

    Returns:
        dict with ``features`` (per level ``[C_l, h, w]``, None for a skipped level),
        ``feature_valid`` (per level bool ``[h, w]``), ``mask_logits [M, h4, w4]``,
        ``mask_valid [h4, w4]``, ``segment_ids [M]``, ``cls_logits [M, K]``; on the item's device.
    """
    out = batch_warp_teacher_targets([item], [transform], view_size, level_sizes, mask_size_out)
    return {
        "features": [None if f is None else f[0] for f in out["features"]],
        "feature_valid": [None if v is None else v[0] for v in out["feature_valid"]],
        "mask_logits": out["mask_logits"][0],
        "mask_valid": out["mask_valid"][0],
        "segment_ids": out["segment_ids"][0],
        "cls_logits": out["cls_logits"][0],
    }
