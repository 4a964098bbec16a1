"""Running the notebooks with papermill, cleaning what papermill adds, and the summaries they print.

``run_notebooks`` executes ``notebooks/01_hessian_traces`` ... ``05_sensitivity_check`` and ``07_pareto`` (or the
INT8 notebook 06)
in order with one parameter set (a YAML file from ``params/`` plus overrides), writes the executed copies (by
default over the committed ones) and strips papermill's timestamps, execution metadata and random cell id, so
that a rerun changes only what the results change. The ``*_summary`` functions are the short, rounded text each
notebook's last cell prints for nbval.
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

from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT, resolve_path
from detrq.io.results import atomic_output
from detrq.quant.bitmaps import OTHER_REGION, REGIONS, layer_region
from detrq.sensitivity import FIRST_ORDER, rel_stderr

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS: tuple[str, ...] = ("01_hessian_traces", "02_bit_allocation", "03_table1", "04_figures",
                              "05_sensitivity_check", "07_pareto")
INT8_NOTEBOOK = "06_int8_faster_rcnn"  # run on its own (params/int8.yaml): a different model and a longer run
ALL_NOTEBOOKS: tuple[str, ...] = (*NOTEBOOKS, INT8_NOTEBOOK)
# papermill gives the cell it injects a new random id on every run; a fixed one keeps reruns byte-identical.
INJECTED_ID = "injected-parameters"
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
    """Drop papermill's run metadata (timestamps, durations, status) and the stderr streams, and give the
    injected parameters cell a fixed id, in place; cell tags, the other ids and the other outputs stay.

    stderr holds library warnings and progress bars: they carry timestamps, process ids and the paths of the
    machine that ran the notebook, and no result.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in ("papermill", "execution", "ExecuteTime"):
            cell.metadata.pop(key, None)
        if INJECTED_ID in cell.metadata.get("tags", []):
            cell.id = INJECTED_ID
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
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

def _trace_line(name: str, tr: dict[str, Any]) -> str:
    if tr["metric"] == FIRST_ORDER:
        kl = [v["kl"] for v in tr["layers"].values()]
        jac = [v["jacobian"] for v in tr["layers"].values()]
        rel = statistics.median(j["stderr"] / j["sum"] for j in jac if j["sum"] > 0)
        return (f"{name:16s}: KL traces ({tr['estimator']}) median rel stderr "
                f"{statistics.median(rel_stderr(e) for e in kl if e['trace']):.3f}, Jacobian row-norm sums "
                f"({jac[0]['estimator']}, {jac[0]['n_probes']} probes) median rel stderr {rel:.3f}")
    est = list(tr["layers"].values())
    positive = [e["avg_trace"] for e in est if e["avg_trace"] > 0]
    median_log = f"{statistics.median(math.log10(a) for a in positive):.1f}" if positive else "n/a"
    worst = max(rel_stderr(e) for e in est)
    median_rel = statistics.median(rel_stderr(e) for e in est)
    return (f"{name:16s}: {tr['estimator']}, median log10 avg trace {median_log}, {len(est) - len(positive)} of "
            f"{len(est)} <= 0, probes {max(e['n_probes'] for e in est)}, rel stderr median {median_rel:.2f} "
            f"worst {worst:.2f}")


def traces_summary(traces: dict[str, dict[str, Any]], stability: dict[str, Any], curvature: dict[str, Any]) -> str:
    """Notebook 01: per scheme the estimator, typical log10 trace, non-positive estimates and noise; the checks."""
    first = next(iter(traces.values()))
    lines = [f"Hessian images: {len(first['image_ids'])} from {first['split']}, layers: {len(first['layers'])}"]
    lines += [_trace_line(name, tr) for name, tr in traces.items()]
    lines.append(f"stability: {stability['num_sets']} sets of {stability['set_size']}, mean loss "
                 f"{stability['mean']:.3g}, var/mean {stability['var_over_mean']:.2g} (< {stability['threshold']:g}: "
                 f"{stability['holds']}), std/mean {stability['std_over_mean']:.2g}")
    for point, terms in curvature["points"].items():
        lines.append(f"Eq.(5) curvature at {point} weights: total trace L1 {terms['l1']['trace']:.2g}, "
                     f"KL {terms['kl']['trace']:.2g}; layers without any: {len(terms['eq5']['zero_layers'])}")
    return "\n".join(lines)


def _layer_value(entry: dict[str, Any], first_order: bool) -> tuple[float, float]:
    """A layer's estimate and stderr as the traces table shows them (first-order: the Jacobian row-norm sum)."""
    if first_order:
        return entry["jacobian"]["sum"], entry["jacobian"]["stderr"]
    return entry["avg_trace"], entry["stderr"] / entry["numel"]


def traces_markdown(traces: dict[str, dict[str, Any]], replicas: list[dict[str, dict[str, Any]]] = ()) -> str:
    """Notebook 01: per layer and scheme, the estimate ± stderr (Tr/|W|; for the first-order metric the KL
    Tr/|W| and the Jacobian row-norm sum S_l), and the largest |difference| of another probe seed's estimate in
    units of the combined stderr (z)."""
    names = list(traces)
    head = ["layer"]
    for n in names:
        head += ([f"{n} KL Tr/|W|", f"{n} S_l"] if traces[n]["metric"] == FIRST_ORDER else [f"{n} Tr/|W|"]) + ["z"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for layer in next(iter(traces.values()))["layers"]:
        cells = [f"`{layer}`"]
        for n in names:
            tr = traces[n]
            first_order = tr["metric"] == FIRST_ORDER
            entry = tr["layers"][layer]
            if first_order:
                kl = entry["kl"]
                cells.append(f"{kl['avg_trace']:.3g} ± {kl['stderr'] / kl['numel']:.2g}")
            value, err = _layer_value(entry, first_order)
            cells.append(f"{value:.3g} ± {err:.2g}")
            zs = []
            for rep in replicas:
                other, other_err = _layer_value(rep[n]["layers"][layer], first_order)
                combined = math.hypot(err, other_err)
                zs.append(abs(other - value) / combined if combined else 0.0)
            cells.append(f"{max(zs):.1f}" if zs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_stability_summary(check: dict[str, Any]) -> str:
    """Notebooks 01/02: per scheme and budget, the worst pairwise bit-map agreement and the objective spread."""
    lines = [f"bit maps of {check['seeds']} probe seeds (stable: agreement >= {check['min_agreement_required']:.0%} "
             f"of weights and objectives within {check['max_objective_spread']:.0%}):"]
    for scheme, by_target in check["schemes"].items():
        cells = ", ".join(f"{t} bits {v['min_agreement']:.0%} / {v['objective_spread']:.1%}"
                          for t, v in by_target.items())
        lines.append(f"{scheme:16s}: {'stable' if check['stable'][scheme] else 'NOT stable'} ({cells})")
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
            lines.append(f"{metric:16s} target {target:g} ({lo}-{hi}): avg {a['avg_bits']:.2f} bits, layers at "
                         f"{lo}..{hi}: {counts}; mean bits per layer: {regions}")
    return "\n".join(lines)


def table1_summary(table: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    """Notebook 03: every row's AP (1 decimal) beside the paper's, and how many claims hold."""
    lines = []
    for r in table["rows"]:
        paper = f"(paper {r['paper_AP']:.1f})" if r["paper_AP"] is not None else "(beyond the paper)"
        ci = r.get("delta_ci")
        delta = "" if r["delta_vs_uniform"] is None else f" delta {r['delta_vs_uniform']:+.1f}" + (
            f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
        lines.append(f"{r['precision']:>5s} {r['scheme']:16s} AP {r['AP']:5.1f} {paper} bits {r['avg_bits']:.2f}"
                     f"{delta}")
    verdicts = [c["verdict"] for c in claims]
    lines.append("claims: " + ", ".join(f"{v} {verdicts.count(v)}" for v in ("holds", "does not hold", "inconclusive"))
                 + f" (of {len(claims)})")
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


def sensitivity_summary(check: dict[str, Any]) -> str:
    """Notebook 05: the measured Eq. (5) split, rho at 4 bits per default scheme, the policy choice, targets."""
    d = check["decomposition"]
    lines = [f"measured Eq.(5) rise, one layer at {d['bits']} bits: L1 share median {d['median_l1_share']:.3f}, "
             f"min {d['min_l1_share']:.3f}"]
    for r in check["rho_default"]:
        lines.append(f"rho vs measured rise at 4 bits {r['scheme']:32s} {r['rho']:+.2f} [{r['low']:+.2f}, "
                     f"{r['high']:+.2f}]")
    choice = check["policy_choice"]
    means = ", ".join(f"{p} {v:.2f}" for p, v in choice["mean_pooled_rho"].items())
    lines.append(f"negative_traces: best by agreement {choice['best']} (mean pooled rho {means}); default "
                 f"{check['negative_traces']}")
    for t in check["targets"]:
        lines.append(f"target {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['value']}")
    return "\n".join(lines)


def pareto_summary(table: dict[str, Any]) -> str:
    """Notebook 07: Table 2's AP per quantizer and scheme (1 decimal) and whether the 4-bit moonshot holds."""
    lines = [f"float AP {100 * table['float']['AP']:.1f}, {table['float']['size_mb']:.2f} MB"]
    for r in table["rows"]:
        delta = "" if r["delta_uniform"] is None else f" delta {100 * r['delta_uniform']:+.1f}"
        lines.append(f"{r['precision']:>5s} {r['quantizer']:11s} {r['source']:20s} AP {100 * r['AP']:5.1f} "
                     f"bits {r['avg_bits']:.2f} {r['size_mb']:.3f} MB{delta}")
    shot = table["moonshot"]
    if shot["best"] is not None:
        best = shot["best"]
        lines.append(f"moonshot (4 bits within 1 AP of float): {'holds' if shot['holds'] else 'does not hold'}; "
                     f"best {best['quantizer']} {best['source']} {shot['gap_points']:.1f} points below float")
    return "\n".join(lines)
