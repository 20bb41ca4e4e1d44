"""benchmarks/bench_distill.py: rows are built from the real training step, ratios and goals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/reg_sam/regnet_distill.yaml"

_spec = importlib.util.spec_from_file_location(
    "bench_distill", ROOT / "benchmarks/bench_distill.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look the module up
_spec.loader.exec_module(bench)

TINY = [
    "model.neck.channels=16",
    "model.head.num_queries=6",
    "model.head.num_stages=1",
    "model.head.ffn_dim=32",
    "model.loss.num_points=256",
    "model.resolution_distill.feat_channels=8",
    "model.sam_distill.num_points=128",
    "model.sam_distill.distill_feat_layers=[0, 1]",
    "teacher.tiny.img_size=128",
    "teacher.tiny.embed_dim=32",
    "teacher.tiny.depth=2",
    "teacher.tiny.global_attn_indexes=[0, 1]",
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_distill")
    overrides = (
        bench.setup_overrides(tmp, "sam_tiny", images=2, image_size=64, batch_size=2, crop=64)
        + TINY
    )
    prep = bench.prepare(CONFIG, overrides)
    results = bench.measure_rows(
        CONFIG,
        overrides,
        bench.select_rows(skip_live=True),
        tmp / "runs",
        device="cpu",
        threads=1,
        warmup=0,
        iters=1,
        progress=False,
    )
    return prep, results


def test_rows_build_what_they_claim(measured):
    prep, results = measured
    assert [r["key"] for r in results] == ["baseline", "fusion", "resolution_distill", "sam_cache"]
    terms = {r["key"]: set(r["terms"]) for r in results}
    assert {"loss_cls", "loss_mask", "loss_dice", "loss_iou"} <= terms["baseline"]
    assert "fusion_weights" not in terms["baseline"] and "fusion_weights" in terms["fusion"]
    assert not terms["fusion"] & {"loss_sr", "loss_fa", "loss_sam_distill"}
    assert {"loss_sr", "loss_fa", "loss_resolution_distill"} <= terms["resolution_distill"]
    assert "loss_sam_distill" not in terms["resolution_distill"]
    assert {
        "loss_feat_distill",
        "loss_cls_distill",
        "loss_mask_distill",
        "loss_sam_distill",
        "loss_sr",
    } <= terms["sam_cache"]
    # each row adds trainable parameters: fusion weights, the SR decoder, the SAM adapters
    params = [r["params_m"] for r in results]
    assert params[0] < params[1] < params[2] < params[3]
    # one batch for all rows; only the cached SAM row fetches teacher targets
    assert len({r["digest"] for r in results}) == 1
    assert results[0]["view"] == [2, 3, 64, 64]
    assert [r["teacher_ms"] is not None for r in results] == [False, False, False, True]
    assert results[3]["teacher_ms"] > 0
    assert all(r["step_ms"] > 0 and r["peak_mb"] > 0 for r in results)
    # FLOPs grow with every row that adds work (the low-resolution pass, the SAM adapters)
    gflop = [r["step_gflop"] for r in results]
    assert gflop[0] > 0 and gflop[1] == pytest.approx(gflop[0], rel=1e-3)
    assert gflop[2] > 1.1 * gflop[1] and gflop[3] > gflop[2]
    assert prep["layout"]["teacher"] == "sam_tiny" and prep["layout"]["input_size"] == 128


def test_table_and_report_have_one_line_per_row(measured):
    _, results = measured
    rows = bench.table_rows(results)
    assert [r["row"] for r in rows] == [r["label"] for r in results]
    assert {
        "step ms",
        "step ms per process",
        "step ms alone",
        "time x baseline",
        "peak memory MB",
        "memory x baseline",
        "teacher fetch ms/batch",
    } <= set(rows[0])
    # the side-by-side process timed every non-live row; each row also ran alone
    assert all(len(r["round_ms"]) == 1 and r["alone_ms"] > 0 for r in results)
    assert rows[0]["time x baseline"] == 1.0 and rows[0]["memory x baseline"] == 1.0
    assert rows[2]["time x baseline"] == pytest.approx(
        results[2]["step_ms"] / results[0]["step_ms"]
    )
    import torch

    info = {
        "device": torch.device("cpu"),
        "config": str(CONFIG),
        "batch_size": 2,
        "crop": 64,
        "images": 2,
        "image_size": 64,
        "warmup": 0,
        "iters": 1,
        "live_iters": 1,
        "rounds": 1,
        "layout": measured[0]["layout"],
        "load_before": "n/a",
    }
    report = bench.render_report(results, info)
    table = [ln for ln in report.splitlines() if ln.startswith("|") and "---" not in ln]
    assert len(table) == 1 + len(results)  # the header and one line per row
    assert "ru_maxrss" in report and "batch 2 x crop 64" in report
    assert "round-robin" in report


def _fake(key, step_ms, peak_mb, digest="d" * 64, teacher=None, teacher_ms=None):
    return {
        "key": key,
        "label": key,
        "step_ms": step_ms,
        "peak_mb": peak_mb,
        "digest": digest,
        "teacher": teacher,
        "teacher_ms": teacher_ms,
        "params_m": 1.0,
    }


def test_ratios_and_goal_verdicts_by_hand():
    results = bench.add_ratios(
        [
            _fake("baseline", 100.0, 200.0),
            _fake("fusion", 100.0, 200.0),
            _fake("resolution_distill", 130.0, 260.0),
            _fake("sam_cache", 138.0, 262.0, teacher="cache", teacher_ms=5.0),
        ]
    )
    assert [r["time_ratio"] for r in results] == pytest.approx([1.0, 1.0, 1.3, 1.38])
    assert results[0]["time_added"] is None
    assert [r["time_added"] for r in results[1:]] == pytest.approx([0.0, 0.3, 0.08])
    assert [r["mem_added"] for r in results[1:]] == pytest.approx([0.0, 0.3, 0.01])
    lines = bench.goal_lines(results)
    assert "adds +30.0 % time" in lines[0] and "NOT met" in lines[0]
    assert "adds +30.0 % memory" in lines[1] and "**met**" in lines[1]
    assert "adds +8.0 % time" in lines[2] and "**met**" in lines[2]


def test_rows_run_alone_then_side_by_side_and_report_medians(monkeypatch, tmp_path):
    calls = []
    side_by_side = iter(
        [
            {"baseline": 100.0, "fusion": 200.0},
            {"baseline": 90.0, "fusion": 210.0},
            {"baseline": 130.0, "fusion": 190.0},
        ]
    )

    def fake(spec, env=None):
        if "rows" in spec:  # one side-by-side process
            keys = [r["key"] for r in spec["rows"]]
            calls.append("+".join(keys))
            return {"step_ms": next(side_by_side), "digests": {k: "d" * 64 for k in keys}}
        key = spec["row"]["key"]
        calls.append(key)
        return _fake(
            key,
            {"baseline": 95.0, "fusion": 230.0, "sam_live": 5000.0}[key],
            10.0,
            teacher=spec["row"]["teacher"],
            teacher_ms=7.0 if key == "sam_live" else None,
        )

    monkeypatch.setattr(bench, "run_row_isolated", fake)
    rows = [bench.ROWS[0], bench.ROWS[1], bench.ROWS[4]]
    results = bench.measure_rows(CONFIG, [], rows, tmp_path, rounds=3, progress=False)
    # every row alone once (memory), then the non-live rows side by side in 3 processes
    assert calls == ["baseline", "fusion", "sam_live"] + ["baseline+fusion"] * 3
    assert [r["round_ms"] for r in results] == [[100.0, 90.0, 130.0], [200.0, 210.0, 190.0], []]
    assert [r["step_ms"] for r in results] == [100.0, 200.0, 5000.0]
    assert [r["alone_ms"] for r in results] == [95.0, 230.0, 5000.0]
    assert results[1]["time_ratio"] == pytest.approx(2.0)
    assert results[2]["time_added"] == pytest.approx(48.0)
    assert bench.table_rows(results)[2]["step ms per process"] == "–"


def test_rows_on_different_batches_are_refused(monkeypatch, tmp_path):
    def fake(spec, env=None):
        if "rows" in spec:
            return {
                "step_ms": {r["key"]: 1.0 for r in spec["rows"]},
                "digests": {r["key"]: "b" * 64 for r in spec["rows"]},
            }
        return _fake(spec["row"]["key"], 1.0, 1.0, digest="a" * 64)

    monkeypatch.setattr(bench, "run_row_isolated", fake)
    with pytest.raises(RuntimeError, match="same batch"):
        bench.measure_rows(CONFIG, [], bench.ROWS[:2], tmp_path, progress=False)
    with pytest.raises(ValueError, match="iters"):
        bench.measure_rows(CONFIG, [], bench.ROWS[:2], tmp_path, iters=0, progress=False)


def test_decomposition_rows_split_the_resolution_distillation():
    rows = bench.select_rows(skip_live=True, decompose=True)
    assert [r.key for r in rows] == [
        "baseline",
        "fusion",
        "rd_lr_path",
        "rd_lr_path_sr",
        "resolution_distill",
        "sam_cache",
    ]
    results = bench.add_ratios(
        [
            _fake("baseline", 100.0, 200.0),
            _fake("fusion", 102.0, 200.0),
            _fake("rd_lr_path", 122.0, 230.0),
            _fake("rd_lr_path_sr", 128.0, 240.0),
            _fake("resolution_distill", 130.0, 244.0),
            _fake("sam_cache", 139.0, 250.0),
        ]
    )
    for r, g in zip(results, [10.0, 10.0, 12.5, 12.7, 12.8, 13.0]):
        r["step_gflop"] = g
    lines = bench.goal_lines(results)
    assert "low-resolution pass alone adds +25.0 % of the baseline's FLOPs" in lines[4]
    # goals compare with the row each part adds to, not the diagnostic row above
    assert "adds +28.0 % time" in lines[0] and "'fusion'" in lines[0] and "NOT met" in lines[0]
    assert "adds +22.0 % memory" in lines[1] and "**met**" in lines[1]
    assert "adds +9.0 % time" in lines[2] and "**met**" in lines[2]
    assert "low-resolution pass +20.0 %, SR decoder + loss_sr +6.0 %, loss_fa +2.0 %" in lines[3]


def test_partial_distiller_runs_only_its_part():
    import torch

    from pipeline.models.resolution_distill import ResolutionDistiller

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)
            self.calls = []

        def forward_features(self, images):
            self.calls.append(tuple(images.shape[-2:]))
            return {"mask_features": self.conv(images)}

    torch.manual_seed(0)
    student = Student()
    distiller = ResolutionDistiller(
        in_channels=4,
        feat_channels=4,
        sr_loss_weight=0.5,
        fa_loss_weight=0.5,
        fa_subscale=0.5,
        lr_scale=0.5,
        mask_stride=4,
    )
    images = torch.randn(2, 3, 32, 32)
    lr_only = bench._partial_resolution_distill(distiller, "lr_path")(student, images, {})
    assert student.calls == [(16, 16)] and lr_only["loss_resolution_distill"].item() == 0.0
    lr_only["loss_resolution_distill"].backward()
    assert student.conv.weight.grad is not None and distiller.sr_decoder.body[0].weight.grad is None
    with_sr = bench._partial_resolution_distill(distiller, "lr_path_sr")(student, images, {})
    full = distiller(
        student, images, {"mask_features": student.forward_features(images)["mask_features"]}
    )
    torch.testing.assert_close(with_sr["loss_resolution_distill"], 0.5 * full["loss_sr"])


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--iters", "0"])
    assert [r.key for r in bench.select_rows(skip_live=True)] == [
        "baseline",
        "fusion",
        "resolution_distill",
        "sam_cache",
    ]
    assert bench.select_rows(skip_live=False)[-1].teacher == "live"
