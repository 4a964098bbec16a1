"""Running the four notebooks with papermill, cleaning what papermill adds, and the summaries they print.

``run_notebooks`` executes ``notebooks/01_hessian_traces`` ... ``04_figures`` in order with one parameter set
(a YAML file from ``params/`` plus overrides), writes the executed copies (by default over the committed
ones) and strips papermill's timestamps and execution metadata so that a rerun changes only what the results
change. The ``*_summary`` functions are the short, rounded text each notebook's last cell prints for nbval.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from detrq.errors import DetrqError
from detrq.paths import PROJECT_ROOT
from detrq.pipeline import resolve_path
from detrq.plots import OTHER_REGION, REGIONS, layer_region
from detrq.results import atomic_output

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS: tuple[str, ...] = ("01_hessian_traces", "02_bit_allocation", "03_table1", "04_figures")
# Parameters that name input files: they must be given (full.yaml leaves them null) and exist.
REQUIRED_PATHS: tuple[str, ...] = ("checkpoint", "coco_root")


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value typed as YAML types it (``5``, ``null``, ``cuda``).

    Paths (``REQUIRED_PATHS`` and ``*_dir``) stay the raw text: YAML would read ``#`` as a comment.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise DetrqError(f"parameter override {text!r} is not of the form KEY=VALUE")
    if key in REQUIRED_PATHS or key.endswith("_dir"):
        return key, value
    return key, yaml.safe_load(value) if value.strip() else None


def declared_parameters(names: tuple[str, ...] = NOTEBOOKS, notebook_dir: Path = NOTEBOOK_DIR) -> dict[str, set]:
    """``{notebook: names in its parameters cell}``, read with papermill."""
    import papermill

    return {n: set(papermill.inspect_notebook(str(notebook_dir / f"{n}.ipynb"))) for n in names}


def load_parameters(params_file: str | Path, overrides: dict[str, Any] | None = None,
                    names: tuple[str, ...] = NOTEBOOKS, notebook_dir: Path = NOTEBOOK_DIR) -> dict[str, Any]:
    """The parameter set of a run: ``params_file`` (YAML mapping) updated by ``overrides``, checked.

    Every key must be a parameter of at least one notebook, and the input paths (``REQUIRED_PATHS``) must be
    set and exist (relative paths are relative to the repository root).
    """
    path = resolve_path(params_file)
    if not path.is_file():
        raise DetrqError(f"parameter file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DetrqError(f"cannot parse {path} as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise DetrqError(f"{path} must be a YAML mapping of notebook parameters")
    params = {**params, **(overrides or {})}
    known = set().union(*declared_parameters(names, notebook_dir).values())
    unknown = sorted(set(params) - known)
    if unknown:
        raise DetrqError(f"{unknown[0]!r} is not a parameter of any notebook (known: {', '.join(sorted(known))})")
    for key in REQUIRED_PATHS:
        if params.get(key) is None:
            raise DetrqError(f"parameter {key!r} is not set in {path.name}; pass it (e.g. --set {key}=PATH)")
        if not resolve_path(params[key]).exists():
            raise DetrqError(f"{key} not found: {resolve_path(params[key])}")
    return params


def clean_notebook(path: str | Path) -> None:
    """Drop papermill's run metadata (timestamps, durations, status) in place; cell tags and outputs stay."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in ("papermill", "execution", "ExecuteTime"):
            cell.metadata.pop(key, None)
    with atomic_output(path) as tmp:
        nbformat.write(nb, str(tmp))


def run_notebooks(params: dict[str, Any], out_dir: str | Path = NOTEBOOK_DIR, *, names: tuple[str, ...] = NOTEBOOKS,
                  notebook_dir: Path = NOTEBOOK_DIR, log: Callable[[str], None] = print) -> dict[str, float]:
    """Execute ``names`` in order with ``params`` (each gets the parameters it declares); seconds per notebook.

    The executed copy replaces ``out_dir/<name>.ipynb`` only when the notebook ran through; a failing one is
    left in ``out_dir/.failed/`` (hidden, so that nbval does not collect it) and raises ``DetrqError`` naming
    it. The kernel starts in the repository root; the notebooks resolve relative paths against it anyway.
    """
    import papermill

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    declared = declared_parameters(names, notebook_dir)
    seconds = {}
    for name in names:
        failed = out_dir / ".failed" / f"{name}.ipynb"
        failed.parent.mkdir(exist_ok=True)
        start = time.perf_counter()
        log(f"== notebook {name}")
        try:
            papermill.execute_notebook(str(notebook_dir / f"{name}.ipynb"), str(failed),
                                       parameters={k: v for k, v in params.items() if k in declared[name]},
                                       cwd=str(PROJECT_ROOT), progress_bar=False, kernel_name="python3")
        except papermill.PapermillExecutionError as e:
            raise DetrqError(f"notebook {name} failed at cell {e.exec_count}: {e.ename}: {e.evalue} "
                             f"(executed copy: {failed})") from None
        clean_notebook(failed)
        os.replace(failed, out_dir / f"{name}.ipynb")
        seconds[name] = time.perf_counter() - start
        log(f"   ({name}: {seconds[name]:.0f} s)")
    with contextlib.suppress(OSError):  # removed only when empty: failed copies of earlier runs stay
        (out_dir / ".failed").rmdir()
    return seconds


# --- What the notebooks print last (nbval compares these): short and rounded -----------------------------------

def traces_summary(traces: dict[str, dict[str, Any]], stability: dict[str, Any], curvature: dict[str, Any]) -> str:
    """Notebook 01: per metric the typical log10 trace, non-positive estimates, probes and noise; the checks."""
    first = next(iter(traces.values()))
    lines = [f"Hessian images: {len(first['image_ids'])} from {first['split']}, layers: {len(first['layers'])}"]
    for metric, tr in traces.items():
        est = list(tr["layers"].values())
        positive = [e["avg_trace"] for e in est if e["avg_trace"] > 0]
        median_log = f"{statistics.median(math.log10(a) for a in positive):.1f}" if positive else "n/a"
        worst = max(e["stderr"] / abs(e["trace"]) if e["trace"] else float("inf") for e in est)
        lines.append(f"{metric:9s}: median log10 avg trace {median_log}, {len(est) - len(positive)} of {len(est)} "
                     f"<= 0, probes {max(e['n_probes'] for e in est)}, worst rel stderr {worst:.2f}")
    lines.append(f"stability: {stability['num_sets']} sets of {stability['set_size']}, mean loss "
                 f"{stability['mean']:.3g}, var/mean {stability['var_over_mean']:.2g} (< {stability['threshold']:g}: "
                 f"{stability['holds']}), std/mean {stability['std_over_mean']:.2g}")
    for point, terms in curvature["points"].items():
        lines.append(f"Eq.(5) curvature at {point} weights: total trace L1 {terms['l1']['trace']:.2g}, "
                     f"KL {terms['kl']['trace']:.2g}; layers without any: {len(terms['eq5']['zero_layers'])}")
    return "\n".join(lines)


def region_mean_bits(bit_map: dict[str, int], numel: dict[str, int] | None = None) -> dict[str, float]:
    """Average bits per model region (element-weighted when ``numel`` is given), regions in a fixed order."""
    regions = [r for r, _ in REGIONS] + [OTHER_REGION]
    out = {}
    for region in regions:
        names = [n for n in bit_map if layer_region(n) == region]
        if names:
            weights = [numel[n] if numel else 1 for n in names]
            out[region] = sum(bit_map[n] * w for n, w in zip(names, weights)) / sum(weights)
    return out


def allocation_summary(allocations: dict[str, dict[float, dict[str, Any]]]) -> str:
    """Notebook 02: per metric and target, the achieved average and how many layers got each bit width."""
    lines = []
    for metric, by_target in allocations.items():
        for target, a in by_target.items():
            lo, hi = a["bits_range"]
            counts = "/".join(str(sum(b == k for b in a["bit_map"].values())) for k in range(lo, hi + 1))
            regions = ", ".join(f"{r} {v:.1f}" for r, v in region_mean_bits(a["bit_map"]).items())
            lines.append(f"{metric:9s} target {target:g} ({lo}-{hi}): avg {a['avg_bits']:.2f} bits, layers at "
                         f"{lo}..{hi}: {counts}; mean bits per layer: {regions}")
    return "\n".join(lines)


def table1_summary(table: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    """Notebook 03: every row's AP (1 decimal) beside the paper's, and how many claims hold."""
    lines = [f"{r['precision']:>5s} {r['scheme']:9s} AP {r['AP']:5.1f} (paper {r['paper_AP']:.1f}) "
             f"bits {r['avg_bits']:.2f}" for r in table["rows"]]
    lines.append(f"claims holding: {sum(c['holds'] for c in claims)} of {len(claims)}")
    return "\n".join(lines)


def figures_summary(fig1: dict[str, Any], fig2: dict[str, Any], files: list[Path]) -> str:
    """Notebook 04: the files written and the data behind them, in a few rounded numbers."""
    spans = ", ".join(f"{r} {a}-{b}" for r, a, b in fig1["spans"])
    lines = [f"files: {', '.join(sorted(p.name for p in files))}", f"layers: {len(fig1['layers'])} ({spans})"]
    for m, d in fig1["metrics"].items():
        lines.append(f"fig1 {m:9s}: {len(d['nonpositive'])} non-positive trace estimates")
    for m, bits in fig2["bits"].items():
        lines.append(f"fig2 {m:9s}: average {fig2['avg_bits'][m]:.2f} bits (target {fig2['target']:g}), "
                     f"{min(bits)}-{max(bits)} bits per layer")
    return "\n".join(lines)
