"""predict_folder and evaluate_model end to end with a colour-lookup fake model.

Each segment of the hand-written images is painted in a flat colour; the fake model has one query
per palette colour whose mask is "pixel has that colour" and whose class is fixed. At full
resolution with stride-1 masks it reproduces the ground truth exactly (PQ = 100).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.data.coco_panoptic import PanopticDataset, id_to_rgb, load_panoptic_png
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform
from pipeline.evaluation.evaluate import evaluate_model
from pipeline.evaluation.pq import evaluate_from_files
from pipeline.evaluation.predict import predict_folder

H, W = 48, 64
SKY, GRASS, PERSON_A, PERSON_B, CROWD = (
    (100, 150, 250),
    (40, 180, 60),
    (250, 40, 40),
    (200, 20, 120),
    (240, 200, 0),
)
JSON_CATEGORIES = [  # ids not contiguous; train ids: person 0, sky 1, grass 2
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 5, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 9, "name": "grass", "isthing": 0, "color": [0, 160, 0]},
]
PALETTE = [(SKY, 1), (GRASS, 2), (PERSON_A, 0), (PERSON_B, 0), (CROWD, 0)]


class PaletteModel(nn.Module):
    """Queries = palette colours (+1 "no object" query); masks at ``1/stride`` of the input."""

    def __init__(self, palette, num_classes: int, stride: int = 1, tolerance: float = 24.0):
        super().__init__()
        self.register_buffer("colors", torch.tensor([c for c, _ in palette], dtype=torch.float32))
        self.labels = [k for _, k in palette]
        self.num_classes = num_classes
        self.stride = stride
        self.tolerance = tolerance
        self.calls = 0

    def forward(self, images: torch.Tensor) -> dict:
        self.calls += 1
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
        rgb = images * std + mean  # [B, 3, H, W]
        dist = (rgb[:, None] - self.colors[None, :, :, None, None]).abs().amax(2)
        match = (dist < self.tolerance).float()  # [B, P, H, W]
        match = F.avg_pool2d(match, self.stride)
        B, P = match.shape[:2]
        masks = torch.cat([20 * (match - 0.5), torch.full_like(match[:, :1], -20.0)], dim=1)
        logits = torch.zeros(B, P + 1, self.num_classes + 1)
        for q, k in enumerate(self.labels):
            logits[:, q, k] = 10.0
        logits[:, P, self.num_classes] = 10.0  # a "no object" query
        return {
            "pred_logits": logits,
            "pred_masks": masks,
            "pred_iou": torch.ones(B, P + 1),
            "aux_outputs": [],
        }


def _scene(shift: int, with_crowd: bool) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(image uint8 [H, W, 3], panoptic ids [H, W], segments_info) of one synthetic image."""
    ids = np.zeros((H, W), dtype=np.int64)
    image = np.zeros((H, W, 3), dtype=np.uint8)
    regions = [
        (10, 5, (slice(0, 24), slice(None)), SKY),
        (11, 9, (slice(24, H), slice(None)), GRASS),
        (21, 1, (slice(8, 32), slice(4 + shift, 20 + shift)), PERSON_A),
        (22, 1, (slice(20, 44), slice(30, 46)), PERSON_B),
    ]
    if with_crowd:
        regions.append((30, 1, (slice(30, 46), slice(50, 62)), CROWD))
    segments = []
    for seg_id, cat, where, color in regions:
        ids[where] = seg_id
        image[where] = color
        segments.append({"id": seg_id, "category_id": cat, "iscrowd": int(seg_id == 30)})
    ids[0:4, 40:] = 0  # a void band
    image[0:4, 40:] = 0
    return image, ids, segments


def _write_dataset(root: Path, n: int = 3) -> tuple[Path, Path, Path]:
    img_dir, png_dir = root / "images", root / "panoptic_val"
    img_dir.mkdir(parents=True)
    png_dir.mkdir()
    images, annotations = [], []
    for i in range(n):
        image, ids, segments = _scene(shift=3 * i, with_crowd=i % 2 == 0)
        Image.fromarray(image).save(img_dir / f"{i:04d}.png")
        Image.fromarray(id_to_rgb(ids)).save(png_dir / f"{i:04d}.png")
        images.append({"id": 100 + i, "file_name": f"{i:04d}.png", "height": H, "width": W})
        annotations.append(
            {"image_id": 100 + i, "file_name": f"{i:04d}.png", "segments_info": segments}
        )
    json_path = root / "panoptic_val.json"
    json_path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": JSON_CATEGORIES})
    )
    return img_dir, json_path, png_dir


@pytest.fixture()
def split(tmp_path):
    return _write_dataset(tmp_path / "data")


def test_evaluate_model_perfect_predictions_give_100(split, tmp_path):
    dataset = PanopticDataset(*split, transform=EvalTransform(None))
    model = PaletteModel(PALETTE, dataset.num_classes, stride=1)
    metrics = evaluate_model(
        model, dataset, None, "cpu", out_dir=tmp_path / "eval", batch_size=2, progress=False
    )
    assert metrics["All"] == {"pq": 100.0, "sq": 100.0, "rq": 100.0, "n": 3}
    assert metrics["Things"]["n"] == 1 and metrics["Stuff"]["n"] == 2
    # person: 2 per image, 3 images; the crowd-coloured predictions are ignored, not FPs
    assert metrics["per_class"][1] == pytest.approx(
        {
            "pq": 100.0,
            "sq": 100.0,
            "rq": 100.0,
            "tp": 6,
            "fp": 0,
            "fn": 0,
            "name": "person",
            "isthing": True,
        }
    )
    assert metrics["num_images"] == 3 and metrics["num_skipped"] == 0
    # the same queries give perfect instance AP (the crowd-coloured detections fall on crowd
    # GT: ignored, as COCOeval does) and a perfect semantic segmentation
    assert metrics["instance"]["AP"] == pytest.approx(100.0)
    assert metrics["instance"]["AP50"] == pytest.approx(100.0)
    assert metrics["semantic"]["mIoU"] == pytest.approx(100.0)
    assert metrics["semantic"]["per_class"] == pytest.approx(
        {"person": 100.0, "sky": 100.0, "grass": 100.0}
    )
    assert model.calls == 2  # batches of 2 + 1
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["All"]["pq"] == 100.0 and saved["per_class"]["9"]["name"] == "grass"


def test_evaluate_model_matches_file_based_pq_on_resized_input(split, tmp_path):
    # A lower test size and stride-4 masks make predictions imperfect; the written COCO
    # predictions must give exactly the same metrics through evaluate_from_files.
    dataset = PanopticDataset(*split, transform=EvalTransform(40))
    model = PaletteModel(PALETTE, dataset.num_classes, stride=4)
    out = tmp_path / "eval"
    metrics = evaluate_model(
        model,
        dataset,
        dataset.categories,
        "cpu",
        out_dir=out,
        write_predictions=True,
        num_visualize=1,
        progress=False,
        object_mask_threshold=0.5,
    )
    assert 50.0 < metrics["All"]["pq"] < 100.0
    pred_png = load_panoptic_png(out / "panoptic" / "0000.png")
    assert pred_png.shape == (H, W)  # original resolution
    files = evaluate_from_files(split[1], split[2], out / "predictions.json", out / "panoptic")
    for key in ("All", "Things", "Stuff"):
        assert files[key] == pytest.approx(metrics[key])
    for cat_id, row in metrics["per_class"].items():
        assert files["per_class"][cat_id] == pytest.approx(row)
    preds = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in preds["annotations"]] == [100, 101, 102]  # the JSON's ints
    panel = np.asarray(Image.open(out / "visualizations" / "100.jpg"))
    assert panel.shape == (H + 14, 3 * W + 8, 3)
    assert not (out / "visualizations" / "101.jpg").exists()


def test_evaluate_model_max_images_skips_and_bad_transform(split, tmp_path):
    img_dir, json_path, png_dir = split
    (img_dir / "0001.png").write_bytes(b"\x89PNG broken")
    dataset = PanopticDataset(
        img_dir, json_path, png_dir, transform=EvalTransform(None), on_bad_sample="skip"
    )
    model = PaletteModel(PALETTE, dataset.num_classes)
    metrics = evaluate_model(model, dataset, None, "cpu", progress=False)
    assert metrics["num_images"] == 2 and metrics["num_skipped"] == 1
    assert metrics["skipped"][0]["file_name"] == "0001.png"
    assert metrics["skipped"][0]["reason"] == "corrupt_image"
    assert metrics["per_class"][1]["tp"] == 4 and metrics["All"]["pq"] == 100.0

    one = evaluate_model(model, dataset, None, "cpu", max_images=1, progress=False)
    assert one["num_images"] == 1 and one["per_class"][1]["tp"] == 2

    train_view = PanopticDataset(img_dir, json_path, png_dir, transform=TrainTransform((64, 64)))
    with pytest.raises(ValueError, match="must be an EvalTransform"):
        evaluate_model(model, train_view, None, "cpu", progress=False)


def _rank_main(rank: int, world: int, init_file: str, split: tuple, result_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dataset = PanopticDataset(*split, transform=EvalTransform(40))
        model = PaletteModel(PALETTE, dataset.num_classes, stride=4)
        metrics = evaluate_model(
            model, dataset, None, "cpu", progress=False, object_mask_threshold=0.5
        )
        metrics["calls"] = model.calls
        Path(f"{result_file}.{rank}").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_evaluate_model_distributed_shards_and_merges(split, tmp_path):
    import torch.multiprocessing as mp

    dataset = PanopticDataset(*split, transform=EvalTransform(40))
    single = evaluate_model(
        PaletteModel(PALETTE, dataset.num_classes, stride=4),
        dataset,
        None,
        "cpu",
        progress=False,
        object_mask_threshold=0.5,
    )
    result = tmp_path / "result"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), split, str(result)), nprocs=2)
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(2)]
    assert [r["calls"] for r in ranks] == [2, 1]  # images 0, 2 on rank 0; image 1 on rank 1
    expected = json.loads(json.dumps(single))  # same key types as the ranks' JSON
    for r in ranks:
        assert r["settings"]["world_size"] == 2
        for key in ("All", "Things", "Stuff"):
            assert r[key] == pytest.approx(expected[key])
        for cat_id, row in expected["per_class"].items():
            assert r["per_class"][cat_id] == pytest.approx(row)


def test_predict_folder_writes_pngs_json_overlays_and_counts_bad_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image, ids, segments = _scene(shift=0, with_crowd=False)
    Image.fromarray(image).save(folder / "street.png")
    Image.fromarray(image).save(folder / "photo.JPG", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    from pipeline.data.coco_panoptic import parse_panoptic_json

    root = _write_dataset(tmp_path / "data", n=1)
    categories, _ = parse_panoptic_json(root[1])
    model = PaletteModel(PALETTE, len(categories), stride=1)
    out = tmp_path / "out"
    summary = predict_folder(
        model, folder, out, categories, test_size=None, device="cpu", progress=False
    )
    assert (summary.num_images, summary.num_predicted) == (3, 2)
    assert [name for name, _ in summary.skipped] == ["broken.jpg"]
    assert "broken.jpg" in summary.skipped[0][1] and "broken.jpg" in str(summary)

    preds = json.loads((out / "predictions.json").read_text())
    assert [a["image_id"] for a in preds["annotations"]] == ["photo", "street"]
    assert [c["id"] for c in preds["categories"]] == [1, 5, 9]
    assert preds["skipped"][0]["file_name"] == "broken.jpg"
    # the lossless PNG input is reproduced exactly, with original category ids
    pred_ids = load_panoptic_png(out / "panoptic" / "street.png")
    ann = next(a for a in preds["annotations"] if a["image_id"] == "street")
    category_of = {s["id"]: s["category_id"] for s in ann["segments_info"]}
    for gt in segments:
        region = ids == gt["id"]
        pred_here = np.unique(pred_ids[region])
        assert len(pred_here) == 1, gt
        assert np.array_equal(pred_ids == pred_here[0], region)
        assert category_of[int(pred_here[0])] == gt["category_id"]
    assert (pred_ids[ids == 0] == 0).all()
    for stem in ("photo", "street"):
        overlay = np.asarray(Image.open(out / "overlays" / f"{stem}.jpg"))
        assert overlay.shape == (H, W, 3)
    assert not (out / "panoptic" / "broken.png").exists()

    with pytest.raises(FileNotFoundError, match="image folder not found"):
        predict_folder(model, tmp_path / "missing", out, categories, None, "cpu")
