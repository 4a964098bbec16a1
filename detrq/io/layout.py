"""Where each file of a results directory lives: grouped by kind, with only the run-level files at the top.

``results/`` and every ``runs/<run>/results/`` share this layout::

    traces/       per-layer sensitivities (traces_*.json) and the checks of the Hessian images beside them
                  (stability.json, curvature_check.json)
    bitmaps/      ILP bit maps (bitmap_*.json) and their agreement across probe seeds (seed_stability.json)
    evaluations/  COCO evaluations (eval_*.json, their eval_*.detections.npz) and the uniform curve (quant_curve.json)
    measured/     measured per-layer costs (measured_*.json)
    tables/       Table 1 and Table 2 (.json, .csv, .md), Table 1's bootstrap, the claims, the sensitivity check
    int8/         INT8 runs (int8_*.json)
    pareto/       the Pareto sweep (pareto.json) with its own bit maps and evaluations
    reproduction_accepted.json, runtime_*.json    the run-level files

A file's kind follows from its name alone, so a results file is found the same way wherever it was written, and
no cache key holds a folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from detrq.io.errors import DetrqError

# kind folder -> the file names it holds: an entry ending in "_" or a digit is a prefix, any other a whole name
KINDS: dict[str, tuple[str, ...]] = {
    "traces": ("traces_", "stability.json", "curvature_check.json"),
    "bitmaps": ("bitmap_", "seed_stability.json"),
    "evaluations": ("eval_", "quant_curve.json"),
    "measured": ("measured_",),
    "tables": ("table1", "table2", "claims.json", "sensitivity_check.json"),
    "int8": ("int8_",),
    "pareto": ("pareto.json",),
}
RUN_LEVEL: tuple[str, ...] = ("reproduction", "runtime")  # prefixes of the files that stay at the top


def _matches(name: str, entry: str) -> bool:
    return name.startswith(entry) if entry[-1] in "_0123456789" else name == entry


def kind_of(name: str) -> str | None:
    """The kind folder of a results file name, or None for a run-level file; an unknown name is an error, so
    that no new file lands at the top by accident."""
    if name.startswith(RUN_LEVEL):
        return None
    for kind, entries in KINDS.items():
        if any(_matches(name, e) for e in entries):
            return kind
    raise DetrqError(f"{name!r} has no place in the results layout (detrq/io/layout.py): add its kind there")


def results_name(name: str) -> str:
    """``name``'s path inside a results directory: ``kind/name``, or ``name`` for a run-level file."""
    kind = kind_of(name)
    return name if kind is None else f"{kind}/{name}"


def results_file(results_dir: str | os.PathLike, name: str) -> Path:
    """Where the file ``name`` lives in ``results_dir`` (see the module docstring)."""
    return Path(results_dir) / results_name(name)


def kind_dir(results_dir: str | os.PathLike, kind: str) -> Path:
    """The folder of one kind in ``results_dir``."""
    if kind not in KINDS:
        raise DetrqError(f"unknown results kind {kind!r}; the kinds are {', '.join(KINDS)}")
    return Path(results_dir) / kind


def fill_missing(folder: str | os.PathLike, source: str | os.PathLike) -> list[Path]:
    """Copy into ``folder`` each entry of the results directory ``source`` that ``folder`` lacks, hidden entries and
    the run-level files (``RUN_LEVEL``: reports, runtimes) excepted; returns the entries of ``source`` copied.

    Nothing in ``folder`` is overwritten and ``source`` is only read. Each entry is copied under a temporary name
    and renamed, so an interrupted fill leaves no half-copied entry and the next fill completes it."""
    folder, source = Path(folder), Path(source)
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted(source.iterdir()) if source.is_dir() else []:
        dest = folder / src.name
        if src.name.startswith(".") or src.name.startswith(RUN_LEVEL) or dest.exists():
            continue
        tmp = folder / f".{src.name}.filling"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
        copied.append(src)
    return copied

