"""The reproduction report: a run's regenerated results set against the committed ones, line by line.

``./reproduce.sh`` computes everything into a run directory (``runs/default/``, ``runs/int8/``), never into the
committed ``results/``. ``compare_runs`` then reads both sides and gives every number a verdict: ``identical``
(the same stored value), ``within tolerance`` (``Tolerances`` says how close, and why that close) or ``differs``.
Numbers that the run did not regenerate (the INT8 part of a default run) are ``not run``; result files that a run
took from a cache instead of computing are listed as reused, and such a run is never called a reproduction.
``accept_runs`` is the only way regenerated results replace the committed ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT, repo_relative
from detrq.io.layout import RUN_LEVEL, fill_missing, kind_dir, results_file
from detrq.io.results import cpu_int8_isa, cpu_label, cpu_model, read_json, write_json_atomic

IDENTICAL, WITHIN, DIFFERS, NOT_RUN = "identical", "within tolerance", "differs", "not run"
NOT_COMPARED = "not compared"  # a CPU-dependent number measured on another CPU model than the committed one
REPORT_NAME = "reproduction.json"
# A run directory's marker: written when the run starts; result files older than it were reused, not computed.
STARTED_NAME = ".started"
RESUMED_NAME = ".resumed"  # present when the run went on after an interruption: its step times are partial
RUNTIME_NAME = "runtime.json"
ACCEPTED_NAME = "reproduction_accepted.json"  # the report of the run whose results are the committed ones
RUNS_DIR = PROJECT_ROOT / "runs"
# The parts of the artifact, each with its run directory and the committed entries it owns (name prefixes of the
# top-level entries of results/ and figures/: results/int8/ and figures/int8_*; the default run owns everything
# that no other part does).
RUN_NAMES: tuple[str, ...] = ("default", "paper", "int8")
PARTS: dict[str, tuple[str, ...]] = {"default": (), "int8": ("int8",)}
# Runs of a smaller profile (params' ``profiles``): the part they regenerate a subset of. Their report marks what the
# profile does not compute "not run", and they are never accepted (they would delete the rest of their part).
PROFILE_RUNS: dict[str, str] = {"paper": "default"}
# Committed files that accepting never deletes: the reports and the from-scratch runtimes (the run-level files).
KEEP_PREFIXES = RUN_LEVEL


@dataclass(frozen=True)
class Tolerances:
    """How far a regenerated number may lie from the committed one and still count as reproduced.

    On the CPU type and thread count that made the committed results the run is deterministic, and every line
    is ``identical``. Elsewhere float reductions are summed in another order (thread count, SIMD width, BLAS
    kernel), which moves traces in the 6th-7th digit; that may flip an ILP tie between two bit widths of one
    layer, and a flipped layer moves AP by a few hundredths of a point.
    """

    trace_rel: float = 1e-3  # traces: 1000x the 1e-6 relative drift seen between CPU runs
    # traces whose |value| is below this fraction of the file's largest are float32 rounding of a zero (e.g. the
    # first decoder self-attention, whose values are the all-zero initial target): no digits to compare
    trace_floor: float = 1e-6
    bitmap_share: float = 0.98  # bit maps: share of weights with the same bits; a tie flip moves one layer (< 2%)
    ap_points: float = 0.1  # AP (points): below Table 1's printed precision, a tenth of its CIs' half-width
    avg_bits: float = 0.01  # average bits: a flipped layer of < 2% of the weights moves it by < 0.02 bits/2
    rho: float = 0.01  # Spearman rho of notebook 05: a tie flip in a measured cost moves it by < 0.01
    # INT8 latency ratio, regenerated / committed, on the same CPU model: timing noise and load move it (another
    # CPU model's int8 kernels move it further: not compared); INT8 AP uses ap_points, sizes are exact
    latency_band: tuple[float, float] = (0.75, 1.33)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _absent(item: str, committed: Any, partial: bool, what: str = "file") -> dict:
    """The line of a committed number the run has no file or row for: not run by a smaller profile, else a
    difference."""
    if partial:
        return _line(item, committed, None, NOT_RUN, "not in this run's profile")
    return _line(item, committed, None, DIFFERS, f"{what} missing from the run")


def _line(item: str, committed: Any, regenerated: Any, verdict: str, tolerance: str = "", **extra: Any) -> dict:
    return {"item": item, "committed": committed, "regenerated": regenerated, "verdict": verdict,
            "tolerance": tolerance, **extra}


def _number_verdict(a: float, b: float, close: bool) -> str:
    return IDENTICAL if a == b else WITHIN if close else DIFFERS


def _read(path: Path) -> Any | None:
    return read_json(path) if path.is_file() else None


def compare_table1(committed: dict, regenerated: dict | None, tol: Tolerances, partial: bool = False) -> list[dict]:
    """Table 1: every row's AP (points) and average bits."""
    lines = []
    new = {(r["precision"], r["scheme"]): r for r in (regenerated or {}).get("rows", [])}
    for row in committed["rows"]:
        name = f"Table 1 {row['precision']} {row['scheme']}"
        other = new.get((row["precision"], row["scheme"]))
        for key, limit in (("AP", tol.ap_points), ("avg_bits", tol.avg_bits)):
            if regenerated is None:
                lines.append(_line(f"{name} {key}", row[key], None, NOT_RUN))
            elif other is None:
                lines.append(_absent(f"{name} {key}", row[key], partial, "row"))
            else:
                lines.append(_line(f"{name} {key}", row[key], other[key],
                                   _number_verdict(row[key], other[key], abs(row[key] - other[key]) <= limit),
                                   f"|diff| <= {limit:g}"))
    return lines


def compare_table2(committed: dict, regenerated: dict | None, tol: Tolerances, partial: bool = False) -> list[dict]:
    """Table 2 (notebook 07): every row's AP (points, stored as a fraction) and average bits, as Table 1's."""
    def key(r: dict) -> tuple[str, str, str]:
        return r["precision"], r["quantizer"], r["source"]

    new = {key(r): r for r in (regenerated or {}).get("rows", [])}
    lines = []
    for row in committed["rows"]:
        name = f"Table 2 {' '.join(key(row))}"
        other = new.get(key(row))
        for field, scale, limit in (("AP", 100.0, tol.ap_points), ("avg_bits", 1.0, tol.avg_bits)):
            old = scale * row[field]
            if regenerated is None:
                lines.append(_line(f"{name} {field}", old, None, NOT_RUN))
            elif other is None:
                lines.append(_absent(f"{name} {field}", old, partial, "row"))
            else:
                now = scale * other[field]
                lines.append(_line(f"{name} {field}", old, now, _number_verdict(old, now, abs(old - now) <= limit),
                                   f"|diff| <= {limit:g}"))
    return lines


def _layer_numel(results: Path) -> dict[str, int]:
    """Weights per layer, from any traces file (bit maps store bits only)."""
    for path in sorted(kind_dir(results, "traces").glob("traces_*.json")):
        layers = read_json(path)["layers"]
        return {n: e["numel"] if "numel" in e else e["kl"]["numel"] for n, e in layers.items()}
    return {}


def identical_share(a: dict[str, int], b: dict[str, int], numel: dict[str, int]) -> float:
    """Share of the quantized weights that two bit maps give the same bits (layers weighted by size)."""
    names = set(a) | set(b)
    weight = {n: numel.get(n, 1) for n in names}
    same = sum(weight[n] for n in names if a.get(n) == b.get(n))
    return same / sum(weight.values()) if names else 1.0


def compare_bitmaps(committed_dir: Path, run_dir: Path | None, tol: Tolerances, partial: bool = False) -> list[dict]:
    numel = _layer_numel(committed_dir)
    lines = []
    for path in sorted(kind_dir(committed_dir, "bitmaps").glob("bitmap_*.json")):
        item = f"bit map {path.stem.removeprefix('bitmap_')}"
        old = read_json(path)["bit_map"]
        new = _read(results_file(run_dir, path.name)) if run_dir else None
        if run_dir is None:
            lines.append(_line(item, 1.0, None, NOT_RUN))
            continue
        if new is None:
            lines.append(_absent(item, 1.0, partial))
            continue
        share = identical_share(old, new["bit_map"], numel)
        verdict = IDENTICAL if share == 1.0 else WITHIN if share >= tol.bitmap_share else DIFFERS
        lines.append(_line(item, 1.0, share, verdict, f"identical weights >= {tol.bitmap_share:.0%}"))
    return lines


def _trace_values(layers: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per estimated quantity, ``(value, stderr)``: the trace, for the first-order metric its KL trace and its
    Jacobian row-norm sum, for ModelOpt's score the score at each bit width."""
    out = {}
    for name, e in layers.items():
        if "kl" in e:
            out[f"{name} KL"] = (e["kl"]["trace"], e["kl"]["stderr"])
            out[f"{name} S_l"] = (e["jacobian"]["sum"], e["jacobian"]["stderr"])
        elif "trace" not in e:  # ModelOpt's score: one estimate per bit width
            out.update({f"{name} {b}-bit": (est["trace"], est["stderr"]) for b, est in e.items()})
        else:
            out[name] = (e["trace"], e["stderr"])
    return out


def trace_difference(old: dict[str, Any], new: dict[str, Any], floor: float = 0.0) -> tuple[float, int, bool]:
    """The largest relative difference over the layers whose committed |trace| exceeds its stderr (noise-level
    estimates have no digits to compare) and ``floor`` times the largest |trace| of the file (float rounding of
    a zero); returns it, how many layers entered, and whether all are equal."""
    a, b = _trace_values(old), _trace_values(new)
    if set(a) != set(b):
        return math.inf, 0, False
    largest = max((abs(v) for v, _ in a.values()), default=0.0)
    resolved = [k for k, (v, err) in a.items() if abs(v) > err and abs(v) > floor * largest]
    worst = max((abs(b[k][0] - a[k][0]) / abs(a[k][0]) for k in resolved), default=0.0)
    return worst, len(resolved), all(a[k][0] == b[k][0] for k in a)


def compare_traces(committed_dir: Path, run_dir: Path | None, tol: Tolerances, partial: bool = False) -> list[dict]:
    lines = []
    for path in sorted(kind_dir(committed_dir, "traces").glob("traces_*.json")):
        item = f"traces {path.stem.removeprefix('traces_')}"
        if run_dir is None:
            lines.append(_line(item, 0.0, None, NOT_RUN))
            continue
        new = _read(results_file(run_dir, path.name))
        if new is None:
            lines.append(_absent(item, 0.0, partial))
            continue
        worst, n, equal = trace_difference(read_json(path)["layers"], new["layers"], tol.trace_floor)
        verdict = IDENTICAL if equal else WITHIN if worst <= tol.trace_rel else DIFFERS
        lines.append(_line(item, 0.0, worst, verdict, f"max relative difference <= {tol.trace_rel:g}, over "
                           f"layers above their stderr and {tol.trace_floor:g} of the largest", layers_compared=n))
    return lines


def compare_claims(committed: dict, regenerated: dict | None, partial: bool = False) -> list[dict]:
    new = {c["claim"]: c["verdict"] for c in (regenerated or {}).get("claims", [])}
    return [_absent(f"claim: {c['claim']}", c["verdict"], partial, "claim")
            if regenerated is not None and c["claim"] not in new else
            _line(f"claim: {c['claim']}", c["verdict"], new.get(c["claim"]),
                  NOT_RUN if regenerated is None else IDENTICAL if new.get(c["claim"]) == c["verdict"] else DIFFERS,
                  "same verdict") for c in committed["claims"]]


def compare_curve(committed: dict, regenerated: dict | None, tol: Tolerances) -> list[dict]:
    new = {r["label"]: r for r in (regenerated or {}).get("rows", [])}
    lines = []
    for row in committed["rows"]:
        old_ap = 100 * row["AP"]
        if regenerated is None:
            lines.append(_line(f"uniform curve {row['label']} AP", old_ap, None, NOT_RUN))
            continue
        new_ap = 100 * new[row["label"]]["AP"] if row["label"] in new else math.nan
        lines.append(_line(f"uniform curve {row['label']} AP", old_ap, new_ap,
                           _number_verdict(old_ap, new_ap, abs(old_ap - new_ap) <= tol.ap_points),
                           f"|diff| <= {tol.ap_points:g}"))
    return lines


def compare_sensitivity(committed: dict, regenerated: dict | None, tol: Tolerances) -> list[dict]:
    new = {r["scheme"]: r["rho"] for r in (regenerated or {}).get("rho_default", [])}
    lines = []
    for r in committed["rho_default"]:
        item = f"notebook 05 rho {r['scheme']} (4 bits)"
        if regenerated is None:
            lines.append(_line(item, r["rho"], None, NOT_RUN))
            continue
        other = new.get(r["scheme"], math.nan)
        lines.append(_line(item, r["rho"], other, _number_verdict(r["rho"], other, abs(r["rho"] - other) <= tol.rho),
                           f"|diff| <= {tol.rho:g}"))
    return lines


def _int8_cpu(record: dict, fallback: str | None) -> str | None:
    """The CPU model an INT8 results file was measured on: its environment record, else ``fallback`` (files
    written before the record held the CPU: the CPU of the run they came from)."""
    return record.get("environment", {}).get("cpu") or fallback


def compare_int8(committed: dict, regenerated: dict | None, tol: Tolerances, committed_cpu: str | None = None
                 ) -> list[dict]:
    """INT8: AP with Table 1's tolerance (``tol.ap_points``; float parts round differently across CPUs), sizes
    exact, and the latency ratio within ``tol.latency_band`` of the committed one when both were measured on the
    same CPU model. On another CPU the int8 kernels differ (VNNI, AVX-512, AMX), so the ratio is shown beside the
    committed one as "other CPU: not compared". ``committed_cpu``: the committed run's CPU, for files that do not
    record their own."""
    name = f"INT8 {committed['model']} {committed['backend']}"
    aps = [("AP_float", committed["AP_float"]), ("AP_int8", committed["AP_int8"])]
    sizes = [("size float (bytes)", committed["size_bytes"]["float"]),
             ("size int8 (bytes)", committed["size_bytes"]["int8"])]
    if regenerated is None:
        return [_line(f"{name} {k}", v, None, NOT_RUN) for k, v in aps + sizes] + [
            _line(f"{name} latency ratio", committed["latency_ratio"], None, NOT_RUN)]
    lines = []
    for key, old in aps:
        new = regenerated[key]
        if old is None or new is None:
            lines.append(_line(f"{name} {key}", old, new, IDENTICAL if old == new else DIFFERS, "both measured"))
        else:
            lines.append(_line(f"{name} {key}", old, new,
                               _number_verdict(old, new, 100 * abs(old - new) <= tol.ap_points),
                               f"|diff| <= {tol.ap_points:g} AP points"))
    new_sizes = {"size float (bytes)": regenerated["size_bytes"]["float"],
                 "size int8 (bytes)": regenerated["size_bytes"]["int8"]}
    lines += [_line(f"{name} {k}", v, new_sizes[k], IDENTICAL if v == new_sizes[k] else DIFFERS, "exact")
              for k, v in sizes]
    old, now = committed["latency_ratio"], regenerated["latency_ratio"]
    old_cpu, new_cpu = _int8_cpu(committed, committed_cpu), _int8_cpu(regenerated, cpu_model())
    if old_cpu is None or old_cpu != new_cpu:
        lines.append(_line(f"{name} latency ratio", old, now, NOT_COMPARED, "other CPU: not compared",
                           committed_cpu=old_cpu, regenerated_cpu=new_cpu))
    else:
        lo, hi = tol.latency_band
        lines.append(_line(f"{name} latency ratio", old, now, _number_verdict(old, now, lo <= now / old <= hi),
                           f"regenerated/committed in [{lo}, {hi}], same CPU ({new_cpu})"))
    return lines


def _compare_file(committed_dir: Path, run_dir: Path | None, name: str,
                  compare: Callable[[dict, dict | None], list[dict]], partial: bool = False) -> list[dict]:
    old = _read(results_file(committed_dir, name))
    if old is None:
        return []
    new = _read(results_file(run_dir, name)) if run_dir else None
    if run_dir is not None and new is None:
        return compare(old, None) if partial else [_absent(name, "present", partial)]
    return compare(old, new)


def reused_files(run_results: Path) -> list[str]:
    """Result files of a run directory written before the run started: taken from a cache, not computed."""
    started = run_results.parent / STARTED_NAME
    if not started.is_file():
        return sorted(str(p.relative_to(run_results)) for p in run_results.rglob("*.json"))
    t0 = started.stat().st_mtime
    return sorted(str(p.relative_to(run_results)) for p in run_results.rglob("*")
                  if p.is_file() and p.stat().st_mtime < t0)


def compare_runs(committed_dir: str | Path, runs: dict[str, str | Path],
                 tol: Tolerances = Tolerances()) -> dict[str, Any]:
    """The report of ``runs`` (``{"default": runs/default, "int8": runs/int8}``, missing ones skipped) against
    ``committed_dir``. A run directory holds ``results/``, ``figures/``, ``notebooks/`` and ``runtime.json``."""
    committed_dir = Path(committed_dir)
    found = {k: Path(v) for k, v in runs.items() if (Path(v) / "results").is_dir()}
    # A smaller profile's run stands for its part when the part's own run is not in the report.
    part_dirs = {**{PROFILE_RUNS[k]: d for k, d in found.items() if k in PROFILE_RUNS},
                 **{k: d for k, d in found.items() if k not in PROFILE_RUNS}}
    partial = "default" in part_dirs and part_dirs["default"] != found.get("default")
    default = part_dirs["default"] / "results" if "default" in part_dirs else None
    int8 = found["int8"] / "results" if "int8" in found else None
    lines = []
    lines += _compare_file(committed_dir, default, "table1.json", lambda a, b: compare_table1(a, b, tol, partial),
                           partial)
    lines += compare_bitmaps(committed_dir, default, tol, partial)
    lines += compare_traces(committed_dir, default, tol, partial)
    lines += _compare_file(committed_dir, default, "table2.json", lambda a, b: compare_table2(a, b, tol, partial),
                           partial)
    lines += _compare_file(committed_dir, default, "claims.json", lambda a, b: compare_claims(a, b, partial),
                           partial)
    lines += _compare_file(committed_dir, default, "quant_curve.json", lambda a, b: compare_curve(a, b, tol),
                           partial)
    lines += _compare_file(committed_dir, default, "sensitivity_check.json",
                           lambda a, b: compare_sensitivity(a, b, tol), partial)
    int8_cpu = (_read(results_file(committed_dir, "runtime_int8.json")) or {}).get("cpu")
    for path in sorted(kind_dir(committed_dir, "int8").glob("int8_*.json")):
        lines += _compare_file(committed_dir, int8, path.name, lambda a, b: compare_int8(a, b, tol, int8_cpu))
    reused = {k: reused_files(d / "results") for k, d in found.items()}
    counts = {v: sum(line["verdict"] == v for line in lines) for v in (IDENTICAL, WITHIN, DIFFERS, NOT_RUN)}
    from_scratch = not any(reused.values())
    if counts[DIFFERS]:
        verdict = "DIFFERS"
    elif not from_scratch:
        verdict = "reused cached results: not a reproduction"
    else:
        verdict = "reproduced" + (" (part of the artifact not run)" if counts[NOT_RUN] else "")
    committed_runtime = _read(results_file(committed_dir, "runtime_default.json")) or {}
    return {"verdict": verdict, "from_scratch": from_scratch, "counts": counts,
            "runs": {k: repo_relative(d.resolve()) for k, d in found.items()}, "reused": reused,
            "cpu": cpu_model(), "cpu_isa": cpu_int8_isa(), "committed_cpu": committed_runtime.get("cpu"),
            "committed_cpu_isa": committed_runtime.get("cpu_isa"),
            "tolerances": tol.describe(), "lines": lines}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def report_text(report: dict[str, Any]) -> str:
    """What the run prints: the verdict, the counts, every line that is not identical, loud for ``differs``."""
    c = report["counts"]
    out = [f"reproduction: {report['verdict']} ({c[IDENTICAL]} identical, {c[WITHIN]} within tolerance, "
           f"{c[DIFFERS]} differ, {c[NOT_RUN]} not run) on {cpu_label(report['cpu'], report.get('cpu_isa'))}"
           + (f"; committed results from {cpu_label(report['committed_cpu'], report.get('committed_cpu_isa'))}"
              if report.get("committed_cpu") else "")]
    here = (report["cpu"], report.get("cpu_isa"))
    there = (report.get("committed_cpu"), report.get("committed_cpu_isa"))
    if there[0] is not None and (there[0] != here[0] or there[1] is not None and there[1] != here[1]):
        out.append("  another CPU than the committed results' (model or vector units): float sums run in another "
                   "order, so traces move by rounding and an ILP near-tie can flip; the tolerances below allow for "
                   "the first, not always for the second")
    for run, names in report["reused"].items():
        if names:
            out.append(f"  REUSED in runs/{run}: {len(names)} cached result files were not recomputed "
                       f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    for line in report["lines"]:
        if line["verdict"] == DIFFERS:
            out.append(f"  WARNING: {line['item']} DIFFERS: committed {_fmt(line['committed'])}, regenerated "
                       f"{_fmt(line['regenerated'])} ({line['tolerance']})")
        elif line["verdict"] == WITHIN:
            out.append(f"  within tolerance: {line['item']}: committed {_fmt(line['committed'])}, regenerated "
                       f"{_fmt(line['regenerated'])} ({line['tolerance']})")
        elif line["verdict"] == NOT_COMPARED:
            out.append(f"  other CPU: not compared: {line['item']}: committed {_fmt(line['committed'])} on "
                       f"{line['committed_cpu'] or 'an unrecorded CPU'}, regenerated {_fmt(line['regenerated'])} on "
                       f"{line['regenerated_cpu']}")
    if c[NOT_RUN]:
        out.append(f"  not run: {c[NOT_RUN]} numbers (" + ", ".join(sorted({_part(l['item']) for l in report['lines']
                                                                          if l['verdict'] == NOT_RUN})) + ")")
    if c[DIFFERS]:
        out.append("  The committed results are unchanged. Inspect runs/, then `./reproduce.sh accept` to replace "
                   "them, or keep them.")
    return "\n".join(out)


def _part(item: str) -> str:
    return "INT8: ./reproduce.sh int8" if item.startswith("INT8") else "the default run: ./reproduce.sh"


def write_report(report: dict[str, Any], paths: list[str | Path]) -> None:
    for path in paths:
        write_json_atomic(path, report)


def write_runtime(run_dir: str | Path, steps: list[tuple[str, int]], profile: str = "complete") -> dict[str, Any]:
    """``run_dir/runtime.json``: each step's seconds, the profile, the CPU, and whether they are a from-scratch run's:
    no result reused and no interruption (a resumed run's steps time only what was left)."""
    run_dir = Path(run_dir)
    reused = reused_files(run_dir / "results")
    resumed = (run_dir / RESUMED_NAME).is_file()
    runtime = {"steps": [{"name": n, "seconds": s} for n, s in steps], "total_seconds": sum(s for _, s in steps),
               "profile": profile, "cpu": cpu_model(), "cpu_isa": cpu_int8_isa(), "threads_available": _cpu_count(),
               "from_scratch": not reused and not resumed,
               "reused_files": len(reused), "resumed": resumed}
    write_json_atomic(run_dir / RUNTIME_NAME, runtime)
    return runtime


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class RunStart:
    """How a run directory was prepared: ``fresh`` (emptied), ``resumed`` (an interrupted run goes on: what it
    finished stays, as computed by this run) or ``reused`` (earlier results are caches); the files seeded."""

    mode: str
    seeded: tuple[str, ...] = ()


def start_run(run_dir: str | Path, reuse: bool, seed_from: str | Path | None = None) -> RunStart:
    """Prepare a run directory.

    Without ``reuse`` it is emptied, so everything is computed again, unless it holds a run that started and
    never wrote its report (interrupted): that run resumes from the steps it finished, keeping its start marker,
    so its files still count as computed by the run. With ``reuse`` its earlier results stay as caches; an empty
    one is seeded with ``seed_from``'s files (the committed results).
    """
    run_dir = Path(run_dir)
    results = run_dir / "results"
    interrupted = (run_dir / STARTED_NAME).is_file() and not (run_dir / REPORT_NAME).is_file()
    if not reuse and interrupted:
        (run_dir / RESUMED_NAME).touch()
        return RunStart("resumed")
    if not reuse and run_dir.exists():
        shutil.rmtree(run_dir)
    results.mkdir(parents=True, exist_ok=True)
    seeded = []
    if reuse and seed_from is not None and not any(results.iterdir()):
        seeded = [f"{src.name}/" if src.is_dir() else src.name for src in fill_missing(results, seed_from)]
    (run_dir / REPORT_NAME).unlink(missing_ok=True)
    (run_dir / RESUMED_NAME).unlink(missing_ok=True)
    # The marker must be strictly newer than every cached file, or a cache hit would pass for new work.
    time.sleep(0.01)
    (run_dir / STARTED_NAME).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    return RunStart("reused" if reuse else "fresh", tuple(seeded))


def accept_runs(runs: dict[str, str | Path], results_dir: str | Path, figures_dir: str | Path,
                parts: dict[str, tuple[str, ...]]) -> list[str]:
    """Replace the committed files of each run's part (``parts[run]``: the file-name prefixes the run owns,
    empty for everything not owned by another part) with the run's; returns the names copied.

    Refuses a run that has no report yet, so results nobody compared never become the committed ones.
    """
    copied = []
    for run, run_dir in runs.items():
        run_dir = Path(run_dir)
        if not (run_dir / "results").is_dir():
            continue
        if not (run_dir / REPORT_NAME).is_file():
            raise DetrqError(f"{run_dir} has no {REPORT_NAME}: finish the run first (./reproduce.sh)")
        others = tuple(p for r, ps in parts.items() if r != run for p in ps)
        for sub, dest in (("results", Path(results_dir)), ("figures", Path(figures_dir))):
            src_dir = run_dir / sub
            if not src_dir.is_dir():
                continue
            owned = (lambda n: n.startswith(parts[run])) if parts[run] else (lambda n: not n.startswith(others))
            for old in dest.glob("*"):
                if owned(old.name) and not old.name.startswith(KEEP_PREFIXES):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            for src in sorted(src_dir.glob("*")):
                if not owned(src.name):
                    continue
                # A folder of cached steps (results/pareto/) moves whole, so that re-rendering hits the cache.
                if src.is_dir():
                    shutil.copytree(src, dest / src.name)
                    copied.extend(f"{sub}/{p.relative_to(src_dir)}" for p in sorted(src.rglob("*")) if p.is_file())
                elif src.is_file():
                    shutil.copy2(src, dest / src.name)
                    copied.append(f"{sub}/{src.name}")
    return copied


def accepted_report(runs: dict[str, str | Path], results_dir: str | Path) -> Path:
    """The report to keep beside accepted results: the newest report of an accepted run. ``results_dir``'s own
    report is the last one any run wrote, which may be a smaller profile's, run after the accepted one; it serves
    only when no accepted run has a report of its own."""
    reports = [Path(d) / REPORT_NAME for d in runs.values() if (Path(d) / REPORT_NAME).is_file()]
    return max(reports, key=lambda p: p.stat().st_mtime_ns) if reports else Path(results_dir) / REPORT_NAME
