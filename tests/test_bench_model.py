"""benchmarks/bench_model.py: the convolution reference rows (their MACs by hand, BatchNorm
folded, onnxruntime = eager), the FLOP-floor table from hand-made timings, default configs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.complexity import count_flops

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("bench_model", ROOT / "benchmarks/bench_model.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def _cells(text: str) -> dict[str, list[str]]:
    """Markdown table -> {first cell + " | " + second cell: the remaining cells}."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[f"{cells[0]} | {cells[1]}"] = cells[2:]
    return rows


def test_reference_macs_by_hand_at_640():
    """3 blocks at 160x160 (640 / 4), 128 -> 128: dense 3 * 128 * 128 * 9 MACs a pixel;
    separable 3 * (128 * 9 + 128 * 128)."""
    shape = bench.reference_shape((640, 640))
    assert shape == (1, 128, 160, 160)
    dense = count_flops(bench.build_reference("dense"), shape).gmacs
    separable = count_flops(bench.build_reference("separable"), shape).gmacs
    assert dense == pytest.approx(3 * 128 * 128 * 9 * 160 * 160 / 1e9, abs=1e-9)  # 11.3246
    assert separable == pytest.approx(3 * (128 * 9 + 128 * 128) * 160 * 160 / 1e9, abs=1e-9)
    # the dense reference is the COCO student's P2 output conv three times over (3 x 3.77)
    assert dense / 3 == pytest.approx(3.7748736, abs=1e-9)
    with pytest.raises(ValueError, match="reference kind must be one of"):
        bench.build_reference("winograd")


@pytest.mark.parametrize("kind, convs", [("dense", 3), ("separable", 6)])
def test_reference_is_batchnorm_folded(kind, convs):
    model = bench.build_reference(kind)
    assert not model.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    conv_layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(conv_layers) == convs and all(c.bias is not None for c in conv_layers)
    # the same weights in every process
    a, b = bench.build_reference(kind).state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_rows_onnxruntime_matches_eager_at_two_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    references = []
    for kind in bench.REFERENCE_KINDS:
        path = bench.export_reference_onnx(bench.build_reference(kind), tmp_path / f"{kind}.onnx")
        references.append({"kind": kind, "onnx": str(path)})
    sizes = [(64, 64), (96, 128)]
    spec = {"students": [], "references": references, "peer": False, "sizes": sizes, "threads": 1}
    rows = dict(bench.build_rows(spec))
    assert list(rows) == [
        "ref|dense|eager",
        "ref|dense|onnxruntime fp32",
        "ref|separable|eager",
        "ref|separable|onnxruntime fp32",
    ]
    for h, w in sizes:
        image = torch.zeros(1, 3, h, w, dtype=torch.uint8)  # only its size matters
        for kind in bench.REFERENCE_KINDS:
            with torch.inference_mode():
                eager = rows[f"ref|{kind}|eager"](image)
            (ort,) = rows[f"ref|{kind}|onnxruntime fp32"](image)
            assert tuple(eager.shape) == (1, 128, h // 4, w // 4) == ort.shape
            assert float((eager - torch.from_numpy(ort)).abs().max()) <= 1e-4
            assert float(eager.abs().max()) > 0


def _prepared(peer: bool = True) -> dict:
    out = {
        "students": [
            {
                "label": "student A",
                "params": 10_000_000,
                "gmacs": {"64x64": 25.0},
                "backbone_gmacs": {"64x64": 12.5},
            }
        ],
        "references": [
            {"kind": "dense", "label": "ref dense", "params": 1_000_000, "gmacs": {"64x64": 10.0}},
            {"kind": "separable", "label": "ref sep", "params": 100_000, "gmacs": {"64x64": 1.0}},
        ],
    }
    if peer:
        out["peer"] = {"params": 44_000_000, "gmacs": {"64x64": 100.0}}
    return out


# two processes; ms per forward, the same except the dense onnxruntime reference row
def _run(dense_ort_ms: float) -> dict:
    return {
        "ms": {
            "64x64": {
                "0|eager": 500.0,
                "0|torch.export": 450.0,
                "0|onnxruntime fp32": 480.0,
                "0|onnxruntime int8": 900.0,
                "peer|eager": 3000.0,
                "ref|dense|eager": 200.0,
                "ref|dense|onnxruntime fp32": dense_ort_ms,
                "ref|separable|eager": 50.0,
                "ref|separable|onnxruntime fp32": 40.0,  # 1 / 0.04 = 25 GMAC/s
            }
        }
    }


RUNS = [_run(150.0), _run(170.0)]  # dense onnxruntime median 160 ms: 10 / 0.16 = 62.5 GMAC/s


def test_floor_table_by_hand():
    """Best reference 62.5 GMAC/s (dense, onnxruntime): the 25-GMAC student's floor is 400 ms,
    so at most 3000 / 400 = 7.5x Mask2Former and 500 / 400 = 1.25x its eager ms; its 12.5-GMAC
    backbone alone takes 200 ms: at most 15x Mask2Former."""
    assert bench.best_reference(_prepared(), RUNS, "64x64") == (62.5, "dense, onnxruntime fp32")
    text = bench.floor_table(_prepared(), RUNS, [(64, 64)])
    assert "best reference: 64x64: 62.50 GMAC/s (dense, onnxruntime fp32)" in text
    header = [line for line in text.splitlines() if line.startswith("| model")][0]
    assert [c.strip() for c in header.split("|")[2:-1]] == [
        "GMACs 64x64",
        "backbone GMACs 64x64",
        "floor ms 64x64",
        "max M2F / row 64x64",
        "max M2F / row, backbone alone 64x64",
        "max eager / floor 64x64",
    ]
    (row,) = [line for line in text.splitlines() if line.startswith("| student A")]
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells == ["25.00", "12.50", "400.00", "7.50", "15.00", "1.25"]
    # without Mask2Former the ratios to it are "–", the rest stays
    no_peer = bench.floor_table(_prepared(peer=False), RUNS, [(64, 64)])
    (row,) = [line for line in no_peer.splitlines() if line.startswith("| student A")]
    assert [c.strip() for c in row.split("|")[2:-1]] == [
        "25.00",
        "12.50",
        "400.00",
        "–",
        "–",
        "1.25",
    ]
    # no reference rows (--no-reference): no floor table
    prepared = _prepared()
    del prepared["references"]
    assert bench.floor_table(prepared, RUNS, [(64, 64)]) is None


def test_main_table_lists_reference_rows_without_a_mask2former_ratio():
    rows = _cells(bench.table(_prepared(), RUNS, [(64, 64)]))
    # params, GMACs, ms (median of 150 / 170), M2F / row, GMAC/s
    assert rows["ref dense | onnxruntime fp32"] == ["1.00", "10.00", "160.00", "–", "62.50"]
    assert rows["ref sep | eager"] == ["0.10", "1.00", "50.00", "–", "20.00"]
    assert rows["student A | eager"] == ["10.00", "25.00", "500.00", "6.00", "50.00"]
    assert len(rows) == 4 + 1 + 4  # student rows, Mask2Former, reference rows


def test_default_configs_include_the_fast_coco_student():
    args = bench.parse_args([])
    assert args.config == bench.DEFAULT_CONFIGS
    assert "configs/coco/regnet_distill_fast.yaml" in args.config
    assert all((ROOT / c).is_file() for c in args.config)
    labels = [bench.student_label(str(ROOT / c)) for c in args.config]
    assert labels == [
        "student regnetx_002, neck 64, 20 q × 2 st",
        "student regnetx_016, neck 128, 100 q × 3 st",
        "student regnetx_016, neck 128 separable, 100 q × 3 st",
    ]
    assert not args.no_reference
    args = bench.parse_args(
        ["--config", "a.yaml", "--sizes", "640x640", "--no-reference", "--no-peer", "--no-int8"]
    )
    assert (args.config, args.sizes) == (["a.yaml"], [(640, 640)])
    assert args.no_reference and args.no_peer and args.no_int8
