"""benchmarks/bench_onnx.py: the side-by-side table by hand, a real run on two tiny ONNX files,
a clear error for a missing file, and the spinning check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_onnx  # noqa: E402


def _tiny(path: Path, op: str) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, "h", "w"])
    graph = helper.make_graph([helper.make_node(op, ["images"], ["out"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_table_by_hand():
    text = bench_onnx.table(["a.onnx", "b.onnx"], [[10.0, 20.0], [30.0, 10.0], [20.0, 15.0]])
    rows = text.splitlines()[2:]
    # medians over the three processes: a = 20, b = 15; ratio a / b = 1.33
    assert rows[0] == "| a.onnx | 10.00 / 30.00 / 20.00 | 20.00 | 1.00 |"
    assert rows[1] == "| b.onnx | 20.00 / 10.00 / 15.00 | 15.00 | 1.33 |"


def test_two_files_side_by_side(tmp_path, capsys):
    a, b = _tiny(tmp_path / "relu.onnx", "Relu"), _tiny(tmp_path / "sig.onnx", "Sigmoid")
    report = bench_onnx.main(
        [str(a), str(b), "--size", "256", "256", "--threads", "1", "--rounds", "2", "--iters", "3"]
    )
    rows = [r for r in report.splitlines() if r.startswith("| ") and ".onnx" in r]
    assert [r.split(" | ")[0] for r in rows] == [f"| {a}", f"| {b}"]
    cells = [r.strip("| ").split(" | ") for r in rows]
    assert all(len(c[1].split(" / ")) == 2 for c in cells)  # one median per process
    assert cells[0][3] == "1.00"
    assert float(cells[1][2]) > 0 and float(cells[1][3]) > 0  # (the ratio formula: by hand above)


def test_missing_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_onnx.main([str(tmp_path / "nope.onnx")])
    err = capsys.readouterr().err
    assert "no such ONNX file" in err and "nope.onnx" in err


def test_spinning_check_times_both_sessions_and_the_eager_forward_after_each():
    import check_ort_spinning

    result = check_ort_spinning.main(["--size", "64", "64", "--threads", "1", "--rounds", "2"])
    assert sorted(result) == sorted(
        [
            "onnxruntime, spinning 1",
            "onnxruntime, spinning 0",
            "eager right after it (spinning 1)",
            "eager right after it (spinning 0)",
        ]
    )
    assert all(v > 0 for v in result.values())
