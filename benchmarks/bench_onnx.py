"""Side-by-side latency of exported ONNX files in onnxruntime (CPU).

For comparing exports of one model (before/after a graph rewrite, fp32 against INT8, one export
against another commit's): ``--rounds`` fresh processes each open every file, warm each up, then
alternate their runs round-robin, so a slow stretch of a shared machine hits all files alike; a
file's time is the median over processes of each process's median. onnxruntime's idle spinning is
off, so a session does not take the cores from the next one. The first file is the reference of
the ratio column.

Example (from the repository root)::

    python benchmarks/bench_onnx.py before.onnx after.onnx --size 640 640 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def ort_session(
    path: str, threads: int, *, spinning: bool = False, providers: list[str] | None = None
):
    """An onnxruntime session on ``threads`` intra-op threads (one inter-op). ``spinning``
    False: idle worker threads sleep instead of spinning, so they do not take the cores from
    whatever runs next (``check_ort_spinning.py`` measures the difference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


def measure(files: list[str], size: tuple[int, int], threads: int, warmup: int, iters: int):
    """Per file, the median ms of ``iters`` runs alternated round-robin in this process."""
    import numpy as np

    sessions = [ort_session(f, threads) for f in files]
    rng = np.random.default_rng(0)
    inputs = []
    for s in sessions:
        meta = s.get_inputs()[0]
        dtype = np.uint8 if "uint8" in meta.type else np.float32
        image = rng.integers(0, 256, (1, 3, *size)).astype(dtype)
        inputs.append({meta.name: image})
    times: list[list[float]] = [[] for _ in files]
    for it in range(warmup + iters):
        for j in range(len(files)):
            k = (it + j) % len(files)
            start = time.perf_counter()
            sessions[k].run(None, inputs[k])
            if it >= warmup:
                times[k].append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="ONNX files taking one [1, 3, H, W] input")
    p.add_argument("--size", nargs=2, type=int, default=[640, 640], metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        p.error(f"no such ONNX file: {', '.join(missing)}")
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--rounds, --iters and --threads must be >= 1, --warmup >= 0")
    return args


def table(files: list[str], per_process: list[list[float]]) -> str:
    """Markdown: file, ms per process, median over processes, ratio to the first file."""
    medians = [statistics.median(col) for col in zip(*per_process)]
    lines = [
        "| file | ms per process | median ms | first file / this |",
        "| :--- | :--- | ---: | ---: |",
    ]
    for i, f in enumerate(files):
        runs = " / ".join(f"{p[i]:.2f}" for p in per_process)
        lines.append(f"| {f} | {runs} | {medians[i]:.2f} | {medians[0] / medians[i]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    files = [str(f) for f in args.files]
    size = (args.size[0], args.size[1])
    if args.child:
        print(json.dumps(measure(files, size, args.threads, args.warmup, args.iters)))
        return ""
    per_process = []
    for r in range(args.rounds):
        cmd = [sys.executable, str(Path(__file__).resolve()), *files, "--child"]
        cmd += ["--size", str(size[0]), str(size[1]), "--threads", str(args.threads)]
        cmd += ["--warmup", str(args.warmup), "--iters", str(args.iters)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark process {r + 1} failed:\n{out.stderr[-2000:]}")
        per_process.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"[bench_onnx] process {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    report = (
        f"{args.rounds} fresh processes, {args.warmup} warm-up + {args.iters} timed runs per file "
        f"interleaved, {size[0]}x{size[1]}, {args.threads} threads, load average "
        f"{os.getloadavg()[0]:.2f}\n\n" + table(files, per_process)
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
