"""Does onnxruntime's idle spinning slow down what runs right after it?

One process, the default student exported to ONNX, two onnxruntime sessions (intra-op spinning
on, the onnxruntime default, and off). Each round runs, for each session, one onnxruntime
forward followed immediately by one eager forward of the same student, and times both. Prints
the medians: the eager forward after a spinning session against after a non-spinning one, and
each session's own time. This is why ``bench_model.py`` and ``bench_onnx.py`` turn spinning off.

Example (from the repository root)::

    python benchmarks/check_ort_spinning.py --size 640 640 --threads 2 --rounds 14
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build_student_from  # noqa: E402
from bench_onnx import ort_session  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/reg_sam/regnet_distill.yaml")
    p.add_argument("--size", nargs=2, type=int, default=[640, 640], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=14, help="timed rounds (2 more warm up)")
    args = p.parse_args(argv)
    from pipeline.deploy.export import export_onnx

    torch.set_num_threads(args.threads)
    student = build_student_from(args.config)
    size = (args.size[0], args.size[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(student, Path(tmp) / "student.onnx", size, dynamic=False)
        sessions = {
            spin: ort_session(str(path), args.threads, spinning=spin == "1") for spin in ("1", "0")
        }
    image = np.random.default_rng(0).integers(0, 256, (1, 3, *size)).astype(np.uint8)
    tensor = torch.from_numpy(image)
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for r in range(args.rounds + 2):
            for spin, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"images": image})
                mid = time.perf_counter()
                student.forward_pixels(tensor)
                end = time.perf_counter()
                if r >= 2:
                    times.setdefault(f"onnxruntime, spinning {spin}", []).append(mid - start)
                    times.setdefault(f"eager right after it (spinning {spin})", []).append(
                        end - mid
                    )
    result = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    for k, v in result.items():
        print(f"{k}: median {v:.1f} ms over {args.rounds} rounds")
    return result


if __name__ == "__main__":
    main()
