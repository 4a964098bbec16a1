"""Benchmark: ``python -m detrq quantize`` from scratch on the embedded default, against the 3-minute target.

Runs the command as a user would (a fresh process, an empty --out folder, so that no sensitivity, bit map or
evaluation is cached; the synthetic data already generated) with the default recipe at 4 average bits, then reads
the report's time of each step. Prints the wall time, the step times, the ratio to the target (180 s) and the
machine's load (load average over the run, cores, CPU model): on a shared machine the load decides much of it.
``--threads`` sets the command's torch threads (its default is 1: on a busy 2-core machine 2 threads ran 3x
slower).
Never asserts.

Run: .venv/bin/python benchmarks/quantize_time.py [--threads 1] [--avg-bits 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import cpu_model

TARGET_S = 180.0


def run_once(threads: int | None, avg_bits: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        cmd = [sys.executable, "-m", "detrq", "quantize", "--out", str(out), "--avg-bits", str(avg_bits), "--quiet",
               *(["--threads", str(threads)] if threads else [])]
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
        if proc.returncode != 0:
            raise SystemExit(f"quantize failed:\n{proc.stderr}")
        report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "report": report, "load": (load_before[0], load_after[0]), "stdout": proc.stdout.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, help="torch threads for the run (default: the command's, 1)")
    p.add_argument("--avg-bits", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"machine: {cpu_model()}, {cores} cores; threads {args.threads or 'the command default (1)'}")
    for i in range(args.repeat):
        r = run_once(args.threads, args.avg_bits)
        rep = r["report"]
        steps = "  ".join(f"{k} {v:.1f}" for k, v in rep["seconds"].items() if k != "total")
        print(f"run {i + 1}: wall {r['wall']:.1f} s (in-process total {rep['seconds']['total']:.1f} s; "
              f"{r['wall'] / TARGET_S:.2f}x the {TARGET_S:.0f} s target); 1-min load average "
              f"{r['load'][0]:.2f} before, {r['load'][1]:.2f} after")
        print(f"  steps (s): {steps}")
        print(f"  {r['stdout']}")


if __name__ == "__main__":
    main()
