"""Teacher extractor on sam_tiny: prompt functions, pooling, shapes, agreement with SamPredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt
from segment_anything import SamPredictor

from pipeline.config import SamTinyConfig
from pipeline.teacher.extractor import (
    SegmentPrompt,
    TeacherExtractor,
    box_prompts,
    cell_areas,
    frame_scale,
    interval_overlaps,
    mask_pool,
    resize_logits,
    sample_stuff_points,
)
from pipeline.teacher.sam_builder import build_teacher

H0, W0 = 100, 150
TINY = SamTinyConfig(
    img_size=128,
    embed_dim=32,
    depth=3,
    num_heads=2,
    global_attn_indexes=[1, 2],
    window_size=4,
    decoder_depth=1,
    decoder_mlp_dim=64,
)
S = TINY.img_size


@pytest.fixture(scope="module")
def sam():
    return build_teacher("sam_tiny", None, TINY, seed=0)


@pytest.fixture(scope="module")
def scene():
    image = np.random.default_rng(0).integers(0, 256, (H0, W0, 3), dtype=np.uint8)
    car = np.zeros((H0, W0), bool)
    car[20:50, 30:90] = True
    person = np.zeros((H0, W0), bool)
    person[60:95, 110:125] = True
    road = np.zeros((H0, W0), bool)
    road[70:, :100] = True
    sky = ~(car | person | road)
    segments = [
        SegmentPrompt(11, car, True),
        SegmentPrompt(40, sky, False),
        SegmentPrompt(12, person, True),
        SegmentPrompt(41, road, False),
    ]
    return image, segments


# ------------------------------------------------------------------- prompt functions
def test_box_prompt_is_pixel_index_box_scaled_to_frame():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:8] = True  # rows 2..4, cols 3..7
    mask[4, 12] = True  # a detached pixel widens the box to col 12
    s = frame_scale((10, 20), 64)
    assert s == 3.2
    box = box_prompts(torch.from_numpy(mask)[None], s)
    torch.testing.assert_close(box, torch.tensor([[3 * 3.2, 2 * 3.2, 12 * 3.2, 4 * 3.2]]))


def test_stuff_points_lie_inside_and_are_reproducible():
    mask = np.zeros((40, 60), bool)
    mask[5:35, 5:15] = True
    mask[25:35, 5:55] = True  # an L shape
    pts = sample_stuff_points(mask, 5, seed=3, segment_id=7)
    assert pts.shape == (5, 2)
    x, y = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert np.array_equal(pts, np.stack([x, y], 1))  # pixel indices
    assert mask[y, x].all()
    assert len({(a, b) for a, b in zip(x, y)}) == 5  # without replacement
    assert np.array_equal(pts, sample_stuff_points(mask, 5, seed=3, segment_id=7))
    assert not np.array_equal(pts, sample_stuff_points(mask, 5, seed=4, segment_id=7))
    assert not np.array_equal(pts, sample_stuff_points(mask, 5, seed=3, segment_id=8))


def test_stuff_points_prefer_the_interior():
    mask = np.zeros((50, 50), bool)
    mask[:40, :40] = True  # touches the image border: the border counts as outside
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    pts = sample_stuff_points(mask, 400, seed=0, segment_id=1).astype(int)
    sampled = dist[pts[:, 1], pts[:, 0]]
    # distance-weighted draw: mean distance of picks clearly above the uniform mean
    assert sampled.mean() > dist[mask].mean() + 2
    assert dist[mask].min() == 1  # border pixels exist and have the smallest weight


def test_stuff_points_on_a_tiny_mask_repeat_and_empty_mask_is_named():
    mask = np.zeros((8, 8), bool)
    mask[3, 4] = True
    pts = sample_stuff_points(mask, 3, seed=0, segment_id=5)
    assert np.array_equal(pts, [[4, 3]] * 3)
    with pytest.raises(ValueError, match="segment 9: empty mask"):
        sample_stuff_points(np.zeros((8, 8), bool), 3, seed=0, segment_id=9)


# --------------------------------------------------------------------- pooling
def test_interval_overlaps_by_hand():
    # 10 source pixels, s = 6.4 -> pixel i covers [6.4 i, 6.4 (i+1)); cells of 16 frame px
    ov = interval_overlaps(10, 6.4, 4, 16.0)
    assert ov.shape == (4, 10)
    # pixel 2 covers [12.8, 19.2): 3.2 frame px in cell 0 and 3.2 in cell 1 -> 0.5 / 0.5
    torch.testing.assert_close(ov[:, 2], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(ov[:, 0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(ov.sum(0), torch.ones(10, dtype=torch.float64))  # each pixel once


def test_pooling_constant_embedding_gives_the_constant():
    emb = torch.full((3, 4, 4), 0.0)
    emb += torch.tensor([1.5, -2.0, 7.0])[:, None, None]
    masks = torch.zeros(2, 30, 50, dtype=torch.bool)
    masks[0, 3:9, 10:40] = True
    masks[1, 20:, :5] = True
    w = cell_areas(masks, frame_scale((30, 50), 64), (4, 4), 64)
    torch.testing.assert_close(w.sum(dim=(1, 2)), masks.sum(dim=(1, 2)).float())
    torch.testing.assert_close(mask_pool(emb, w), torch.tensor([[1.5, -2.0, 7.0]] * 2))


def test_pooling_two_regions_weights_by_area():
    # 64x64 image, S = 64 (s = 1), 4x4 grid of 16 px cells; embedding 1 in the left two
    # columns of cells (x < 32), 3 in the right two.
    emb = torch.ones(1, 4, 4)
    emb[:, :, 2:] = 3.0
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 0:2, 27:32] = True  # 10 px on the left
    mask[0, 0:3, 32:42] = True  # 30 px on the right
    w = cell_areas(mask, 1.0, (4, 4), 64)
    assert w[0, 0, 1] == 10 and w[0, 0, 2] == 30 and w.sum() == 40
    torch.testing.assert_close(mask_pool(emb, w), torch.tensor([[(10 * 1 + 30 * 3) / 40]]))


def test_pooling_with_fractional_cells():
    # 10x10 image into S = 64 (s = 6.4), 4x4 grid: row/col 2 straddles cells 0 and 1 equally
    emb = torch.zeros(1, 4, 4)
    emb[0, 0, 0], emb[0, 0, 1], emb[0, 1, 0], emb[0, 1, 1] = 1.0, 2.0, 3.0, 4.0
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 2, 2] = True  # a quarter of its area in each of the four cells
    w = cell_areas(mask, 6.4, (4, 4), 64)
    torch.testing.assert_close(w[0, :2, :2], torch.full((2, 2), 0.25))
    torch.testing.assert_close(mask_pool(emb, w), torch.tensor([[2.5]]))


def test_resize_logits_bilinear():
    x = torch.arange(16.0).view(1, 4, 4)
    assert resize_logits(x, 4) is x
    up = resize_logits(x, 8)
    assert up.shape == (1, 8, 8)
    # align_corners=False: output (0, 1) centre 1.5/8*4 - 0.5 = 0.25 -> 0 + 0.25 * (1 - 0)
    assert up[0, 0, 1].item() == pytest.approx(0.25)
    down = resize_logits(torch.ones(2, 16, 16) * 3, 4)
    torch.testing.assert_close(down, torch.full((2, 4, 4), 3.0))


# ------------------------------------------------------------------------ extractor
def test_shapes_and_metadata(sam, scene):
    image, segments = scene
    ex = TeacherExtractor(sam, None, mask_size=16, points_per_stuff=3)
    assert ex.input_size == S and ex.layers == [1, "neck"]
    assert ex.level_channels == [32, 256] and ex.level_shapes == [(32, 8, 8), (256, 8, 8)]
    out = ex.extract(image, segments, seed=0)
    assert out.level_names == ["block1", "neck"]
    assert [f.shape for f in out.features] == [(32, S // 16, S // 16), (256, S // 16, S // 16)]
    assert all(f.dtype == np.float32 for f in out.features)
    assert out.segment_ids.dtype == np.int64 and out.segment_ids.tolist() == [11, 40, 12, 41]
    assert out.mask_logits.shape == (4, 16, 16) and out.mask_logits.dtype == np.float32
    assert out.iou.shape == (4,) and ((out.iou >= 0) & (out.iou <= 1)).all()
    assert out.embeddings.shape == (4, 256) and out.embeddings.dtype == np.float32
    assert out.scale == S / W0 and out.input_size == S and out.orig_size == (H0, W0)
    assert all(np.isfinite(a).all() for a in [*out.features, out.mask_logits, out.embeddings])


def test_block_levels_come_from_the_same_encoder_pass(sam, scene):
    image, segments = scene
    ex = TeacherExtractor(sam, [0, "neck", 1])
    out = ex.extract(image, segments[:1], seed=0)
    x = ex.preprocess(image)
    with torch.no_grad():
        enc = sam.image_encoder
        b0 = enc.blocks[0](enc.patch_embed(x) + enc.pos_embed)
        b1 = enc.blocks[1](b0)
        neck = enc.neck(enc.blocks[2](b1).permute(0, 3, 1, 2))
    torch.testing.assert_close(torch.from_numpy(out.features[0]), b0[0].permute(2, 0, 1))
    torch.testing.assert_close(torch.from_numpy(out.features[1]), neck[0])
    torch.testing.assert_close(torch.from_numpy(out.features[2]), b1[0].permute(2, 0, 1))
    assert out.level_names == ["block0", "neck", "block1"]
    assert not enc.blocks[0]._forward_hooks  # hooks removed after the pass


def test_matches_sam_predictor_for_box_and_point_prompts(sam, scene):
    image, segments = scene
    ex = TeacherExtractor(sam, None, mask_size=32, points_per_stuff=3)
    out = ex.extract(image, segments, seed=5)
    s = out.scale

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    torch.testing.assert_close(torch.from_numpy(out.features[-1]), predictor.features[0])
    for k, seg in enumerate(segments):
        if seg.isthing:
            rows, cols = np.nonzero(seg.mask)
            box = torch.tensor([[cols.min(), rows.min(), cols.max(), rows.max()]]) * s
            _, iou, low = predictor.predict_torch(
                None, None, boxes=box.float(), multimask_output=False, return_logits=True
            )
        else:
            pts = sample_stuff_points(seg.mask, 3, 5, seg.segment_id) * s
            _, iou, low = predictor.predict_torch(
                torch.tensor(pts, dtype=torch.float32)[None],
                torch.ones(1, 3, dtype=torch.int64),
                multimask_output=False,
                return_logits=True,
            )
        expect = torch.nn.functional.interpolate(
            low, size=(32, 32), mode="bilinear", align_corners=False, antialias=True
        )[0, 0]
        torch.testing.assert_close(
            torch.from_numpy(out.mask_logits[k]), expect, atol=1e-4, rtol=1e-4
        )
        assert out.iou[k] == pytest.approx(iou.clamp(0, 1).item(), abs=1e-5)


def test_embeddings_pool_the_neck_under_each_mask(sam, scene):
    image, segments = scene
    out = TeacherExtractor(sam, ["neck"]).extract(image, segments, seed=0)
    neck = torch.from_numpy(out.features[0]).double()
    g = S // 16
    # brute force: split each original pixel into 16 x 16 sub-pixels, find the embedding cell of
    # each sub-pixel centre and count. Cell edges fall at multiples of 150/8/16 px, so exact.
    sub = 16
    offs = (np.arange(sub) + 0.5) / sub
    for k, seg in enumerate(segments):
        ys, xs = np.nonzero(seg.mask)
        cy = ((ys[:, None] + offs) * out.scale // 16).astype(int)  # [P, sub]
        cx = ((xs[:, None] + offs) * out.scale // 16).astype(int)
        weights = np.zeros((g, g))
        np.add.at(weights, (np.repeat(cy, sub, axis=1), np.tile(cx, (1, sub))), 1.0)
        weights = torch.from_numpy(weights)
        expect = (neck * weights).sum(dim=(1, 2)) / weights.sum()
        torch.testing.assert_close(
            torch.from_numpy(out.embeddings[k]).double(), expect, atol=1e-5, rtol=1e-5
        )


def test_deterministic_given_seed(sam, scene):
    image, segments = scene
    ex = TeacherExtractor(sam, None, mask_size=16)
    a, b = ex.extract(image, segments, seed=1), ex.extract(image, segments, seed=1)
    c = ex.extract(image, segments, seed=2)
    for x, y in [
        (a.mask_logits, b.mask_logits),
        (a.iou, b.iou),
        (a.embeddings, b.embeddings),
        *zip(a.features, b.features),
    ]:
        assert np.array_equal(x, y)
    things = [0, 2]
    assert np.array_equal(a.mask_logits[things], c.mask_logits[things])  # boxes ignore the seed
    assert not np.array_equal(a.mask_logits[[1, 3]], c.mask_logits[[1, 3]])  # new stuff points


def test_batch_equals_single_images(sam, scene):
    image, segments = scene
    ex = TeacherExtractor(sam, None, mask_size=16)
    other = np.ascontiguousarray(image[:80, ::-1])  # another size, another aspect
    other_segments = [SegmentPrompt(3, np.ones((80, W0), bool), False)]
    outs = ex.extract_batch([image, other], [segments, other_segments], [0, 1])
    for out, single in zip(
        outs, [ex.extract(image, segments, 0), ex.extract(other, other_segments, 1)]
    ):
        assert out.orig_size == single.orig_size
        np.testing.assert_allclose(out.mask_logits, single.mask_logits, atol=1e-4)
        np.testing.assert_allclose(out.features[0], single.features[0], atol=1e-4)


def test_no_segments(sam, scene):
    out = TeacherExtractor(sam, None, mask_size=16).extract(scene[0], [], seed=0)
    assert out.mask_logits.shape == (0, 16, 16) and out.embeddings.shape == (0, 256)
    assert out.segment_ids.shape == (0,) and len(out.features) == 2


def test_bad_inputs_are_named(sam, scene):
    image, segments = scene
    ex = TeacherExtractor(sam, None)
    empty = SegmentPrompt(77, np.zeros((H0, W0), bool), False)
    with pytest.raises(ValueError, match="segment 77: empty mask"):
        ex.extract(image, [segments[0], empty], seed=0)
    with pytest.raises(ValueError, match="segment 11: mask must be bool"):
        ex.extract(image, [SegmentPrompt(11, np.ones((H0, W0 - 1), bool), True)], seed=0)
    with pytest.raises(ValueError, match="segment 11: duplicate"):
        ex.extract(image, [segments[0], segments[0]], seed=0)
    with pytest.raises(ValueError, match=r"image must be uint8 \[H, W, 3\]"):
        ex.extract(image.astype(np.float32), segments, seed=0)
    with pytest.raises(ValueError, match=r"teacher\.layers=\[1, 3\]"):
        TeacherExtractor(sam, [1, 3])
    with pytest.raises(ValueError, match=r"teacher\.layers=\['block1'\]"):
        TeacherExtractor(sam, ["block1"])
