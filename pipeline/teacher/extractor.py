"""Run the SAM teacher once over an image and its ground-truth segments.

One image-encoder pass yields the chosen ViT block outputs (collected with forward hooks) and
SAM's 256-d image embedding (the neck). Each ground-truth segment then prompts SAM's mask
decoder, batched over all segments of a kind: things by their box, stuff by a few positive
points drawn from the mask interior. Everything is expressed in the teacher-cache frame of
``docs/architecture.md``: the image resized so its longest side is S, placed top-left and
zero-padded to S x S; original coordinates map to it by ``diag(s, s)`` with
``s = S / max(H0, W0)``.

Prompt coordinates follow SAM's own convention (``SamPredictor``): a point ``(x, y)`` names the
pixel with column x and row y, the prompt encoder adds 0.5 to reach its centre, and a box is
``(x_min, y_min, x_max, y_max)`` over the pixel indices of the mask (``masks_to_boxes``). Both are
carried to the frame by multiplying with s, as ``ResizeLongestSide.apply_coords`` does (it uses
the per-axis ratio of the rounded resized size, which differs from s by at most half a frame
pixel over the whole image).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops import masks_to_boxes

from pipeline.config import AutomaticConfig, TeacherConfig
from pipeline.device import resolve_device
from pipeline.teacher.sam_builder import build_teacher, default_layers

__all__ = [
    "SegmentPrompt",
    "TeacherExtractor",
    "TeacherOutput",
    "box_prompts",
    "cell_areas",
    "frame_scale",
    "interval_overlaps",
    "mask_pool",
    "resize_logits",
    "sample_stuff_points",
]

NECK = "neck"


@dataclass(frozen=True)
class SegmentPrompt:
    """One ground-truth segment of an image.

    Arguments:
      segment_id: the panoptic segment id (the key of the segment in the cache).
      mask: bool ``[H, W]`` in original image pixels.
      isthing: things are prompted by their box, stuff by points inside the mask.
    """

    segment_id: int
    mask: np.ndarray
    isthing: bool


@dataclass
class TeacherOutput:
    """What the teacher says about one image (all maps cover the padded S x S frame).

    Attributes:
      features: per level, float32 ``[C_l, h, w]`` with ``h = w = S / 16`` (full width, no PCA).
      level_names: per level, ``"block{i}"`` or ``"neck"``.
      segment_ids: int64 ``[M]``, in the order of the prompts given.
      mask_logits: float32 ``[M, m, m]``, SAM's low-res mask logits resized to ``m = mask_size``.
      iou: float32 ``[M]``, SAM's predicted IoU clamped to [0, 1].
      embeddings: float32 ``[M, 256]``, the neck embedding averaged under each segment's mask.
      scale: s = S / max(H0, W0).
      input_size: S.
      orig_size: (H0, W0).
    """

    features: list[np.ndarray]
    level_names: list[str]
    segment_ids: np.ndarray
    mask_logits: np.ndarray
    iou: np.ndarray
    embeddings: np.ndarray
    scale: float
    input_size: int
    orig_size: tuple[int, int]


# --------------------------------------------------------------------- pure functions
def frame_scale(orig_size: tuple[int, int], input_size: int) -> float:
    """s = S / max(H0, W0): original coordinates -> teacher frame."""
    return input_size / max(orig_size)


def box_prompts(masks: torch.Tensor, scale: float) -> torch.Tensor:
    """Box prompts of non-empty masks in the teacher frame.

    Arguments:
      masks: bool ``[T, H, W]``.
      scale: s.

    Returns:
      float32 ``[T, 4]`` boxes ``(x_min, y_min, x_max, y_max) * s`` over the mask's pixel indices.
    """
    return masks_to_boxes(masks).float() * scale


def sample_stuff_points(
    mask: np.ndarray, num_points: int, seed: int, segment_id: int
) -> np.ndarray:
    """Positive point prompts inside a mask, drawn towards its interior.

    Pixels are drawn without replacement (with replacement if the mask has fewer pixels than
    ``num_points``) with probability proportional to their Euclidean distance to the nearest
    pixel outside the mask, the image border counting as outside. The draw depends only on
    ``(seed, segment_id)`` and the mask.

    Arguments:
      mask: bool ``[H, W]``, not empty.
      num_points: N.
      seed: the per-image seed.
      segment_id: the segment's id (decorrelates the segments of one image).

    Returns:
      float64 ``[N, 2]`` points ``(x, y)`` = (column, row) pixel indices in original coordinates.
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError(f"segment {segment_id}: empty mask, cannot sample point prompts")
    r0, c0 = rows.min(), cols.min()
    crop = np.pad(mask[r0 : rows.max() + 1, c0 : cols.max() + 1], 1)  # bbox crop, border = outside
    distance = distance_transform_edt(crop)[rows - r0 + 1, cols - c0 + 1]
    rng = np.random.default_rng([seed, segment_id])
    pick = rng.choice(
        rows.size, size=num_points, replace=rows.size < num_points, p=distance / distance.sum()
    )
    return np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)


def interval_overlaps(n_src: int, scale: float, n_cells: int, cell_size: float) -> torch.Tensor:
    """Lengths of overlap between unit source intervals and frame cells.

    Source interval i is ``[i, i+1)`` in original coordinates, ``[i s, (i+1) s)`` in the frame;
    cell a is ``[a c, (a+1) c)`` in the frame.

    Returns:
      float64 ``[n_cells, n_src]`` overlap lengths in original units (a row sums to the part of
      the cell covered by the image).
    """
    src = torch.arange(n_src + 1, dtype=torch.float64) * scale
    cells = torch.arange(n_cells + 1, dtype=torch.float64) * cell_size
    lo = torch.maximum(cells[:-1, None], src[None, :-1])
    hi = torch.minimum(cells[1:, None], src[None, 1:])
    return (hi - lo).clamp(min=0) / scale


def cell_areas(
    masks: torch.Tensor, scale: float, grid_size: tuple[int, int], input_size: int
) -> torch.Tensor:
    """Area of each mask inside each cell of a map grid covering the S x S frame.

    Arguments:
      masks: bool ``[M, H0, W0]`` in original pixels.
      scale: s.
      grid_size: (h, w) of the map; cell (a, b) covers ``[b S/w, (b+1) S/w) x [a S/h, (a+1) S/h)``.
      input_size: S.

    Returns:
      float32 ``[M, h, w]`` areas in original pixels (summing to each mask's pixel count).
    """
    h, w = grid_size
    rows = interval_overlaps(masks.shape[1], scale, h, input_size / h)
    cols = interval_overlaps(masks.shape[2], scale, w, input_size / w)
    rows, cols = rows.to(masks.device, torch.float32), cols.to(masks.device, torch.float32)
    return rows @ masks.float() @ cols.T


def mask_pool(embedding: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted average of an embedding map per segment.

    Arguments:
      embedding: ``[C, h, w]``.
      weights: ``[M, h, w]`` non-negative, each with a positive sum.

    Returns:
      ``[M, C]`` with row k = sum_ab weights[k] * embedding / sum_ab weights[k].
    """
    pooled = torch.einsum("mhw,chw->mc", weights, embedding)
    return pooled / weights.sum(dim=(1, 2))[:, None]


def resize_logits(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of square logit maps ``[M, r, r]`` -> ``[M, size, size]``.

    Shrinking uses the antialiased (triangle-filter) bilinear kernel so every source pixel counts.
    """
    if logits.shape[-1] == size:
        return logits
    return F.interpolate(
        logits[:, None],
        size=(size, size),
        mode="bilinear",
        align_corners=False,
        antialias=size < logits.shape[-1],
    )[:, 0]


# ------------------------------------------------------------------------ extractor
class TeacherExtractor:
    """Runs a :class:`Sam` once per image and collects the teacher targets of the cache.

    Arguments:
      sam: the teacher (moved to ``device``; use it in eval mode).
      layers: levels to return, ViT block indices and/or ``"neck"``; None = :func:`default_layers`.
      mask_size: side m of the cached per-segment mask logits.
      points_per_stuff: positive points per stuff segment.
      device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
      amp: bfloat16 autocast on CUDA (outputs are returned as float32); CPU always runs fp32.
      prompt_batch: most prompts per mask-decoder call (bounds decoder memory on large images).
    """

    def __init__(
        self,
        sam: Sam,
        layers: Sequence[int | str] | None = None,
        mask_size: int = 64,
        points_per_stuff: int = 3,
        device: str | torch.device = "cpu",
        amp: bool = False,
        prompt_batch: int = 64,
    ) -> None:
        self.device = resolve_device(device)
        self.sam = sam.to(self.device).float().eval()
        self.layers = list(default_layers(sam) if layers is None else layers)
        depth = len(sam.image_encoder.blocks)
        bad = [
            x
            for x in self.layers
            if not (
                x == NECK or (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < depth)
            )
        ]
        if bad or not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(
                f"teacher.layers={self.layers}: expected distinct block indices in "
                f"[0, {depth}) and/or 'neck', at least one"
            )
        if mask_size < 1 or points_per_stuff < 1 or prompt_batch < 1:
            raise ValueError(
                f"mask_size ({mask_size}), points_per_stuff ({points_per_stuff}) and "
                f"prompt_batch ({prompt_batch}) must be positive"
            )
        self.mask_size = mask_size
        self.points_per_stuff = points_per_stuff
        self.amp = amp and self.device.type == "cuda"
        self.prompt_batch = prompt_batch
        self.transform = ResizeLongestSide(self.input_size)

    @classmethod
    def from_config(
        cls,
        teacher: TeacherConfig,
        mask_size: int,
        device: str | torch.device | None = None,
        amp: bool = False,
    ) -> "TeacherExtractor":
        """Build from the ``teacher`` config section (``device`` None = ``teacher.device``)."""
        sam = build_teacher(teacher.type, teacher.checkpoint, teacher.tiny)
        return cls(
            sam,
            teacher.layers,
            mask_size=mask_size,
            points_per_stuff=teacher.points_per_stuff,
            device=teacher.device if device is None else device,
            amp=amp,
        )

    # ------------------------------------------------------------------ shapes
    @property
    def input_size(self) -> int:
        """S, the side of the padded square input frame."""
        return self.sam.image_encoder.img_size

    @property
    def grid_size(self) -> int:
        """h = w = S / 16, the side of every feature map."""
        return self.sam.prompt_encoder.image_embedding_size[0]

    @property
    def level_names(self) -> list[str]:
        return [NECK if x == NECK else f"block{x}" for x in self.layers]

    @property
    def level_channels(self) -> list[int]:
        """C_l per level: the ViT width for blocks, 256 for the neck."""
        enc = self.sam.image_encoder
        embed_dim, out_chans = enc.patch_embed.proj.out_channels, enc.neck[0].out_channels
        return [out_chans if x == NECK else embed_dim for x in self.layers]

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        """(C_l, h, w) per level."""
        g = self.grid_size
        return [(c, g, g) for c in self.level_channels]

    # -------------------------------------------------------------------- steps
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` -> normalised, zero-padded float ``[1, 3, S, S]`` (SAM's own way)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        return self.sam.preprocess(resized.permute(2, 0, 1).float()[None])

    def encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One image-encoder pass.

        Arguments:
          images: preprocessed ``[B, 3, S, S]``.

        Returns:
          levels: per level ``[B, C_l, h, w]``; embedding: the neck output ``[B, 256, h, w]``.
        """
        captured: dict[int, torch.Tensor] = {}
        blocks = self.sam.image_encoder.blocks
        handles = [
            blocks[i].register_forward_hook(lambda _m, _in, out, i=i: captured.__setitem__(i, out))
            for i in self.layers
            if i != NECK
        ]
        try:
            embedding = self.sam.image_encoder(images)
        finally:
            for handle in handles:
                handle.remove()
        levels = [embedding if x == NECK else captured[x].permute(0, 3, 1, 2) for x in self.layers]
        return levels, embedding

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder + mask decoder for K prompts of one kind on one image.

        Arguments:
          embedding: ``[1, 256, h, w]``.
          points: frame point coordinates ``[K, N, 2]`` (all positive), or None.
          boxes: frame boxes ``[K, 4]``, or None.

        Returns:
          low-res logits ``[K, 4h, 4w]`` and predicted IoU ``[K]`` (single-mask output).
        """
        pe = self.sam.prompt_encoder
        logits, iou = [], []
        count = (points if points is not None else boxes).shape[0]
        for start in range(0, count, self.prompt_batch):
            chunk = slice(start, start + self.prompt_batch)
            pts = None
            if points is not None:
                p = points[chunk]
                pts = (p, torch.ones(p.shape[:2], dtype=torch.int64, device=p.device))
            box = None if boxes is None else boxes[chunk]
            sparse, dense = pe(points=pts, boxes=box, masks=None)
            low_res, pred_iou = self.sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            logits.append(low_res[:, 0])
            iou.append(pred_iou[:, 0])
        return torch.cat(logits), torch.cat(iou)

    # ----------------------------------------------------------------- extract
    @torch.no_grad()
    def extract_automatic(
        self, image: np.ndarray, automatic: AutomaticConfig, max_segments: int | None = None
    ) -> tuple[TeacherOutput, np.ndarray]:
        """Teacher targets of an unlabelled image: its features and SAM's automatic segments.

        The segments come from :func:`pipeline.teacher.automatic.automatic_segments` (a point
        grid, IoU and stability filters, box NMS; best first) and are stored like prompted ones:
        mask logits over the frame resized to ``mask_size``, predicted IoU, the embedding pooled
        under the binary mask; their ids are ``1..M``.

        Arguments:
          image: uint8 ``[H0, W0, 3]`` RGB.
          automatic: the generator settings (``teacher.automatic``).
          max_segments: keep at most this many segments (the cache's capacity).

        Returns:
          ``(output, stability)``: the :class:`TeacherOutput` and float32 ``[M]`` stability scores.
        """
        from pipeline.teacher.automatic import automatic_segments

        batch = self.preprocess(image)
        with self._autocast():
            levels, embedding = self.encode(batch)
        features = [lvl[0].float().cpu().numpy() for lvl in levels]
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        segs = automatic_segments(
            self.sam,
            embedding,
            orig_size,
            points_per_side=automatic.points_per_side,
            points_per_batch=automatic.points_per_batch,
            pred_iou_thresh=automatic.pred_iou_thresh,
            stability_score_thresh=automatic.stability_score_thresh,
            stability_score_offset=automatic.stability_score_offset,
            box_nms_thresh=automatic.box_nms_thresh,
            max_segments=max_segments,
            autocast=self._autocast,
        )
        S, m, g = self.input_size, self.mask_size, self.grid_size
        scale = frame_scale(orig_size, S)
        num = len(segs)
        if num:
            logits = resize_logits(segs.low_res_logits.float(), m)
            weights = cell_areas(segs.masks.to(self.device), scale, (g, g), S)
            pooled = mask_pool(embedding[0].float(), weights)
        else:
            logits = torch.zeros(0, m, m)
            pooled = torch.zeros(0, embedding.shape[1])
        out = TeacherOutput(
            features=features,
            level_names=self.level_names,
            segment_ids=np.arange(1, num + 1, dtype=np.int64),
            mask_logits=logits.cpu().numpy().astype(np.float32),
            iou=segs.iou.clamp(0, 1).cpu().numpy().astype(np.float32),
            embeddings=pooled.cpu().numpy().astype(np.float32),
            scale=scale,
            input_size=S,
            orig_size=orig_size,
        )
        return out, segs.stability.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def extract(
        self, image: np.ndarray, segments: Sequence[SegmentPrompt], seed: int
    ) -> TeacherOutput:
        """Teacher targets of one image.

        Arguments:
          image: uint8 ``[H0, W0, 3]`` RGB.
          segments: the image's segments; masks bool ``[H0, W0]``, none empty.
          seed: seeds the stuff point prompts (with each segment id).
        """
        return self.extract_batch([image], [segments], [seed])[0]

    @torch.no_grad()
    def extract_batch(
        self,
        images: Sequence[np.ndarray],
        segments: Sequence[Sequence[SegmentPrompt]],
        seeds: Sequence[int],
    ) -> list[TeacherOutput]:
        """:meth:`extract` for B images with one batched image-encoder pass."""
        if not len(images) == len(segments) == len(seeds):
            raise ValueError(
                f"got {len(images)} images, {len(segments)} segment lists and "
                f"{len(seeds)} seeds; expected one of each per image"
            )
        for image, segs in zip(images, segments):
            self._check_segments(image, segs)
        batch = torch.cat([self.preprocess(image) for image in images])
        with self._autocast():
            levels, embedding = self.encode(batch)
        outputs = []
        for b, (image, segs, seed) in enumerate(zip(images, segments, seeds)):
            features = [lvl[b].float().cpu().numpy() for lvl in levels]
            outputs.append(
                self._segment_targets(embedding[b : b + 1], image.shape[:2], segs, seed, features)
            )
        return outputs

    def _segment_targets(
        self,
        embedding: torch.Tensor,
        orig_size: tuple[int, int],
        segments: Sequence[SegmentPrompt],
        seed: int,
        features: list[np.ndarray],
    ) -> TeacherOutput:
        S, m = self.input_size, self.mask_size
        scale = frame_scale(orig_size, S)
        num = len(segments)
        logits = torch.zeros(num, m, m, device=self.device)
        iou = torch.zeros(num, device=self.device)
        pooled = torch.zeros(num, embedding.shape[1], device=self.device)
        if num:
            masks = torch.from_numpy(np.stack([s.mask for s in segments])).to(self.device)
            things = [k for k, s in enumerate(segments) if s.isthing]
            stuff = [k for k, s in enumerate(segments) if not s.isthing]
            with self._autocast():
                if things:
                    out = self.decode(embedding, boxes=box_prompts(masks[things], scale))
                    logits[things] = resize_logits(out[0].float(), m)
                    iou[things] = out[1].float()
                if stuff:
                    points = (
                        np.stack(
                            [
                                sample_stuff_points(
                                    segments[k].mask,
                                    self.points_per_stuff,
                                    seed,
                                    segments[k].segment_id,
                                )
                                for k in stuff
                            ]
                        )
                        * scale
                    )
                    out = self.decode(
                        embedding,
                        points=torch.as_tensor(points, dtype=torch.float32, device=self.device),
                    )
                    logits[stuff] = resize_logits(out[0].float(), m)
                    iou[stuff] = out[1].float()
            g = self.grid_size
            pooled = mask_pool(embedding[0].float(), cell_areas(masks, scale, (g, g), S))
        return TeacherOutput(
            features=features,
            level_names=self.level_names,
            segment_ids=np.array([s.segment_id for s in segments], dtype=np.int64),
            mask_logits=logits.cpu().numpy().astype(np.float32),
            iou=iou.clamp(0, 1).cpu().numpy().astype(np.float32),
            embeddings=pooled.cpu().numpy().astype(np.float32),
            scale=scale,
            input_size=S,
            orig_size=(int(orig_size[0]), int(orig_size[1])),
        )

    def _check_segments(self, image: np.ndarray, segments: Sequence[SegmentPrompt]) -> None:
        size = tuple(image.shape[:2])
        seen: set[int] = set()
        for seg in segments:
            if seg.mask.shape != size or seg.mask.dtype != np.bool_:
                raise ValueError(
                    f"segment {seg.segment_id}: mask must be bool {list(size)} like "
                    f"the image, got {seg.mask.dtype} {list(seg.mask.shape)}"
                )
            if not seg.mask.any():
                raise ValueError(f"segment {seg.segment_id}: empty mask, cannot prompt SAM")
            if seg.segment_id in seen:
                raise ValueError(f"segment {seg.segment_id}: duplicate segment id in one image")
            seen.add(seg.segment_id)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
