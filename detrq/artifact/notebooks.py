"""Running the notebooks with papermill, cleaning what papermill adds, and the summaries they print.

``run_notebooks`` executes ``notebooks/01_hessian_traces`` ... ``05_sensitivity_check`` and ``07_pareto`` (or the
INT8 notebook 06)
in order with one parameter set (a YAML file from ``params/`` plus overrides), writes the executed copies (by
default over the committed ones) and cleans them (``clean_notebook``): papermill's injected cell is folded into the
tagged parameters cell, so that the one parameters cell holds the values in effect and an edit of it is used;
timestamps, execution metadata and stderr are dropped, and the kernelspec is the one JupyterLab writes, so that a
rerun changes only what the results change and opening a notebook in JupyterLab does not modify it. The
``*_summary`` functions are the short, rounded text each notebook's last cell prints for nbval; the
``*_markdown`` ones the tables the notebooks show.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import statistics
import textwrap
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
from detrq.sensitivity.modelopt import MODELOPT

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS: tuple[str, ...] = ("01_hessian_traces", "02_bit_allocation", "03_table1", "04_figures",
                              "05_sensitivity_check", "07_pareto")
INT8_NOTEBOOK = "06_int8_faster_rcnn"  # run on its own (params/int8.yaml): a different model and a longer run
ALL_NOTEBOOKS: tuple[str, ...] = (*NOTEBOOKS, INT8_NOTEBOOK)
PARAMETERS_TAG = "parameters"  # the cell papermill and a reader edit
INJECTED_TAG = "injected-parameters"  # the cell papermill adds after it, folded into it by ``clean_notebook``
# What JupyterLab writes into a notebook when it starts the venv's "python3" kernel (ipykernel's own kernelspec):
# a committed notebook that carries anything else is modified the moment it is opened.
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# A parameter file's run profiles: ``profiles: {name: {notebooks: [...], key: value, ...}}`` overrides the values
# above them for ``--profile name``; ``profile`` names the file's default one.
PROFILES_KEY, PROFILE_KEY, NOTEBOOKS_KEY = "profiles", "profile", "notebooks"
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


def _read_params(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], str | None]:
    """A parameter file: ``(values, {profile: its overrides}, the file's default profile)``."""
    if not path.is_file():
        raise DetrqError(f"parameter file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DetrqError(f"cannot parse {path} as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise DetrqError(f"{path} must be a YAML mapping of notebook parameters")
    profiles = params.pop(PROFILES_KEY, None) or {}
    default = params.pop(PROFILE_KEY, None)
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise DetrqError(f"{path.name}: '{PROFILES_KEY}' must map each profile name to its overrides")
    return params, profiles, default


def profile_steps(params_file: str | Path, profile: str | None = None) -> tuple[tuple[str, ...], ...]:
    """The steps of ``profile`` (default: the file's own ``profile``), in order: each the notebooks that run
    together (``run_notebooks(together=True)``; a nested list in the profile's ``notebooks``), mostly one; one step
    per notebook of ``NOTEBOOKS`` for a file without profiles."""
    path = resolve_path(params_file)
    _, profiles, default = _read_params(path)
    name = profile or default
    if name is None:
        return tuple((n,) for n in NOTEBOOKS)
    if name not in profiles:
        raise DetrqError(f"{path.name} has no profile {name!r}; its profiles: {', '.join(profiles) or 'none'}")
    steps = tuple(tuple(e) if isinstance(e, list) else (e,) for e in profiles[name].get(NOTEBOOKS_KEY, NOTEBOOKS))
    unknown = [n for step in steps for n in step if n not in ALL_NOTEBOOKS]
    if unknown:
        raise DetrqError(f"profile {name!r} of {path.name} names an unknown notebook {unknown[0]!r}")
    return steps


def profile_notebooks(params_file: str | Path, profile: str | None = None) -> tuple[str, ...]:
    """The notebooks that ``profile`` runs, in order (``profile_steps`` flattened)."""
    return tuple(n for step in profile_steps(params_file, profile) for n in step)


def step_name(step: tuple[str, ...]) -> str:
    """The name of a run step (``profile_steps``) in reproduce.sh's output and the runtime files."""
    return f"notebook {step[0]}" if len(step) == 1 else f"notebooks {' + '.join(step)} (together)"


def load_parameters(params_file: str | Path, overrides: dict[str, Any] | None = None,
                    names: tuple[str, ...] = NOTEBOOKS, notebook_dir: Path = NOTEBOOK_DIR,
                    profile: str | None = None) -> dict[str, Any]:
    """The parameter set of a run: ``params_file`` (YAML mapping), then its ``profile``'s overrides (default: the
    profile the file names; see ``profile_notebooks`` for the notebooks a profile runs), then ``overrides``, checked.

    Every key must be a parameter of at least one notebook, and the input paths (``REQUIRED_PATHS``) must be
    set and exist (relative paths are relative to the repository root).
    """
    path = resolve_path(params_file)
    params, profiles, default = _read_params(path)
    name = profile or default
    if name is not None and name not in profiles:
        raise DetrqError(f"{path.name} has no profile {name!r}; its profiles: {', '.join(profiles) or 'none'}")
    chosen = {k: v for k, v in profiles.get(name, {}).items() if k != NOTEBOOKS_KEY} if name else {}
    params = {**params, **chosen, **(overrides or {})}
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


def _assignments(source: str) -> list[ast.Assign]:
    return [node for node in ast.parse(source).body
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)]


def fold_parameters(nb: Any) -> None:
    """Fold papermill's injected cell(s) into the tagged parameters cell, in place: each value the injected cell
    sets replaces the value in the parameters cell's assignment (the type and comment after it stay); a name
    the parameters cell lacks is appended; the injected cells are removed. Without a parameters cell the
    injected one becomes it."""
    injected = [c for c in nb.cells if INJECTED_TAG in c.metadata.get("tags", [])]
    if not injected:
        return
    params = next((c for c in nb.cells if PARAMETERS_TAG in c.metadata.get("tags", [])), None)
    if params is None:
        params = injected.pop(0)
        params.metadata["tags"] = [PARAMETERS_TAG]
        params.source = "\n".join(line for line in params.source.splitlines() if line != "# Parameters")
    values: dict[str, str] = {}
    for cell in injected:
        for node in _assignments(cell.source):
            values[node.targets[0].id] = ast.get_source_segment(cell.source, node.value)
    # Replace the value spans from the last to the first, in UTF-8 bytes (what ast's offsets count).
    text = params.source.encode()
    starts = [0]
    for line in params.source.encode().splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    present = set()
    for node in reversed(_assignments(params.source)):
        name = node.targets[0].id
        present.add(name)
        if name in values:
            v = node.value
            begin = starts[v.lineno - 1] + v.col_offset
            end = starts[v.end_lineno - 1] + v.end_col_offset
            text = text[:begin] + values[name].encode() + text[end:]
    source = text.decode()
    extra = [f"{name} = {value}" for name, value in values.items() if name not in present]
    params.source = "\n".join([source.rstrip("\n"), *extra]) if extra else source
    nb.cells = [c for c in nb.cells if not any(c is i for i in injected)]
    # Number the executed cells 1, 2, ... again, as a run of all cells in a fresh kernel does.
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            count += 1
            cell.execution_count = count
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = count


def clean_notebook(path: str | Path) -> None:
    """Fold papermill's injected parameters cell into the tagged one (``fold_parameters``), drop papermill's run
    metadata (timestamps, durations, status) and the stderr streams, and set the kernelspec JupyterLab writes
    (``KERNELSPEC``), in place; cell tags, ids and the other outputs stay.

    stderr holds library warnings and progress bars: they carry timestamps, process ids and the paths of the
    machine that ran the notebook, and no result.
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("papermill", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    fold_parameters(nb)
    for cell in nb.cells:
        for key in ("papermill", "execution", "ExecuteTime"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    with atomic_output(path) as tmp:
        nbformat.write(nb, str(tmp))


def ipc_kernel_manager(folder: Path) -> type:
    """A kernel manager class whose kernels listen on Unix sockets in ``folder``: a headless run needs no TCP
    port, and ipykernel then has no unencrypted TCP transport to warn about on the console. Elsewhere (Windows)
    the default manager."""
    from jupyter_client import KernelManager

    if os.name == "nt":
        return KernelManager

    class IpcKernelManager(KernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(transport="ipc", ip=str(folder / "kernel"), **kwargs)

    return IpcKernelManager


class KernelProgress:
    """The kernel's stderr as the console shows it during a headless run: its progress bars and warnings, less
    the kernel's own log lines ("[IPKernelApp] ..."), which report its shutdown and no work."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        kept = "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("[IPKernelApp]"))
        if kept:
            self.stream.write(kept)

    def flush(self) -> None:
        self.stream.flush()


def _cell_titles(path: Path) -> list[str]:
    """For each code cell, what it does as a reader sees it: the first line of the markdown cell before it."""
    import nbformat

    titles, last = [], ""
    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type == "markdown":
            last = next((ln.lstrip("# ").strip() for ln in cell.source.splitlines() if ln.strip()), "")
        elif cell.cell_type == "code":
            titles.append(last if len(last) <= 90 else last[:87] + "...")
    return titles


def run_notebooks(params: dict[str, Any], out_dir: str | Path = NOTEBOOK_DIR, *, names: tuple[str, ...] = NOTEBOOKS,
                  notebook_dir: Path = NOTEBOOK_DIR, log: Callable[[str], None] = print,
                  progress: bool = True, together: bool = False) -> dict[str, float]:
    """Execute ``names`` in order with ``params`` (each gets the parameters it declares); seconds per notebook.

    With ``together`` they run at the same time instead, each kernel on ``threads // len(names)`` torch threads
    (at least one), for notebooks that read each other's results only through files written before them and write
    different ones (notebooks 05 and 07): on two cores an evaluation of the small DETR runs as fast on one thread as
    on two, so two kernels do twice the work. With ``progress`` the console shows each code cell as it starts (its
    number and the heading above it) and the kernel's progress bars (its stderr) as they run. The executed copy
    replaces ``out_dir/<name>.ipynb`` only when the notebook ran through; a failing one is left in
    ``out_dir/.failed/`` (hidden, so that nbval does not collect it) and raises ``DetrqError`` naming it. The kernel
    starts in the repository root; the notebooks resolve relative paths against it anyway.
    """
    from concurrent.futures import ThreadPoolExecutor

    out_dir = Path(out_dir)
    (out_dir / ".failed").mkdir(parents=True, exist_ok=True)
    declared = declared_parameters(names, notebook_dir)
    if together and len(names) > 1:
        threads = max(1, int(params.get("threads", 1)) // len(names))
        shared = {**params, **({"threads": threads} if "threads" in params else {})}
        with ThreadPoolExecutor(len(names)) as pool:
            futures = {n: pool.submit(_run_notebook, n, shared, out_dir, notebook_dir, declared[n], log, progress)
                       for n in names}
        errors = [f.exception() for f in futures.values() if f.exception() is not None]
        if errors:
            raise errors[0]
        seconds = {n: f.result() for n, f in futures.items()}
    else:
        seconds = {n: _run_notebook(n, params, out_dir, notebook_dir, declared[n], log, progress) for n in names}
    with contextlib.suppress(OSError):  # removed only when empty: failed copies of earlier runs stay
        (out_dir / ".failed").rmdir()
    return seconds


def _run_notebook(name: str, params: dict[str, Any], out_dir: Path, notebook_dir: Path, declared: set[str],
                  log: Callable[[str], None], progress: bool) -> float:
    """One notebook of ``run_notebooks``: executed, cleaned and moved into place; its seconds."""
    import sys
    import tempfile

    import papermill

    failed = out_dir / ".failed" / f"{name}.ipynb"
    start = time.perf_counter()
    log(f"== notebook {name}")
    titles = _cell_titles(notebook_dir / f"{name}.ipynb")
    started: list[int] = []  # the code cells begun so far (papermill's injected one not counted)

    def announce(cell: Any, cell_index: int, **_: Any) -> None:
        if cell.cell_type != "code" or INJECTED_TAG in cell.metadata.get("tags", []):
            return
        started.append(cell_index)
        title = titles[len(started) - 1] if len(started) <= len(titles) else ""
        log(f"   [{name} cell {len(started)}/{len(titles)}, {time.perf_counter() - start:.0f} s] {title}")

    try:
        with tempfile.TemporaryDirectory(prefix="detrq-kernel-") as sockets:
            extra = {"on_cell_execute": announce, "stderr_file": KernelProgress(sys.stderr)} if progress else {}
            papermill.execute_notebook(str(notebook_dir / f"{name}.ipynb"), str(failed),
                                       parameters={k: v for k, v in params.items() if k in declared},
                                       cwd=str(PROJECT_ROOT), progress_bar=False, kernel_name="python3",
                                       kernel_manager_class=ipc_kernel_manager(Path(sockets)), **extra)
    except papermill.PapermillExecutionError as e:
        raise DetrqError(f"notebook {name} failed at cell {e.exec_count}: {e.ename}: {e.evalue} "
                         f"(executed copy: {failed})") from None
    clean_notebook(failed)
    os.replace(failed, out_dir / f"{name}.ipynb")
    seconds = time.perf_counter() - start
    log(f"   ({name}: {seconds:.0f} s)")
    return seconds


# --- What the notebooks print last (nbval compares these): short and rounded -----------------------------------

def _wrap(line: str, width: int = 100) -> str:
    """A long summary line broken at spaces into lines of at most ``width`` characters (JupyterLab wraps an
    output line anywhere, even inside a number), the continuations indented."""
    return textwrap.fill(line, width, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)


def _trace_line(name: str, tr: dict[str, Any]) -> str:
    if tr["metric"] == FIRST_ORDER:
        kl = [v["kl"] for v in tr["layers"].values()]
        jac = [v["jacobian"] for v in tr["layers"].values()]
        rel = statistics.median(j["stderr"] / j["sum"] for j in jac if j["sum"] > 0)
        return (f"{name:16s}: KL traces ({tr['estimator']}) median rel stderr "
                f"{statistics.median(rel_stderr(e) for e in kl if e['trace']):.3f}, Jacobian row-norm sums "
                f"({jac[0]['estimator']}, {jac[0]['n_probes']} probes) median rel stderr {rel:.3f}")
    est = [_shown_estimate(tr, e) for e in tr["layers"].values()]
    positive = [e["avg_trace"] for e in est if e["avg_trace"] > 0]
    median_log = f"{statistics.median(math.log10(a) for a in positive):.1f}" if positive else "n/a"
    worst = max(rel_stderr(e) for e in est)
    median_rel = statistics.median(rel_stderr(e) for e in est)
    what = f"ModelOpt score at {SHOWN_BITS} bits" if tr["metric"] == MODELOPT else "avg trace"
    return (f"{name:16s}: {tr['estimator']}, median log10 {what} {median_log}, {len(est) - len(positive)} of "
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


SHOWN_BITS = 4  # the width whose ModelOpt score the traces table and summary show (it holds one per width)


def _shown_estimate(tr: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A layer's estimate as the traces table shows it: ModelOpt's score at ``SHOWN_BITS``, else the entry."""
    return entry[str(SHOWN_BITS)] if tr["metric"] == MODELOPT else entry


def _layer_value(entry: dict[str, Any], first_order: bool) -> tuple[float, float]:
    """A layer's estimate and stderr as the traces table shows them (first-order: the Jacobian row-norm sum)."""
    if first_order:
        return entry["jacobian"]["sum"], entry["jacobian"]["stderr"]
    return entry["avg_trace"], entry["stderr"] / entry["numel"]


def traces_markdown(traces: dict[str, dict[str, Any]], replicas: list[dict[str, dict[str, Any]]] = ()) -> str:
    """Notebook 01: per layer and scheme, the estimate ± stderr (Tr/|W|; for the first-order metric the KL
    Tr/|W| and the Jacobian row-norm sum S_l), and the largest |difference| of another probe seed's estimate in
    units of the combined stderr (z). ModelOpt's score is shown at ``SHOWN_BITS`` bits."""
    names = list(traces)
    head = ["layer"]
    for n in names:  # a pipe inside a cell must be escaped, or the table does not render
        per_w = r"Tr/\|W\|"
        head += ([f"{n} KL {per_w}", f"{n} S_l"] if traces[n]["metric"] == FIRST_ORDER else [f"{n} {per_w}"]) + ["z"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for layer in next(iter(traces.values()))["layers"]:
        cells = [f"`{layer}`"]
        for n in names:
            tr = traces[n]
            first_order = tr["metric"] == FIRST_ORDER
            entry = _shown_estimate(tr, tr["layers"][layer])
            if first_order:
                kl = entry["kl"]
                cells.append(f"{kl['avg_trace']:.3g} ± {kl['stderr'] / kl['numel']:.2g}")
            value, err = _layer_value(entry, first_order)
            cells.append(f"{value:.3g} ± {err:.2g}")
            zs = []
            for rep in (r for r in replicas if n in r):
                other, other_err = _layer_value(_shown_estimate(tr, rep[n]["layers"][layer]), first_order)
                combined = math.hypot(err, other_err)
                zs.append(abs(other - value) / combined if combined else 0.0)
            cells.append(f"{max(zs):.1f}" if zs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stability_verdict(check: dict[str, Any], scheme: str) -> tuple[str, float, float]:
    """``(verdict, worst agreement, largest objective spread)`` of one scheme in the seed-agreement check.

    The bit maps decide (an estimate is trusted when the ILP's answer no longer moves with the probe seed):
    "stable" when they agree on the required share of the weights at every target and the ILP objectives lie
    within the spread; "bit maps stable" when they agree but the objectives spread more (the seeds' estimates
    differ in scale, not in the bits they lead to); "NOT stable" when the maps themselves differ.
    """
    by_target = check["schemes"][scheme].values()
    agreement = min(v["min_agreement"] for v in by_target)
    spread = max(v["objective_spread"] for v in by_target)
    if agreement < check["min_agreement_required"]:
        return "NOT stable", agreement, spread
    return ("stable" if spread <= check["max_objective_spread"] else "bit maps stable"), agreement, spread


def unchecked_note(check: dict[str, Any]) -> str:
    """Which schemes the seed-agreement check did not compare, and why; empty when it compared all."""
    unchecked = check.get("unchecked", [])
    if not unchecked:
        return ""
    if check["seeds"] < 2:
        return (f"one probe seed (stability_seeds 1): the agreement of {', '.join(unchecked)} across seeds was not "
                "checked")
    return f"deterministic, no probes, so no other seed to compare: {', '.join(unchecked)}"


def seed_stability_summary(check: dict[str, Any]) -> str:
    """Notebooks 01/02: per scheme the verdict, the worst bit-map agreement and the largest objective spread."""
    lines = []
    if check["schemes"]:
        lines.append(f"bit maps of {check['seeds']} probe seeds (stable: agreement >= "
                     f"{check['min_agreement_required']:.0%} of weights, objectives within "
                     f"{check['max_objective_spread']:.0%}):")
    for scheme in check["schemes"]:
        verdict, agreement, spread = stability_verdict(check, scheme)
        lines.append(f"{scheme:16s}: {verdict}, agreement {agreement:.0%}, objective spread {spread:.1%}")
    note = unchecked_note(check)
    return "\n".join([*lines, *([note] if note else [])])


def seed_stability_markdown(check: dict[str, Any]) -> str:
    """Notebook 02: the seed-agreement check as a table, and what each verdict means."""
    need, limit = check["min_agreement_required"], check["max_objective_spread"]
    lines = ["| scheme | verdict | worst agreement of the bit maps | largest spread of the ILP objectives |",
             "|---|---|---:|---:|"]
    for scheme in check["schemes"]:
        verdict, agreement, spread = stability_verdict(check, scheme)
        lines.append(f"| {scheme} | **{verdict}** | {agreement:.0%} | {spread:.1%} |")
    lines += ["", f"**stable**: at every target the {check['seeds']} seeds' bit maps give the same bits to at least "
              f"{need:.0%} of the weights, and their ILP objectives lie within {limit:.0%}. **bit maps stable**: the "
              f"maps agree, but the objectives spread more than {limit:.0%}: the seeds' estimates differ in scale, "
              f"not in the bits they lead to. **NOT stable**: at some target the maps differ on more than "
              f"{1 - need:.0%} of the weights: the ILP's answer moves with the probe seed."]
    note = unchecked_note(check)
    if not check["schemes"]:
        lines = []
    return "\n".join([*lines, *(["", f"Not compared: {note}."] if note else [])]) + "\n"


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
    """Notebook 02: the policy and quantizer in effect, then per source the achieved average at each target."""
    first = next(iter(next(iter(allocations.values())).values()))
    ranges = ", ".join(f"{t:g}: {a['bits_range'][0]}-{a['bits_range'][1]}"
                       for t, a in next(iter(allocations.values())).items())
    lines = [f"negative_traces {first.get('negative_traces', 'keep')}, quantizer {first.get('quantizer', 'eq6')}, "
             f"per-layer bits {ranges}"]
    for metric, by_target in allocations.items():
        avgs = ", ".join(f"{t:g} -> {a['avg_bits']:.2f}" for t, a in by_target.items())
        lines.append(f"{metric:16s}: average bits {avgs}")
    return "\n".join(lines)


def allocation_markdown(allocations: dict[str, dict[float, dict[str, Any]]]) -> str:
    """Notebook 02: per source and target, the achieved average, how many layers got each width and the mean
    bits per model region."""
    regions = [r for r, _ in REGIONS] + [OTHER_REGION]
    lines = ["| scheme | target | per-layer bits | average bits | layers per width | "
             + " | ".join(f"mean bits: {r}" for r in regions) + " |",
             "|---|---:|---|---:|---|" + "---:|" * len(regions)]
    for metric, by_target in allocations.items():
        for target, a in by_target.items():
            lo, hi = a["bits_range"]
            counts = ", ".join(f"{k}: {n}" for k in range(lo, hi + 1)
                               if (n := sum(b == k for b in a["bit_map"].values())))
            means = region_mean_bits(a["bit_map"])
            lines.append(f"| {metric} | {target:g} | {lo}-{hi} | {a['avg_bits']:.2f} | {counts} | "
                         + " | ".join(f"{means[r]:.1f}" if r in means else "-" for r in regions) + " |")
    return "\n".join(lines) + "\n"


def table1_summary(table: dict[str, Any], claims: list[dict[str, Any]]) -> str:
    """Notebook 03: AP (1 decimal) of every row, one line per precision, and how many claims hold."""
    by_precision: dict[str, list[str]] = {}
    for r in table["rows"]:
        by_precision.setdefault(r["precision"], []).append(f"{r['scheme']} {r['AP']:.1f}")
    lines = [f"float {table['rows'][0]['AP']:.1f}" if p == "float" else _wrap(f"{p} bits: {', '.join(cells)}")
             for p, cells in by_precision.items()]
    verdicts = [c["verdict"] for c in claims]
    lines.append("claims: " + ", ".join(f"{v} {verdicts.count(v)}" for v in ("holds", "does not hold", "inconclusive"))
                 + f" (of {len(claims)})")
    return "\n".join(lines)


def claims_overview(claims: list[Any], only: str | None = None) -> str:
    """Notebooks 03/04: how many claims hold, then each claim's verdict and evidence (``only`` keeps the claims
    whose text contains it)."""
    rows = [c if isinstance(c, dict) else c.to_dict() for c in claims]
    rows = [r for r in rows if only is None or only in r["claim"]]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("holds", "does not hold", "inconclusive")}
    parts = [f"{counts['holds']} {'holds' if counts['holds'] == 1 else 'hold'}",
             f"{counts['does not hold']} {'does' if counts['does not hold'] == 1 else 'do'} not hold"]
    if counts["inconclusive"]:
        parts.append(f"{counts['inconclusive']} {'is' if counts['inconclusive'] == 1 else 'are'} inconclusive (the "
                     f"95% interval of the difference straddles the threshold)")
    lines = [f"Of {len(rows)} {'claim' if len(rows) == 1 else 'claims'} on this run, {', '.join(parts)}:", ""]
    lines += [f"- **{r['verdict']}**: {r['claim']} — {r['evidence']}" for r in rows]
    return "\n".join(lines) + "\n"


def figures_summary(fig1: dict[str, Any], fig2: dict[str, Any], files: list[Path]) -> str:
    """Notebook 04: the files written and the data behind them, in a few rounded numbers."""
    spans = ", ".join(f"{r} {a}-{b}" for r, a, b in fig1["spans"])
    lines = [f"files: {', '.join(sorted(p.name for p in files))}", f"layers: {len(fig1['layers'])} ({spans})"]
    for m, d in fig1["metrics"].items():
        lines.append(f"fig1 {m:9s}: {len(d['nonpositive'])} non-positive trace estimates, "
                     f"{len(d['significant_negative'])} of them below zero at 95%")
    for m, bits in fig2["bits"].items():
        lines.append(f"fig2 {m:9s}: average {fig2['avg_bits'][m]:.2f} bits (target {fig2['target']:g}), "
                     f"{min(bits)}-{max(bits)} bits per layer")
    return "\n".join(lines)


def sensitivity_summary(check: dict[str, Any]) -> str:
    """Notebook 05: the measured Eq. (5) split, rho at 4 bits per default scheme, the policy choice, the aims of the
    first-order metric met."""
    d = check["decomposition"]
    rho = ", ".join(f"{r['scheme']} {r['rho']:+.2f}" for r in check["rho_default"])
    choice = check["policy_choice"]
    means = ", ".join(f"{p} {v:.2f}" for p, v in choice["mean_pooled_rho"].items())
    missed = [t["target"] for t in check["targets"] if not t["met"]]
    return "\n".join([
        f"measured Eq.(5) rise, one layer at {d['bits']} bits: L1 share median {d['median_l1_share']:.3f}, "
        f"min {d['min_l1_share']:.3f}",
        _wrap(f"rho vs measured rise at 4 bits: {rho}"),
        f"negative_traces: best by agreement {choice['best']} (mean pooled rho {means}); default "
        f"{check['negative_traces']}",
        f"first-order metric: {len(check['targets']) - len(missed)} of {len(check['targets'])} aims met"
        + (f"; missed: {'; '.join(missed)}" if missed else "")])


def pareto_summary(table: dict[str, Any]) -> str:
    """Notebook 07: Table 2's AP (1 decimal), one line per quantizer and precision, and whether the 4-bit
    moonshot holds."""
    lines = [f"float AP {100 * table['float']['AP']:.1f}, {table['float']['size_mb']:.2f} MB"]
    groups: dict[tuple[str, str], list[str]] = {}
    for r in table["rows"]:
        groups.setdefault((r["quantizer"], r["precision"]), []).append(f"{r['source']} {100 * r['AP']:.1f}")
    lines += [_wrap(f"{q} {p}: {', '.join(cells)}") for (q, p), cells in groups.items()]
    shot = table["moonshot"]
    if shot["best"] is not None:
        best = shot["best"]
        lines.append(f"moonshot (4 bits within 1 AP of float): {'holds' if shot['holds'] else 'does not hold'}; "
                     f"best {best['quantizer']} {best['source']} {shot['gap_points']:.1f} points below float")
    return "\n".join(lines)
