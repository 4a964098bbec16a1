"""Benchmark: the embedded default's run of one profile FROM SCRATCH, seconds per notebook and in all.

Runs each step of the profile (``--profile paper``, the default: notebooks 01-04; ``--profile complete``: 01-05
and 07, with 05 and 07 together) of ``params/default.yaml`` as ``reproduce.sh`` does, one fresh process per step:

    .venv/bin/python -m detrq notebooks --params params/default.yaml --profile P --set results_dir=TMP/results
        --set figures_dir=TMP/figures --out-dir TMP/notebooks --only NOTEBOOK... [--together]

into a new temporary directory TMP (absolute paths are taken as they are: ``io.paths.resolve_path``), so that
nothing is cached: no trace, bit map, measured cost or evaluation, and neither ``results/`` nor ``runs/`` is read
or written. Each step is timed with ``time.perf_counter`` around the child process, whose output (the per-cell
progress of the notebooks) streams to the console. Then it prints a Markdown table ``| step | seconds |`` with the
total, the ratio to issue 24's target (at most 5 min for the paper profile, at most 20 min for complete, on 2 idle
cores), the CPU model and core count, and the load average before and after the run: on a busy machine the
times say more about the other jobs than about the run.

The synthetic data (``data/synthetic``) must exist: ``.venv/bin/python -m detrq make-data`` writes it (the
embedded default's 8000 train and 500 val images, seed 0; ``./reproduce.sh`` makes it too). The uniform
quantization curve that ``./reproduce.sh`` adds to the complete profile (about 10 s) is not timed here.

This is a timing benchmark, not a timed test: it never asserts on the times, and it takes minutes. It exits
non-zero if a notebook fails (the temporary directory is then kept, with the failed notebook in
``TMP/notebooks/.failed/``).

Run: .venv/bin/python benchmarks/reproduce_time.py [--profile paper|complete] [--keep]
     (``--only NOTEBOOK ...`` times some of the profile's notebooks only, for debugging: a later notebook needs the
     earlier ones' results; ``--dry-run`` prints the commands and runs nothing)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = "params/default.yaml"
DATA = ROOT / "data" / "synthetic"
CHECKPOINT = ROOT / "checkpoints" / "detr_mini.pth"
TARGET_S = {"paper": 5 * 60.0, "complete": 20 * 60.0}  # issue 24, on 2 idle cores


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def step_command(profile: str, step: Sequence[str], tmp: Path) -> list[str]:
    """The command that runs one step of ``profile`` (a notebook, or notebooks that run together) into ``tmp``, as
    ``reproduce.sh``'s ``notebook_steps``."""
    return [python(), "-m", "detrq", "notebooks", "--params", PARAMS, "--profile", profile,
            "--set", f"results_dir={tmp / 'results'}", "--set", f"figures_dir={tmp / 'figures'}",
            "--out-dir", str(tmp / "notebooks"), "--only", *step, *(["--together"] if len(step) > 1 else [])]


def run_step(command: Sequence[str]) -> float:
    """Run ``command`` from the repository root, its output streaming to the console; its wall seconds. Raises
    ``SystemExit`` if it fails."""
    sys.stdout.flush()
    start = time.perf_counter()
    proc = subprocess.run(list(command), cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}) after {seconds:.0f} s: {' '.join(command)}")
    return seconds


def timing_table(steps: Sequence[tuple[str, float]]) -> str:
    """``| step | seconds |`` in Markdown, one row per step and a total row."""
    lines = ["| step | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in steps]
    lines.append(f"| total | {sum(s for _, s in steps):.1f} |")
    return "\n".join(lines)


def target_line(profile: str, total: float) -> str:
    target = TARGET_S[profile]
    verdict = "within" if total <= target else "over"
    return (f"profile {profile}: {total:.0f} s, {total / target:.2f}x the target of {target / 60:.0f} min on 2 idle "
            f"cores (issue 24): {verdict} it")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_line(before: Sequence[float], after: Sequence[float]) -> str:
    fmt = lambda load: "/".join(f"{x:.2f}" for x in load)  # noqa: E731
    return (f"load average (1/5/15 min): before {fmt(before)}, after {fmt(after)} on {cores()} cores "
            "(an idle machine stays near 0; a load at or above the core count means the times are inflated)")


def check_inputs() -> None:
    missing = [p for p in (DATA / "annotations" / "instances_train.json", DATA / "annotations" / "instances_val.json")
               if not p.is_file()]
    if missing:
        raise SystemExit(f"the synthetic data is missing ({missing[0]}): make it with "
                         f"{python()} -m detrq make-data (writes {DATA})")
    if not CHECKPOINT.is_file():
        raise SystemExit(f"the embedded checkpoint is missing: {CHECKPOINT}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(TARGET_S), default="paper",
                        help="the profile of params/default.yaml to run (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK",
                        help="debugging: time only these of the profile's notebooks (a later one needs the earlier "
                        "ones' results)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    from detrq.artifact.notebooks import profile_steps, step_name
    from detrq.io.results import cpu_model

    steps_of_profile = [tuple(s) for s in profile_steps(ROOT / PARAMS, args.profile)]
    notebooks = [n for s in steps_of_profile for n in s]
    if args.only:
        unknown = [n for n in args.only if n not in notebooks]
        if unknown:
            parser.error(f"{unknown[0]!r} is not a notebook of profile {args.profile} ({', '.join(notebooks)})")
        steps_of_profile = [tuple(n for n in s if n in args.only) for s in steps_of_profile]
        steps_of_profile = [s for s in steps_of_profile if s]
        notebooks = [n for s in steps_of_profile for n in s]
    machine = f"machine: {cpu_model()}, {cores()} cores"
    if args.dry_run:
        print(machine)
        tmp = Path(tempfile.gettempdir()) / "detrq-reproduce-XXXX"
        for step in steps_of_profile:
            print(" ".join(step_command(args.profile, step, tmp)))
        return
    check_inputs()
    tmp = Path(tempfile.mkdtemp(prefix="detrq-reproduce-"))
    print(f"{machine}; profile {args.profile} of {PARAMS} from scratch in {tmp}: {', '.join(notebooks)}")
    load_before = os.getloadavg()
    steps: list[tuple[str, float]] = []
    ok = False
    try:
        for step in steps_of_profile:
            steps.append((step_name(step), run_step(step_command(args.profile, step, tmp))))
        ok = True
    finally:
        load_after = os.getloadavg()
        if steps:
            print()
            print(timing_table(steps))
            print()
            if ok and not args.only:
                print(target_line(args.profile, sum(s for _, s in steps)))
            print(machine)
            print(load_line(load_before, load_after))
        if args.keep or not ok:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
