"""Time the CPU demo end to end and check that it learns.

Runs `python main_dino.py` (the `demo` preset, or another preset / overrides given on the command line) in
this process and reports wall time, peak resident memory, the trained vs random-init kNN top-1 printed by
the run, and this machine's fp32 matmul rate measured just before and after (machines here differ by 2×,
so the rate says what kind of machine produced the numbers).

    python benchmarks/demo.py                      # the demo as users run it
    python benchmarks/demo.py --output results.json optim.epochs=10
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Median fp32 GFLOP/s of a size³ matmul on the CPU threads torch uses."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    parser.add_argument("overrides", nargs="*", help="extra main_dino.py arguments (flags or key=value)")
    args = parser.parse_args()

    from dino.distributed import DeviceContext
    from dino.train.cli import main as train_main

    rate_before = matmul_gflops()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_main([f"--output_dir={out}", *args.overrides])
        wall = time.perf_counter() - start
    rate_after = matmul_gflops()
    report = {
        "date": datetime.date.today().isoformat(),
        "cpu": DeviceContext.create("cpu").description(),
        "threads": torch.get_num_threads(),
        "matmul_fp32_gflops_before_after": [round(rate_before, 1), round(rate_after, 1)],
        "wall_time_s": round(wall, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steps": result.global_step,
        "knn": result.knn,
        "overrides": args.overrides,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
