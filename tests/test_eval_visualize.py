"""Overlays and report panels."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.visualize import (
    find_boundaries,
    overlay_panoptic,
    save_image,
    side_by_side,
)
from pipeline.data.coco_panoptic import Category


Cat = Category  # the data layer's category record


CATS = [Cat(1, "person", True, (200, 0, 0), 0), Cat(5, "sky", False, (0, 0, 200), 1)]


def test_find_boundaries_marks_right_and_lower_changes():
    ids = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    assert np.array_equal(find_boundaries(ids), expected)


def test_overlay_blends_colours_jitters_instances_and_draws_boundaries():
    image = np.full((6, 8, 3), 100, dtype=np.uint8)
    ids = np.zeros((6, 8), dtype=np.int64)
    ids[:, :4] = 7  # sky (stuff)
    ids[:3, 4:6] = 11  # person instance 11
    ids[3:, 4:6] = 12  # person instance 12; columns 6-7 stay void
    segs = [{"id": 7, "category_id": 5}, {"id": 11, "category_id": 1}, {"id": 12, "category_id": 1}]
    out = overlay_panoptic(image, ids, segs, CATS, alpha=0.5, boundary_color=(255, 255, 255))
    assert out.shape == image.shape and out.dtype == np.uint8
    # stuff interior: 0.5 * 100 + 0.5 * (0, 0, 200) = (50, 50, 150)
    assert out[0, 0].tolist() == [50, 50, 150]
    # void keeps the image; a boundary pixel (sky next to person) is white
    assert out[0, 7].tolist() == [100, 100, 100]
    assert out[0, 3].tolist() == [255, 255, 255]
    # two person instances: different colours, both near the category colour (red dominant)
    a, b = out[0, 4].astype(int), out[5, 4].astype(int)
    assert a.tolist() != b.tolist()
    assert a[0] > a[2] and b[0] > b[2]


def test_overlay_rejects_bad_inputs():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"image \(4, 4\) and id_map \(4, 5\) differ"):
        overlay_panoptic(image, np.zeros((4, 5)), [], CATS)
    with pytest.raises(ValueError, match="unknown category_id 99"):
        overlay_panoptic(image, np.ones((4, 4)), [{"id": 1, "category_id": 99}], CATS)
    with pytest.raises(ValueError, match="must be uint8"):
        overlay_panoptic(image.astype(np.float32), np.ones((4, 4)), [], CATS)


def test_side_by_side_layout_and_save(tmp_path):
    panels = [np.full((20, 30, 3), v, dtype=np.uint8) for v in (10, 120, 240)]
    out = side_by_side(panels, gap=4, title_height=14)
    assert out.shape == (34, 30 * 3 + 8, 3)
    assert (out[14:, :30] == 10).all() and (out[14:, 34:64] == 120).all()
    assert (out[14:, 68:] == 240).all() and (out[14:, 30:34] == 255).all()
    assert (out[:14] < 128).any()  # the titles are drawn in black on white
    with pytest.raises(ValueError, match=r"panel 1 has shape"):
        side_by_side([panels[0], np.zeros((10, 30, 3), dtype=np.uint8)])
    save_image(out, tmp_path / "sub" / "panel.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "panel.png")), out)
