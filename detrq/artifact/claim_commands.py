"""Each claim and figure with the command that regenerates it, that command's measured time and the resources it
needs: the table that the ACM artifact badges ask for ("the exact command, time and resources for each claim"),
rendered into docs/reproducing.md by ``python -m detrq readme``.

What is declared here is only the map: the steps of ``./reproduce.sh`` (``STEPS``, named as in reproduce.sh and in
the runtime files) with the command each runs, and which step and notebook make each kind of result (``FIGURES``
and ``claim_rows``). Every number comes from files: the verdicts from the results, the times and the CPU from the
accepted from-scratch runtimes (``results/runtime_<run>.json``), memory from the results files that measured it;
where nothing measured it the table says "not measured".
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detrq.artifact.notebooks import profile_steps, step_name
from detrq.io.layout import kind_dir, results_file, results_name
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import cpu_label, read_json

PYTHON = ".venv/bin/python"


@dataclass(frozen=True)
class Step:
    """One timed step of ``./reproduce.sh``: the run it belongs to, its name there and the command it runs."""

    run: str  # "default" (./reproduce.sh) or "int8" (./reproduce.sh int8): runs/<run>/, results/runtime_<run>.json
    name: str  # the step's name in reproduce.sh and in the runtime file
    command: str


def _notebooks(run: str, params: str, names: tuple[str, ...]) -> str:
    # reproduce.sh's notebook_steps() and in_run(): one step per step of the profile; the run directory takes the
    # notebooks' results, figures and executed copies
    profile = " --profile complete" if params == "default" else ""
    together = " --together" if len(names) > 1 else ""
    return (f"{PYTHON} -m detrq notebooks --params params/{params}.yaml{profile} --set results_dir=runs/{run}/results "
            f"--set figures_dir=runs/{run}/figures --out-dir runs/{run}/notebooks --only {' '.join(names)}{together}")


# The notebook steps of ./reproduce.sh: the complete profile of params/default.yaml, as reproduce.sh reads it.
NOTEBOOK_STEPS: tuple[tuple[str, ...], ...] = profile_steps(PROJECT_ROOT / "params" / "default.yaml", "complete")


def step_of(notebook: str) -> str:
    """The name of the reproduce.sh step that runs ``notebook``."""
    return next(step_name(s) for s in NOTEBOOK_STEPS if notebook in s)


DATA = "synthetic data (generated if missing)"
ALLOCATION, TABLE1, FIGURES12 = (step_of(n) for n in ("02_bit_allocation", "03_table1", "04_figures"))
CHECK = step_of("05_sensitivity_check")
PARETO = step_of("07_pareto")
CURVE = "uniform quantization curve (float, W8..W3)"
INT8 = "notebook 06 (INT8 Faster R-CNN)"
STEPS: tuple[Step, ...] = (
    Step("default", DATA, f"{PYTHON} -m detrq make-data"),
    *(Step("default", step_name(s), _notebooks("default", "default", s)) for s in NOTEBOOK_STEPS),
    Step("default", CURVE, f"{PYTHON} -m detrq curve --quiet --results-dir runs/default/results"),
    Step("int8", DATA, f"{PYTHON} -m detrq make-data"),
    Step("int8", INT8, _notebooks("int8", "int8", ("06_int8_faster_rcnn",))),
)
RUN_COMMANDS = {"default": "./reproduce.sh", "paper": "./reproduce.sh --profile paper", "int8": "./reproduce.sh int8"}

# figure files (glob patterns over figures/*.png, first match wins) -> what they show, the notebook, the step
FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("fig1_hessian_traces", "Figure 1: log Hessian trace per layer, three metrics", "01 → 04", FIGURES12),
    ("fig2_bit_allocation", "Figure 2: per-layer bits at the 5-bit average", "02 → 04", FIGURES12),
    ("sensitivity_check", "predicted vs measured per-layer costs (beyond the paper)", "05", CHECK),
    ("eq5_decomposition", "the measured Eq. (5) rise split into its KL and L1 parts (beyond the paper)", "05", CHECK),
    ("fig3_pareto", "Figure 3: AP against average bits and MB, three quantizers (beyond the paper)", "07", PARETO),
    ("fig4_per_class", "Figure 4: per-class AP loss at 4 bits (beyond the paper)", "07", PARETO),
    ("int8_fasterrcnn_resnet50_fpn_*", "INT8 R50-FPN: float vs int8 activations, hexbin, per-layer SQNR", "06", INT8),
    ("int8_*_onnx_*", "INT8 ONNX detectors (YOLOv8n, RetinaNet, SSDlite): float vs int8 activations, hexbin, SQNR",
     "06", INT8),
    ("int8_*", "INT8 narrow Faster R-CNN (the other int8_ figures): float vs int8 activations, hexbin, SQNR", "06",
     INT8),
)


def figure_entry(file_name: str) -> tuple[str, str, str, str] | None:
    """The ``FIGURES`` entry a figure file belongs to (by its stem), or None."""
    stem = Path(file_name).stem
    return next((f for f in FIGURES if fnmatch.fnmatch(stem, f[0])), None)


def _claim_source(claim: str) -> str:
    # Figure 1's, the sampling and footnote 1's claims are judged in 03 on notebook 01's files; the others on
    # Table 1, whose bit maps come from 02
    return "01 → 03" if any(k in claim for k in ("Figure 1", "training loss of", "Footnote 1")) else "01, 02 → 03"


def claim_rows(results_dir: str | Path) -> list[dict[str, str]]:
    """One row per claim, checked target and figure: what, its verdict on this run, notebook and file, step."""
    results = Path(results_dir)

    def file(name: str) -> str:
        return f"`results/{results_name(name)}`"

    def read(name: str) -> Any | None:
        path = results_file(results, name)
        return read_json(path) if path.is_file() else None

    rows: list[dict[str, str]] = []

    def add(what: str, verdict: str, made_by: str, step: str, run: str = "default", **extra: Any) -> None:
        rows.append({"what": what, "verdict": verdict, "made_by": made_by, "step": step, "run": run, **extra})

    if read("table1.json") is not None:
        add("Table 1: every row, Δ vs uniform with its 95% interval", "-", f"01, 02 → 03, {file('table1.json')}",
            TABLE1)
    for c in (read("claims.json") or {"claims": []})["claims"]:
        add(c["claim"], c["verdict"], f"{_claim_source(c['claim'])}, {file('claims.json')}", TABLE1)
    stability = read("seed_stability.json")
    if stability is not None and stability["stable"]:
        stable = [s for s, ok in stability["stable"].items() if ok]
        add("Bit maps stable across the probe seeds, per scheme", f"{len(stable)} of {len(stability['stable'])} "
            "stable", f"02, {file('seed_stability.json')}", ALLOCATION)
    check = read("sensitivity_check.json")
    for t in (check or {"targets": []})["targets"]:
        add(f"Sensitivity check: {t['target']}", "met" if t["met"] else "missed",
            f"05, {file('sensitivity_check.json')}", CHECK)
    if check is not None:
        add("Spearman ρ of every metric against the measured costs", "-", f"05, {file('sensitivity_check.json')}",
            CHECK)
    table2 = read("table2.json")
    if table2 is not None:
        shot = table2["moonshot"]
        add("Table 2: three quantizers × every scheme at 6, 5, 4 bits", "-", f"07, {file('table2.json')}", PARETO)
        if shot.get("best") is not None:
            add("Moonshot: a 4-bit row within 1 AP point of float", "holds" if shot["holds"] else "does not hold",
                f"07, {file('table2.json')}", PARETO)
    if read("quant_curve.json") is not None:
        add("Uniform Eq. (6) curve, float and W8..W3", "-", file("quant_curve.json"), CURVE)
    for path in sorted(kind_dir(results, "int8").glob("int8_*.json")):
        r = read_json(path)
        add(f"INT8 {r['model']} ({r['backend']}): size, latency, peak RSS"
            + (", AP" if r.get("AP_float") is not None else ""), "-", f"06, {file(path.name)}", INT8, "int8",
            peak_mb=max(mb for side in r["peak_memory_mb"].values() for mb in side.values()))
    for pattern, what, notebook, step in FIGURES:
        add(f"`figures/{pattern}.png`: {what}", "-", notebook, step, "int8" if step == INT8 else "default")
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds} s" if seconds < 120 else f"{seconds} s ({seconds / 60:.1f} min)"


def _int8_peak_mb(results: Path) -> float | None:
    """The largest peak RSS that the INT8 results measured (fresh inference processes, float and int8, every
    batch size), or None."""
    peaks = [mb for path in sorted(kind_dir(results, "int8").glob("int8_*.json"))
             for side in read_json(path)["peak_memory_mb"].values() for mb in side.values()]
    return max(peaks) if peaks else None


def _resources(step: str, runtime: dict[str, Any] | None, peak_mb: float | None, *, short: bool) -> str:
    cpu = "CPU" if runtime is None else (f"CPU, {runtime['threads_available']} cores" if short else
                                         f"CPU only, {runtime['threads_available']} cores "
                                         f"({cpu_label(runtime['cpu'], runtime.get('cpu_isa'))}), no GPU")
    if step != INT8 or peak_mb is None:
        return f"{cpu}; memory not measured"
    if short:
        return f"{cpu}; inference peak RSS ≤ {peak_mb:.0f} MB"
    return (f"{cpu}; peak RSS of the measured inference processes up to {peak_mb:.0f} MB (`peak_memory_mb` in "
            f"`results/{results_name('int8_')}*.json`); the notebook process's own peak not measured")


def claim_commands_markdown(results_dir: str | Path) -> str:
    """The steps (command, measured time, resources), then every claim and figure with its step's."""
    results = Path(results_dir)
    runtimes = {run: read_json(results_file(results, f"runtime_{run}.json")) for run in RUN_COMMANDS
                if results_file(results, f"runtime_{run}.json").is_file()}
    peak_mb = _int8_peak_mb(results)
    number = {(s.run, s.name): i for i, s in enumerate(STEPS, start=1)}

    def seconds(run: str, name: str) -> str:
        runtime = runtimes.get(run)
        found = [s["seconds"] for s in (runtime or {"steps": []})["steps"] if s["name"] == name]
        return _minutes(found[0]) if found else "not measured"

    lines = ["| step | part of | command | measured time | resources |", "|---|---|---|---:|---|"]
    for i, s in enumerate(STEPS, start=1):
        lines.append(f"| {i}. {s.name} | `{RUN_COMMANDS[s.run]}` | `{s.command}` | {seconds(s.run, s.name)} "
                     f"| {_resources(s.name, runtimes.get(s.run), peak_mb, short=False)} |")
    lines += ["", "| claim or figure | on this run | notebook, results file | step | measured time of the step "
              "| resources |", "|---|---|---|---:|---:|---|"]
    for r in claim_rows(results):
        lines.append(f"| {r['what']} | {r['verdict']} | {r['made_by']} | {number[r['run'], r['step']]} "
                     f"| {seconds(r['run'], r['step'])} "
                     f"| {_resources(r['step'], runtimes.get(r['run']), r.get('peak_mb', peak_mb), short=True)} |")
    times = "; ".join(f"`{RUN_COMMANDS[run]}` in `results/{results_name(f'runtime_{run}.json')}` ({rt['cpu']}, "
                      f"{'from scratch' if rt['from_scratch'] else 'NOT from scratch'})"
                      for run, rt in runtimes.items())
    lines += ["", f"Measured times: the steps of the accepted runs, {times or 'none accepted yet'}. A step not in "
                  "a runtime file says \"not measured\"."]
    return "\n".join(lines) + "\n"
