"""Tests of pipeline.evaluation.complexity against hand-computed counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.evaluation.complexity import (
    FlopCount,
    complexity_table,
    count_flops,
    count_params,
    measure_latency,
)


def _small_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1),  # 8*3*9 + 8
        nn.BatchNorm2d(8),  # 8 + 8 (+ buffers, not params)
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, stride=2, bias=False),  # 16*8*9
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),  # 16*5 + 5
    )


def test_count_params_matches_hand_count():
    model = _small_convnet()
    expected = (8 * 3 * 9 + 8) + (8 + 8) + (16 * 8 * 9) + (16 * 5 + 5)
    assert count_params(model) == expected == 1477


def test_count_params_shared_and_frozen():
    lin = nn.Linear(4, 4)  # 20 params
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(4, 2))  # shared lin counted once
    assert count_params(model) == 20 + 10
    for p in lin.parameters():
        p.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 10
    assert count_params(model) == 30


def test_flops_single_conv_equal_two_macs():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    # output 8 x 16 x 16 for a 32 x 32 input; MACs = C_out * C_in * k*k * H_out * W_out * B
    macs = 8 * 3 * 3 * 3 * 16 * 16 * 2
    fc = count_flops(conv, (2, 3, 32, 32))
    assert isinstance(fc, FlopCount)
    assert fc.gflops * 1e9 == pytest.approx(2 * macs)
    assert fc.gmacs * 1e9 == pytest.approx(macs)
    assert fc.by_operator["convolution"] * 1e9 == pytest.approx(2 * macs)


def test_flops_grouped_conv():
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)  # depthwise
    macs = 8 * 1 * 9 * 10 * 12
    assert count_flops(conv, (1, 8, 10, 12)).gflops * 1e9 == pytest.approx(2 * macs)


def test_flops_linear_and_sequence():
    lin = nn.Linear(16, 5)
    # input [B, 3, 7, 16] -> 3*7*B rows of a 16x5 matrix product
    fc = count_flops(lin, (2, 3, 7, 16))
    assert fc.gflops * 1e9 == pytest.approx(2 * (2 * 3 * 7) * 16 * 5)

    model = _small_convnet()
    # conv1: 8*3*9 MACs per pixel on 12x12; conv2 (stride 2, no pad): 16*8*9 on 5x5; linear 16*5
    macs = 8 * 3 * 9 * 12 * 12 + 16 * 8 * 9 * 5 * 5 + 16 * 5
    fc = count_flops(model, (1, 3, 12, 12))
    assert fc.gmacs * 1e9 == pytest.approx(macs)
    assert model.training  # train/eval state is restored


def test_latency_keys_and_values():
    model = _small_convnet().train()
    out = measure_latency(model, (2, 3, 16, 16), "cpu", warmup=1, iters=3)
    assert set(out) == {"mean_ms", "median_ms", "p90_ms", "fps"}
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    assert out["fps"] == pytest.approx(2 * 1000.0 / out["mean_ms"])
    assert model.training


def test_latency_reduced_precision_half_copy_leaves_model():
    model = nn.Conv2d(3, 4, 3)
    out = measure_latency(
        model, (1, 3, 8, 8), "cpu", warmup=0, iters=1, dtype=torch.bfloat16, precision_mode="half"
    )
    assert out["mean_ms"] > 0
    assert model.weight.dtype == torch.float32
    out = measure_latency(model, (1, 3, 8, 8), "cpu", warmup=0, iters=2, dtype=torch.bfloat16)
    assert out["median_ms"] > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(1, 3, 0, 8)), "input_shape"),
        (dict(input_shape=(1, 3, 8, 8), iters=0), "iters"),
        (dict(input_shape=(1, 3, 8, 8), warmup=-1), "warmup"),
        (dict(input_shape=(1, 3, 8, 8), precision_mode="int8"), "precision_mode"),
    ],
)
def test_latency_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        measure_latency(nn.Identity(), device="cpu", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        count_flops(nn.Identity(), (1, 3, 8, 8), device="cuda")


def test_complexity_table_markdown():
    rows = [
        {"Model": "student", "Params (M)": 3.14159, "FPS": 120.0},
        {"Model": "peer|R50", "Params (M)": 44.0, "FPS": None, "Note": "x"},
    ]
    table = complexity_table(rows)
    assert table == (
        "| Model | Params (M) | FPS | Note |\n"
        "| :--- | ---: | ---: | :--- |\n"
        "| student | 3.14 | 120.00 | – |\n"
        "| peer\\|R50 | 44.00 | – | x |\n"
    )
    assert (
        complexity_table(rows, columns=["FPS", "Model"], float_format=".1f").splitlines()[2]
        == "| 120.0 | student |"
    )
    with pytest.raises(ValueError, match="empty"):
        complexity_table([])


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_model_table_medians_ratios_and_gmac_per_second():
    """The report's table from hand-made per-process timings: median over processes, ratio to
    Mask2Former at equal size, GMACs / seconds."""
    bench = _load_bench()
    prepared = {
        "students": [{"label": "student A", "params": 2_000_000, "gmacs": {"64x64": 4.0}}],
        "peer": {"params": 44_000_000, "gmacs": {"64x64": 100.0}},
    }
    ms = [  # three processes; the student's rows and Mask2Former, ms per forward
        {
            "0|eager": 100.0,
            "0|torch.export": 90.0,
            "0|onnxruntime fp32": 50.0,
            "0|onnxruntime int8": 80.0,
            "peer|eager": 2000.0,
        },
        {
            "0|eager": 120.0,
            "0|torch.export": 80.0,
            "0|onnxruntime fp32": 40.0,
            "0|onnxruntime int8": 70.0,
            "peer|eager": 2400.0,
        },
        {
            "0|eager": 400.0,
            "0|torch.export": 85.0,
            "0|onnxruntime fp32": 45.0,
            "0|onnxruntime int8": 75.0,
            "peer|eager": 1800.0,
        },
    ]
    text = bench.table(prepared, [{"ms": {"64x64": m}} for m in ms], [(64, 64)])
    rows = {}
    for line in text.splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[(cells[0], cells[1])] = cells[2:]
    # params, GMACs, ms (median of 100/120/400), M2F / row (2000 / 120), GMAC/s (4 / 0.12 s)
    assert rows[("student A", "eager")] == ["2.00", "4.00", "120.00", "16.67", "33.33"]
    assert rows[("student A", "onnxruntime fp32")] == ["2.00", "4.00", "45.00", "44.44", "88.89"]
    assert rows[("Mask2Former R50 (transformers), eager", "eager")][2:4] == ["2000.00", "1.00"]
    assert len(rows) == 5


def test_bench_model_bad_size(capsys):
    bench = _load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--sizes", "100x64"])
    assert "--sizes: '100x64' must be positive multiples of 32" in capsys.readouterr().err
