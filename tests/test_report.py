"""The ablation report: tables, provenance, figures and error messages on fake run directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config, load_config_dict
from pipeline.report import ReportError, build_report, load_run, moving_average, read_jsonl
from pipeline.report import figures
from pipeline.report.report import complexity_input_shape, student_complexity


# ------------------------------------------------------------------------------ fixtures
def _config(fusion: bool, rd: bool, sam: bool, experiment: str) -> dict:
    return load_config_dict(
        {
            "experiment": experiment,
            "data": {"test_size": 100},  # padded to 128 (size_divisibility 32)
            "training": {"max_iters": 100},
            "model": {
                "use_learnable_fusion": fusion,
                "use_resolution_distill": rd,
                "use_sam_distill": sam,
            },
        }
    ).to_dict()


def _records(n: int, fusion: bool, distill: bool, offset: float) -> list[dict]:
    out = []
    for it in range(1, n + 1):
        rec = {
            "iter": it,
            "lr": 1e-3,
            "loss": 10.0 - it * 0.01 + offset,
            "loss_cls": 1.0 + offset,
            "loss_mask": 2.0,
            "loss_dice": 3.0,
            "loss_iou": 0.5 * it,
            "time": 0.1,
            "data_time": 0.01,
        }
        if distill:
            rec["loss_sr"] = 0.25
        if fusion:
            # raw weights; the final ones normalise to [0.125, 0.125, 0.25, 0.5]
            rec["fusion_weights"] = [1.0, 1.0, 2.0, 4.0] if it == n else [1.0, 1.0, 1.0, 1.0]
        out.append(rec)
    return out


def make_run(
    root: Path,
    name: str,
    *,
    fusion=False,
    rd=False,
    sam=False,
    status="done",
    pq=(41.25, 70.5, 55.0, 30.0, 52.5),
    evaluated=True,
    n_iters=100,
    panels=("000001", "000002"),
    offset=0.0,
) -> Path:
    run = root / name
    (run / "eval" / "panels").mkdir(parents=True)
    info = {
        "experiment": name,
        "seed": 7,
        "git_commit": "0123456789abcdef0123-dirty",
        "config": _config(fusion, rd, sam, name),
        "cache_fingerprint": "feedbeefcafe00112233",
        "status": status,
        "iterations": n_iters,
        "train_seconds_total": 630.0,
        "skipped_samples": {},
    }
    if status != "done":
        del info["iterations"], info["train_seconds_total"]
    (run / "run_info.json").write_text(json.dumps(info))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _records(n_iters, fusion, rd, offset))
    )
    if evaluated:
        all_, th, st = pq[:3], pq[3], pq[4]
        (run / "eval" / "metrics.json").write_text(
            json.dumps(
                {
                    "All": {"pq": all_[0], "sq": all_[1], "rq": all_[2], "n": 3},
                    "Things": {"pq": th, "sq": 60.0, "rq": 50.0, "n": 2},
                    "Stuff": {"pq": st, "sq": 80.0, "rq": 65.0, "n": 1},
                    "per_class": {
                        "1": {"name": "car", "pq": th, "sq": 60.0, "rq": 50.0},
                        "2": {"name": "road", "pq": st, "sq": 80.0, "rq": 65.0},
                    },
                    "num_images": 16,
                }
            )
        )
    for i, stem in enumerate(panels):
        Image.new("RGB", (48, 16), (40 * i, 100, 200)).save(run / "eval" / "panels" / f"{stem}.png")
    (run / "final.pth").write_bytes(b"weights of " + name.encode())
    return run


class FakeMeasurer:
    """Stands in for the real student measurement; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, tuple]] = []

    def __call__(self, weights: Path, input_shape: tuple) -> dict:
        self.calls.append((weights, tuple(input_shape)))
        size = weights.stat().st_size
        return {
            "params_m": 3.5,
            "gflops": 12.25 + size / 100,
            "latency_ms": 8.0 + size / 10,
            "device": "cpu",
        }


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    return [
        make_run(root, "baseline", pq=(41.25, 70.5, 55.0, 30.0, 52.5), offset=0.0),
        make_run(
            root,
            "all",
            fusion=True,
            rd=True,
            pq=(43.333, 71.0, 57.1, 33.0, 53.75),
            panels=("000001",),
            offset=1.0,
        ),
        make_run(
            root, "crashed", sam=True, status="running", evaluated=False, n_iters=40, panels=()
        ),
    ]


def table(md: str, section: str) -> dict[str, dict[str, str]]:
    """Rows of the first Markdown table after ``## section``, keyed by the first column."""
    lines = md.split(f"## {section}\n", 1)[1].splitlines()
    rows = [ln for ln in lines[lines.index(next(x for x in lines if x.startswith("|"))) :]]
    rows = rows[: next((i for i, x in enumerate(rows) if not x.startswith("|")), len(rows))]
    cells = [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]
    header = cells[0]
    return {c[0]: dict(zip(header, (x.replace("**", "") for x in c))) for c in cells[2:]}


# --------------------------------------------------------------------------------- tests
def test_moving_average_hand_computed():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_allclose(moving_average(x, 3), [1.0, 1.5, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(moving_average(x, 1), x)
    np.testing.assert_allclose(moving_average(x, 10), [1.0, 1.5, 2.0, 2.5, 3.0])
    np.testing.assert_allclose(moving_average([4.0, 0.0, 2.0, 6.0], 2), [4.0, 2.0, 1.0, 4.0])
    assert moving_average([], 3).shape == (0,)
    with pytest.raises(ValueError, match="window"):
        moving_average(x, 0)


def test_table_values_switches_and_missing_run(runs, tmp_path):
    measure = FakeMeasurer()
    md = build_report(runs, tmp_path / "out", "Ablation", measure_fn=measure).read_text()
    assert md.startswith("# Ablation\n")
    rows = table(md, "Results")
    assert list(rows) == ["baseline", "all", "crashed"]  # order kept, nothing dropped
    b, a, c = rows["baseline"], rows["all"], rows["crashed"]
    assert (b["fusion"], b["res. distill"], b["SAM distill"]) == ("–", "–", "–")
    assert (a["fusion"], a["res. distill"], a["SAM distill"]) == ("✓", "✓", "–")
    assert (c["fusion"], c["res. distill"], c["SAM distill"]) == ("–", "–", "✓")
    assert (b["PQ"], b["SQ"], b["RQ"], b["PQ Th"], b["PQ St"]) == (
        "41.25",
        "70.50",
        "55.00",
        "30.00",
        "52.50",
    )
    assert (a["PQ"], a["PQ St"]) == ("43.33", "53.75")
    assert "**43.33**" in md and "**41.25**" not in md  # best PQ in bold
    assert b["params (M)"] == "3.50"
    size = (runs[0] / "final.pth").stat().st_size
    assert b["GFLOPs"] == f"{12.25 + size / 100:.2f}"
    assert b["latency (ms)"] == f"{8.0 + size / 10:.2f}"
    assert b["train (min)"] == "10.5" and b["iters"] == "100" and b["status"] == "done"
    # the unfinished run without eval metrics is marked, not dropped
    assert c["PQ"] == c["SQ"] == c["PQ Th"] == "n/a"
    assert c["iters"] == "40/100" and c["train (min)"] == "n/a"
    assert "unfinished (status 'running')" in c["status"] and "no eval/metrics.json" in c["status"]
    assert "Not plotted (no PQ or no latency): crashed." in md


def test_complexity_is_measured_once_and_cached(runs, tmp_path):
    measure = FakeMeasurer()
    build_report(runs, tmp_path / "out", "t", measure_fn=measure)
    assert [(w, s) for w, s in measure.calls] == [(r / "final.pth", (1, 3, 128, 128)) for r in runs]
    cached = json.loads((runs[0] / "complexity.json").read_text())
    assert cached["params_m"] == 3.5 and cached["input_shape"] == [1, 3, 128, 128]
    build_report(runs, tmp_path / "out", "t", measure_fn=measure)
    assert len(measure.calls) == 3  # reused
    (runs[1] / "final.pth").write_bytes(b"retrained weights")  # new weights -> measured again
    build_report(runs, tmp_path / "out", "t", measure_fn=measure)
    assert [w for w, _ in measure.calls[3:]] == [runs[1] / "final.pth"]


def test_no_measurement_when_disabled(runs, tmp_path):
    measure = FakeMeasurer()
    md = build_report(
        runs, tmp_path / "out", "t", measure_complexity=False, measure_fn=measure
    ).read_text()
    assert measure.calls == [] and not (runs[0] / "complexity.json").exists()
    rows = table(md, "Results")
    assert rows["baseline"]["params (M)"] == "n/a" and rows["baseline"]["PQ"] == "41.25"


def test_figures_are_valid_pngs(runs, tmp_path):
    out = tmp_path / "out"
    md = build_report(runs, out, "t", measure_fn=FakeMeasurer()).read_text()
    dpi = figures.DPI
    # 6 loss terms (loss, cls, mask, dice, iou, sr) in 3 columns -> 2 rows
    expected = {
        "pq_vs_latency.png": (6.0 * dpi, 4.5 * dpi),
        "loss_curves.png": (3 * 4.2 * dpi, (2 * 3.0 + 0.6) * dpi),
        "fusion_weights.png": (11.0 * dpi, 4.0 * dpi),
    }
    for name, size in expected.items():
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert im.size == (round(size[0]), round(size[1]))
            im.verify()


def test_loss_curves_one_subplot_per_term():
    recs = {
        "a": _records(20, fusion=False, distill=True, offset=0.0),
        "b": _records(20, fusion=False, distill=False, offset=1.0),
    }
    fig = figures.plot_loss_curves(recs, window=4)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "loss_cls", "loss_mask", "loss_dice", "loss_iou", "loss_sr"]
    lines = {ax.get_title(): ax.get_lines() for ax in fig.axes}
    assert [ln.get_label() for ln in lines["loss_cls"]] == ["a", "b"]
    assert [ln.get_label() for ln in lines["loss_sr"]] == ["a"]  # only run a logs it
    iou_a = lines["loss_iou"][0]  # values 0.5 * iter, window 4
    np.testing.assert_allclose(iou_a.get_xdata(), np.arange(1, 21))
    expected = [0.5, 0.75, 1.0] + [0.5 * (i - 1.5) for i in range(4, 21)]
    np.testing.assert_allclose(iou_a.get_ydata(), expected)


def test_fusion_weights_table(runs, tmp_path):
    md = build_report(runs, tmp_path / "out", "t", measure_fn=FakeMeasurer()).read_text()
    rows = table(md, "Learned fusion weights")
    assert list(rows) == ["all"]  # the only run with learnable fusion
    assert [rows["all"][f"P{i} (s{2**i})"] for i in range(2, 6)] == [
        "0.125",
        "0.125",
        "0.250",
        "0.500",
    ]
    hist = figures.fusion_history(_records(3, fusion=True, distill=False, offset=0.0))
    np.testing.assert_allclose(hist[0], [1, 2, 3])
    np.testing.assert_allclose(hist[1][0], [0.25] * 4)


def test_provenance_and_reproducible_config(runs, tmp_path):
    out = tmp_path / "out"
    md = build_report(runs, out, "t", measure_fn=FakeMeasurer()).read_text()
    rows = table(md, "Provenance")
    assert rows["all"]["git commit"] == "0123456789 (dirty)"
    assert rows["all"]["seed"] == "7" and rows["all"]["cache"] == "feedbeefcafe"
    assert rows["all"]["config"] == "[configs/all.yaml](configs/all.yaml)"
    resolved = load_config(out / "configs" / "all.yaml")
    assert resolved.to_dict() == json.loads((runs[1] / "run_info.json").read_text())["config"]
    assert f"python -m pipeline train --config {out / 'configs' / 'all.yaml'}" in md


def test_panels_side_by_side(runs, tmp_path):
    out = tmp_path / "out"
    # the evaluator's own layout (eval/visualizations/<image_id>.jpg) is read as well
    (runs[2] / "eval" / "visualizations").mkdir()
    Image.new("RGB", (48, 16)).save(runs[2] / "eval" / "visualizations" / "000002.jpg")
    md = build_report(runs, out, "t", measure_fn=FakeMeasurer()).read_text()
    rows = table(md, "Qualitative results")
    assert list(rows) == ["000001", "000002"]
    assert rows["000001"]["baseline"] == "![baseline 000001](panels/baseline/000001.png)"
    assert rows["000001"]["all"] == "![all 000001](panels/all/000001.png)"
    assert rows["000002"]["all"] == "n/a"
    assert rows["000001"]["crashed"] == "n/a"
    assert rows["000002"]["crashed"] == "![crashed 000002](panels/crashed/000002.jpg)"
    assert list(table(md, "Qualitative results")["000001"]) == [
        "image",
        "baseline",
        "all",
        "crashed",
    ]
    with Image.open(out / "panels" / "all" / "000001.png") as im:
        assert im.size == (48, 16)


def test_corrupt_metrics_line_names_file_and_line(runs):
    path = runs[0] / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"iter": 3, "loss": 1.0'  # truncated
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=rf"{path}:3: not valid JSON"):
        read_jsonl(path)
    with pytest.raises(ReportError, match=rf"{path}:3:"):
        load_run(runs[0])
    lines[2] = '{"loss": 1.0}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=rf"{path}:3: field 'iter'"):
        read_jsonl(path)


def test_bad_eval_and_run_dir_errors(runs, tmp_path):
    eval_path = runs[0] / "eval" / "metrics.json"
    eval_path.write_text('{"All": {"pq": 1.0,\n "sq": }')
    with pytest.raises(ReportError, match=rf"{eval_path}:2: not valid JSON"):
        load_run(runs[0])
    eval_path.write_text(json.dumps({"All": {"pq": 1.0, "sq": 2.0}}))
    with pytest.raises(ReportError, match=r"metrics\.json: field 'All\.rq' is missing"):
        load_run(runs[0])
    eval_path.write_text(json.dumps({"All": {"pq": "high", "sq": 2.0, "rq": 3.0}}))
    with pytest.raises(ReportError, match=r"field 'pq' must be a number"):
        load_run(runs[0])
    with pytest.raises(ReportError, match="run directory not found: .*nope"):
        build_report([tmp_path / "nope"], tmp_path / "out", "t", measure_fn=FakeMeasurer())


def test_measurer_output_is_checked(runs, tmp_path):
    with pytest.raises(ReportError, match="returned no 'latency_ms'"):
        build_report(
            runs[:1],
            tmp_path / "out",
            "t",
            measure_fn=lambda w, s: {"params_m": 1.0, "gflops": 2.0},
        )


def test_student_complexity_on_a_tiny_student(tmp_path):
    from pipeline.evaluation.complexity import count_params
    from pipeline.models.student import build_student

    cfg = load_config_dict(
        {
            "data": {"test_size": 64},
            "model": {
                "neck": {"channels": 16},
                "head": {"num_queries": 8, "num_stages": 1, "ffn_dim": 16},
            },
        }
    )
    torch.manual_seed(0)
    model = build_student(cfg.model, 3)
    weights = tmp_path / "final.pth"
    torch.save(
        {
            "student": model.state_dict(),
            "config": json.dumps(cfg.to_dict()),
            "categories": json.dumps(
                [
                    {"id": i, "name": str(i), "isthing": 1, "color": [0, 0, 0], "train_id": i}
                    for i in range(3)
                ]
            ),
        },
        weights,
    )
    shape = complexity_input_shape(cfg)
    assert shape == (1, 3, 64, 64)
    out = student_complexity(weights, shape, device="cpu", warmup=0, iters=1)
    assert out["params_m"] == pytest.approx(count_params(model) / 1e6)
    assert out["gflops"] > 0 and out["gmacs"] == pytest.approx(out["gflops"] / 2)
    assert out["latency_ms"] > 0 and out["device"] == "cpu"
    torch.save({"student": model.state_dict()}, weights)
    with pytest.raises(ReportError, match="missing key 'config'"):
        student_complexity(weights, shape, device="cpu", warmup=0, iters=1)


def test_report_says_which_checkpoint_each_row_uses(runs, tmp_path):
    # "all" was evaluated from best.pth (pipeline evaluate records settings.checkpoint) and
    # kept a best.pth during training; "baseline" predates the field: the evaluate rule's final.pth
    metrics_path = runs[1] / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics.update(
        settings={"checkpoint": str(runs[1] / "best.pth")},
        instance={"AP": 12.5},
        semantic={"mIoU": 61.0},
    )
    metrics_path.write_text(json.dumps(metrics))
    info_path = runs[1] / "run_info.json"
    info_path.write_text(
        json.dumps({**json.loads(info_path.read_text()), "best": {"iteration": 80, "pq": 43.5}})
    )
    md = build_report(runs, tmp_path / "out", "t", measure_fn=FakeMeasurer()).read_text()
    results = table(md, "Results")
    assert results["all"]["checkpoint"] == "best.pth"
    assert results["baseline"]["checkpoint"] == "final.pth"
    assert results["crashed"]["checkpoint"] == "n/a"
    assert results["all"]["AP Th"] == "12.50" and results["all"]["mIoU"] == "61.00"
    assert results["baseline"]["AP Th"] == "n/a"
    prov = table(md, "Provenance")
    assert prov["all"]["evaluated"] == "best.pth"
    assert prov["all"]["best.pth (during training)"] == "PQ 43.50 @ 80"
    assert prov["baseline"]["best.pth (during training)"] == "–"
