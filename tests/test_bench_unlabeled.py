"""benchmarks/bench_unlabeled.py runs end to end on tiny settings (data, both caches, caching
times, interleaved training steps) and reports what it measured."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_unlabeled_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "bench_unlabeled", ROOT / "benchmarks/bench_unlabeled.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "unlabeled.md"
    args = ["--tiny", "--root", str(tmp_path), "--iters", "2", "--warmup", "0", "--images", "1"]
    assert bench.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    # 8 train images at labeled_fraction 0.25: 6 held out, + 4 synthetic unlabelled images
    assert result["cache"]["unlabeled"]["done"] == 10
    assert result["cache"]["unlabeled"]["bytes_per_done_image"] > 0
    assert result["caching"]["unlabelled_automatic_s_per_image"] > 0
    tr = result["training"]
    assert tr["mixed_batch"] == "2 labelled + 1 unlabelled" and tr["ratio_step"] > 0
    assert "| step s |" in out.read_text()
