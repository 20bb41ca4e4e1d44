"""SAM's automatic mode (pipeline.teacher.automatic) against segment-anything's own
SamAutomaticMaskGenerator: most cases on a seeded random sam_tiny (fast), and one on a seeded
random vit_b at 1024 px (one encoder pass, about 20 s on 2 cores; a 3 x 3 grid).

The generator is configured to the same grid and thresholds (one crop layer, no small-region
post-processing: its defaults). A random teacher predicts noise, so the thresholds are chosen
from its own score distribution to keep some masks and drop others, and NMS is tested both off
(``box_nms_thresh=1``: every kept mask, in score order) and on (0.7: random masks span the whole
image, so their boxes collapse to one).
"""

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator

from pipeline.config import AutomaticConfig, SamTinyConfig
from pipeline.teacher.automatic import automatic_segments, grid_points
from pipeline.teacher.extractor import TeacherExtractor
from pipeline.teacher.sam_builder import build_teacher

TINY = SamTinyConfig(
    img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], window_size=4
)


@pytest.fixture(scope="module")
def setup():
    sam = build_teacher("sam_tiny", None, TINY, seed=0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # not square: apply_coords matters
    extractor = TeacherExtractor(sam, mask_size=16)
    embedding = extractor.encode(extractor.preprocess(image))[1]
    return sam, image, extractor, embedding


def run_both(setup, **settings):
    sam, image, _, embedding = setup
    ours = automatic_segments(sam, embedding, image.shape[:2], **settings)
    gen = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    return ours, gen


def assert_same(ours, gen):
    assert len(ours) == len(gen) > 0
    for k, ann in enumerate(gen):
        assert ours.iou[k].item() == pytest.approx(ann["predicted_iou"], abs=1e-5)
        assert ours.stability[k].item() == pytest.approx(ann["stability_score"], abs=1e-5)
        theirs = torch.as_tensor(ann["segmentation"])
        inter = (ours.masks[k] & theirs).sum().item()
        union = (ours.masks[k] | theirs).sum().item()
        assert inter / union > 0.999
        x0, y0, x1, y1 = ours.boxes[k].tolist()
        assert [x0, y0, x1 - x0, y1 - y0] == pytest.approx(ann["bbox"])
        assert ours.points[k].tolist() == pytest.approx(ann["point_coords"][0])


def test_grid_is_the_generators(setup):
    _, image, _, _ = setup
    pts = grid_points(4, image.shape[:2])
    assert pts.shape == (16, 2)
    assert pts[0].tolist() == pytest.approx([64 / 8, 48 / 8])  # offset = half a cell


def probe_settings(sam, embedding, shape, side, batch, stability=True):
    """Thresholds from a random teacher's own scores, so that about half of its masks pass."""
    base = dict(points_per_side=side, points_per_batch=batch, stability_score_offset=0.05)
    probe = automatic_segments(
        sam,
        embedding,
        shape,
        **base,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )
    iou_t = float(probe.iou.median())
    stab_t = float(probe.stability[probe.iou > iou_t].median()) if stability else 0.0
    return probe, dict(
        **base, pred_iou_thresh=iou_t, stability_score_thresh=stab_t, box_nms_thresh=1.0
    )


def test_filters_and_order_match_the_generator_without_nms(setup):
    sam, image, _, embedding = setup
    probe, settings = probe_settings(sam, embedding, image.shape[:2], 6, 16)
    iou_t, stab_t = settings["pred_iou_thresh"], settings["stability_score_thresh"]
    ours, gen = run_both(setup, **settings)
    assert 1 < len(ours) < len(probe)  # the filters removed some, kept several
    assert (ours.iou > iou_t).all() and (ours.stability >= stab_t).all()
    assert (ours.iou[:-1] >= ours.iou[1:]).all()  # NMS order: best first
    assert_same(ours, gen)


def test_nms_matches_the_generator(setup):
    settings = dict(
        points_per_side=6,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.01,
        stability_score_offset=0.05,
        box_nms_thresh=0.7,
    )
    ours, gen = run_both(setup, **settings)
    assert_same(ours, gen)


def test_max_segments_and_cache_outputs(setup):
    _, image, extractor, _ = setup
    auto = AutomaticConfig(
        points_per_side=6,
        points_per_batch=16,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        stability_score_offset=0.05,
        box_nms_thresh=1.0,
    )
    out, stability = extractor.extract_automatic(image, auto, max_segments=5)
    assert out.segment_ids.tolist() == [1, 2, 3, 4, 5]
    assert out.mask_logits.shape == (5, 16, 16) and out.embeddings.shape == (5, 256)
    assert stability.shape == (5,) and np.isfinite(out.embeddings).all()
    assert out.iou.tolist() == sorted(out.iou.tolist(), reverse=True)


def test_strict_thresholds_can_keep_nothing(setup):
    _, image, extractor, _ = setup
    out, stability = extractor.extract_automatic(image, AutomaticConfig(points_per_side=4))
    # SAM's defaults (IoU > 0.88, stability >= 0.95) reject every mask of a random teacher
    assert out.mask_logits.shape[0] == stability.shape[0] == 0
    assert len(out.features) == len(extractor.layers)


def test_matches_the_generator_on_a_random_vit_b():
    """The issue's reference case: a seeded random vit_b (official architecture, 1024 px).
    One image-encoder pass (16 s on 2 cores; the generator reuses it), one small grid."""
    sam = build_teacher("vit_b", None, seed=0)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    extractor = TeacherExtractor(sam, mask_size=16)
    with torch.no_grad():
        embedding = extractor.encode(extractor.preprocess(image))[1]
    # The generator's predictor calls the same image encoder: hand it our embedding instead of a
    # second 1024 px pass (16 s), but only for a bit-identical input, so the preprocessing (resize,
    # normalisation, padding) is still compared with segment-anything's own.
    ours_input = extractor.preprocess(image)
    seen = []

    def reuse_embedding(x):
        seen.append(torch.equal(x, ours_input))
        return embedding

    probe, settings = probe_settings(sam, embedding, image.shape[:2], 3, 9, stability=False)
    ours = automatic_segments(sam, embedding, image.shape[:2], **settings)
    sam.image_encoder.forward = reuse_embedding
    try:
        gen = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    finally:
        del sam.image_encoder.forward
    assert seen == [True], "the generator must encode the same preprocessed image, once"
    assert 1 < len(ours) < len(probe)
    assert_same(ours, gen)
