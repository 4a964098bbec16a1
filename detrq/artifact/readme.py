"""Regenerates the result sections of README.md and docs/*.md from results/, so no number in them is typed by hand.

A generated section sits between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``, in
README.md (the front page) or any page of docs/; everything outside the markers is hand-written prose and is left
alone. ``SECTIONS`` lists the names; a marker with another name, or without its END, is an error, so no section
goes stale unnoticed. A section whose results file is missing says so, with the file's path in the results layout,
instead of showing numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from detrq.artifact.claim_commands import RUN_COMMANDS, claim_commands_markdown
from detrq.artifact.notebooks import unchecked_note
from detrq.artifact.pareto import table2_markdown
from detrq.artifact.reproduction import Tolerances
from detrq.artifact.table1 import VERDICTS, claims_markdown, table1_compact_markdown, table1_markdown
from detrq.io.errors import DetrqError
from detrq.io.layout import kind_dir, results_file, results_name
from detrq.io.results import cpu_label, read_json
from detrq.sensitivity.check import rho_lookup

MARKER = re.compile(r"<!-- (BEGIN|END) generated:([\w-]+) -->")
SECTION = re.compile(r"(<!-- BEGIN generated:([\w-]+) -->\n).*?(<!-- END generated:\2 -->)", re.S)


def _missing(name: str) -> str:
    return f"_Not generated yet: `results/{results_name(name)}` is missing; run `./reproduce.sh`._\n"


def quant_curve_markdown(curve: dict[str, Any]) -> str:
    """Uniform Eq.(6) weight quantization of the embedded checkpoint: AP at each bit width."""
    head = "| weights | " + " | ".join(r["label"] for r in curve["rows"]) + " |"
    sep = "|---|" + "---:|" * len(curve["rows"])
    ap = "| AP (%) | " + " | ".join(f"{100 * r['AP']:.1f}" for r in curve["rows"]) + " |"
    kept = "| of float | " + " | ".join(f"{r['AP'] / curve['rows'][0]['AP']:.2f}" for r in curve["rows"]) + " |"
    return "\n".join([head, sep, ap, kept]) + "\n"


def int8_markdown(results: list[dict[str, Any]]) -> str:
    """One row per INT8 result file: both models, every backend; AP only where the weights are trained."""
    lines = ["| model | weights | backend | px | quantized parts | smaller | latency int8/float [IQR] | RoIs/img "
             "| float stages floor | AP float | AP int8 | peak RSS b1 float / int8 (MB) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        iqr = r["latency"].get("ratio_iqr")
        lat = f"{r['latency_ratio']:.3f}" + (f" [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr else "")
        rois = f"{r['rois']['float_per_image']:.0f}" if "rois" in r else "-"
        floor = f"{r['breakdown']['ratio_floor']:.2f}" if "breakdown" in r else "-"
        ap = ("-", "-") if r["AP_float"] is None else (f"{100 * r['AP_float']:.1f}", f"{100 * r['AP_int8']:.1f}")
        mem = r["peak_memory_mb"]
        lines.append(f"| {r['model']} | {'trained' if r.get('checkpoint_sha256') else 'random, BN recalibrated'} "
                     f"| {r['backend']} | {r.get('image_size', '-')} | {', '.join(r['quantized_parts'])} "
                     f"| {r['size_reduction']:.1%} | {lat} | {rois} | {floor} | {ap[0]} | {ap[1]} "
                     f"| {mem['float']['1']:.0f} / {mem['int8']['1']:.0f} |")
    return "\n".join(lines) + "\n"


def int8_breakdown_markdown(results: list[dict[str, Any]]) -> str:
    """The per-stage time breakdown of every fx run that has one."""
    from detrq.int8.workflow import breakdown_markdown

    shown = [r for r in results if r["backend"] == "fx" and "breakdown" in r]
    if not shown:
        return "_No fx INT8 result with a per-stage breakdown yet; run `python -m detrq int8`._\n"
    return "\n\n".join(f"**{r['model']}** ({r['image_size']} px, {r['rois']['float_per_image']:.0f} RoIs per image), "
                         f"ms per image:\n\n{breakdown_markdown(r)}" for r in shown) + "\n"


def runtime_markdown(runtimes: dict[str, dict[str, Any]]) -> str:
    """One line per part of the artifact, from its last accepted from-scratch run (never a cached one)."""
    lines = []
    for command, runtime in runtimes.items():
        steps = ", ".join(f"{s['name']} {s['seconds']} s" for s in runtime["steps"])
        cpu = cpu_label(runtime["cpu"], runtime.get("cpu_isa"))
        lines.append(f"- `{command}`: {runtime['total_seconds'] / 60:.1f} minutes from scratch on {cpu} "
                     f"({runtime['threads_available']} cores available, no GPU): {steps}.")
    return "\n".join(lines) + "\n"


def runtime_compact_markdown(runtimes: dict[str, dict[str, Any]]) -> str:
    """The front page's runtime line: each part's total from its last accepted from-scratch run."""
    return "\n".join(f"- `{command}`: {runtime['total_seconds'] / 60:.0f} minutes from scratch on "
                     f"{cpu_label(runtime['cpu'], runtime.get('cpu_isa'))} ({runtime['threads_available']} cores, "
                     "no GPU)" for command, runtime in runtimes.items()) + "\n"


def table1_compact_section(table: dict[str, Any]) -> str:
    """The front page's Table 1 with its protocol in one line (from the table's own protocol)."""
    p = table.get("protocol", {})
    boot = p.get("bootstrap", {})
    caption = (f"COCO AP (%) of the embedded default on the {p.get('num_images', '?')} images of its "
               f"`{p.get('split', '?')}` split; the paper's DETR-R50 on COCO val2017 beside it. Δ is against uniform "
               f"at the same precision, with a paired bootstrap {100 * boot.get('level', 0.95):g}% interval over "
               f"the val images ({boot.get('n_boot', '?')} resamples).")
    return caption + "\n\n" + table1_compact_markdown(table)


PLURAL = {"holds": "hold", "does not hold": "do not hold"}


def claims_summary_markdown(claims: dict[str, Any]) -> str:
    """One line: how many of the paper's claims, and of the claims beyond it, hold on this run."""
    parts = []
    for beyond, what in ((False, "claims from the paper"), (True, "beyond the paper")):
        rows = [c for c in claims["claims"] if c.get("beyond_paper", False) == beyond]
        counts = ", ".join(f"{sum(c['verdict'] == v for c in rows)} {PLURAL.get(v, v)}" for v in VERDICTS)
        parts.append(f"of the {len(rows)} {what}, {counts}")
    return f"On this run, {parts[0]}; {parts[1]} (`results/{results_name('claims.json')}`).\n"


# Why each tolerance of ``reproduction.Tolerances`` is as large as it is; its value comes from the code.
TOLERANCE_REASONS: dict[str, tuple[str, str]] = {
    "ap_points": ("Table 1 rows, the uniform curve: AP (points)",
                  "on another CPU or thread count float sums run in another order; that can flip an ILP tie for one "
                  "layer, which moves AP by hundredths; below Table 1's printed precision"),
    "avg_bits": ("Table 1 rows: average bits", "a flipped tie moves one layer, a small share of the weights"),
    "bitmap_share": ("bit maps: share of weights with the same bits (at least)",
                     "a flipped tie moves one layer, a small share of the weights"),
    "trace_rel": ("per-layer traces: max relative difference over layers whose \\|trace\\| exceeds its stderr",
                  "well above the relative drift between CPU runs (the report's trace lines show it); noise-level "
                  "layers have no digits to compare"),
    "trace_floor": ("per-layer traces: not compared below this fraction of the file's largest",
                    "float32 rounding of a zero (the first decoder self-attention sees an all-zero target: its "
                    "trace is rounding noise that differs between CPUs)"),
    "rho": ("notebook 05's Spearman ρ", "a tie flip in a measured cost moves it by less"),
    "latency_band": ("INT8 latency ratio, regenerated / committed (AP and sizes: exact)",
                     "serialized bytes are fixed; timings vary with load and the CPU's int8 instructions"),
}


def tolerances_markdown(tolerances: Tolerances = Tolerances()) -> str:
    """The reproduction report's tolerances (``detrq.artifact.reproduction.Tolerances``) with their reasons."""
    lines = ["| what | tolerance | why that much |", "|---|---:|---|"]
    for key, value in tolerances.describe().items():
        what, why = TOLERANCE_REASONS.get(key, (key, "-"))
        shown = f"x{value[0]:g} to x{value[1]:g}" if isinstance(value, (tuple, list)) else f"{value:g}"
        lines.append(f"| {what} | {shown} | {why} |")
    lines.append("| claims: verdict | the same | a claim is a conclusion: no tolerance |")
    return "\n".join(lines) + "\n"


def reproduction_markdown(report: dict[str, Any]) -> str:
    """The report of the run that the committed results come from, against the results committed before it."""
    c = report["counts"]
    lines = [f"The committed results come from a run on "
             f"{cpu_label(report['cpu'], report.get('cpu_isa'))} whose report said **{report['verdict']}** "
             f"against the results committed before it: {c['identical']} numbers identical, "
             f"{c['within tolerance']} within tolerance, {c['differs']} differ, {c['not run']} not run "
             f"(`results/reproduction_accepted.json`)."]
    shown = [line for line in report["lines"] if line["verdict"] in ("within tolerance", "differs")]
    if shown:
        lines += ["", "| number | committed before | regenerated | verdict |", "|---|---:|---:|---|"]
        lines += [f"| {line['item']} | {_cell(line['committed'])} | {_cell(line['regenerated'])} | {line['verdict']} |"
                  for line in shown]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def sensitivity_markdown(check: dict[str, Any]) -> str:
    """Notebook 05's verdicts: each default scheme's rank agreement with the measured costs, the Eq. (5) split,
    the negative_traces choice and the first-order metric's targets."""
    policy = check["negative_traces"]
    lines = ["| scheme | rho vs measured Eq. (5) rise, 4 bits | pooled over 3-7 bits | vs val AP drop, 4 bits |",
             "|---|---:|---:|---:|"]
    for r in check["rho_default"]:
        cells = []
        for truth, bits in (("rise", 4), ("rise", None), ("ap-drop", 4)):
            row = rho_lookup(check["rows"], r["scheme"], policy, truth, bits)
            cells.append("-" if row is None else f"{row['rho']:.2f} [{row['low']:.2f}, {row['high']:.2f}]")
        lines.append(f"| {r['scheme']} | " + " | ".join(cells) + " |")
    d = check["decomposition"]
    choice = check["policy_choice"]
    lines += ["", f"With one layer at {d['bits']} bits, the L1 box term is a median {d['median_l1_share']:.1%} "
                  f"(minimum {d['min_l1_share']:.1%}) of the measured Eq. (5) rise. negative_traces: `{policy}` "
                  f"(best by mean pooled rho: `{choice['best']}`; "
                  + ", ".join(f"{p} {v:.3f}" for p, v in choice["mean_pooled_rho"].items()) + ").", ""]
    lines += [f"- **{'met' if t['met'] else 'missed'}**: {t['target']}: {t['value']}" for t in check["targets"]]
    return "\n".join(lines) + "\n"


def convergence_markdown(check: dict[str, Any]) -> str:
    """Notebook 02's convergence check: per scheme and budget, the worst bit-map agreement over probe seeds."""
    if not check["schemes"]:
        return f"Not compared: {unchecked_note(check)}.\n"
    targets = list(next(iter(check["schemes"].values())))
    lines = ["| scheme | stable | " + " | ".join(f"{t}-bit agreement / objective spread" for t in targets) + " |",
             "|---|---|" + "---:|" * len(targets)]
    for scheme, by_target in check["schemes"].items():
        lines.append(f"| {scheme} | {'yes' if check['stable'][scheme] else 'no'} | " + " | ".join(
            f"{by_target[t]['min_agreement']:.1%} / {by_target[t]['objective_spread']:.1%}" for t in targets) + " |")
    return "\n".join(lines) + f"\n\n{check['seeds']} probe seeds; stable means >= " \
        f"{check['min_agreement_required']:.0%} of the quantized weights get the same bits under every pair of " \
        f"seeds and the ILP objectives lie within {check['max_objective_spread']:.0%}." + \
        (f" Not compared: {unchecked_note(check)}.\n" if check.get("unchecked") else "\n")


def table2_section(table: dict[str, Any]) -> str:
    """Table 2 and the moonshot's verdict (within 1 AP point of float at 4 average bits)."""
    shot = table["moonshot"]
    text = table2_markdown(table)
    if shot["best"] is not None:
        best = shot["best"]
        verdict = "holds" if shot["holds"] else "does not hold"
        text += (f"\nMoonshot (a 4-bit row within 1 AP point of float): **{verdict}**"
                 f"; the best 4-bit row is {best['quantizer']} with {best['source']}, {shot['gap_points']:.1f} points "
                 "below float.\n")
    return text


def _section(results: Path, name: str, render: Callable[[Any], str]) -> str:
    path = results_file(results, name)
    return render(read_json(path)) if path.is_file() else _missing(name)


SECTIONS: tuple[str, ...] = (
    "table1-compact", "claims-summary", "runtime-compact",  # README.md, the front page
    "table1", "claims", "sensitivity", "convergence", "quant-curve", "table2",  # docs/results.md
    "int8", "int8-breakdown",  # docs/int8.md (the INT8 table also in docs/results.md)
    "runtime", "reproduction", "tolerances", "claim-commands",  # docs/reproducing.md
)


def sections(results_dir: str | Path) -> dict[str, str]:
    """The text of every generated section (``SECTIONS``), from the files in ``results_dir``."""
    results = Path(results_dir)
    int8 = sorted(kind_dir(results, "int8").glob("int8_*.json"))
    runtimes = {command: read_json(results_file(results, f"runtime_{run}.json"))
                for run, command in RUN_COMMANDS.items() if results_file(results, f"runtime_{run}.json").is_file()}
    text = {
        "table1-compact": _section(results, "table1.json", table1_compact_section),
        "claims-summary": _section(results, "claims.json", claims_summary_markdown),
        "runtime-compact": runtime_compact_markdown(runtimes) if runtimes else _missing("runtime_default.json"),
        "table1": _section(results, "table1.json", table1_markdown),
        "claims": _section(results, "claims.json", lambda d: claims_markdown(d["claims"])),
        "sensitivity": _section(results, "sensitivity_check.json", sensitivity_markdown),
        "convergence": _section(results, "seed_stability.json", convergence_markdown),
        "quant-curve": _section(results, "quant_curve.json", quant_curve_markdown),
        "table2": _section(results, "table2.json", table2_section),
        "int8": int8_markdown([read_json(p) for p in int8]) if int8 else _missing("int8_*.json"),
        "int8-breakdown": int8_breakdown_markdown([read_json(p) for p in int8]) if int8 else _missing("int8_*.json"),
        "runtime": runtime_markdown(runtimes) if runtimes else _missing("runtime_default.json"),
        "reproduction": _section(results, "reproduction_accepted.json", reproduction_markdown),
        "tolerances": tolerances_markdown(),
        "claim-commands": claim_commands_markdown(results),
    }
    assert tuple(text) == SECTIONS
    return text


def doc_files(root: str | Path) -> list[Path]:
    """The pages whose generated sections ``python -m detrq readme`` fills: README.md and docs/*.md."""
    root = Path(root)
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def fill_sections(text: str, bodies: dict[str, str], where: str = "text") -> tuple[str, list[str]]:
    """``text`` with every generated section's body replaced by ``bodies[name]``; returns it and the names found.

    A marker whose name has no body, or a BEGIN without its END, is an error naming ``where``.
    """
    found: list[str] = []
    opened: str | None = None
    for m in MARKER.finditer(text):
        kind, name = m.groups()
        if name not in bodies:
            raise DetrqError(f"{where}: unknown generated section {name!r}; the sections are {', '.join(bodies)} "
                             "(detrq/artifact/readme.py)")
        if kind == "BEGIN":
            if opened is not None:
                raise DetrqError(f"{where}: section {opened!r} has no END marker before {name!r} begins")
            opened = name
        elif opened != name:
            raise DetrqError(f"{where}: END of {name!r} without its BEGIN")
        else:
            found.append(name)
            opened = None
    if opened is not None:
        raise DetrqError(f"{where}: section {opened!r} has no END marker")
    filled = []

    def body(m: re.Match[str]) -> str:
        filled.append(m.group(2))
        return m.group(1) + bodies[m.group(2)] + m.group(3)

    text = SECTION.sub(body, text)
    if filled != found:
        raise DetrqError(f"{where}: a BEGIN generated marker must end its line (found {found}, filled {filled})")
    return text, found


def update_readme(target: str | Path | Iterable[str | Path], results_dir: str | Path) -> dict[Path, list[str]]:
    """Rewrite the generated sections in place, from ``results_dir``; returns ``{page: names of its sections}``.

    ``target`` is the repository root (README.md and docs/*.md), one page, or a list of pages. A page is written
    (atomically) only when its text changes.
    """
    if isinstance(target, (str, Path)):
        target = Path(target)
        pages = doc_files(target) if target.is_dir() else [target]
    else:
        pages = [Path(p) for p in target]
    bodies = sections(results_dir)
    updated: dict[Path, list[str]] = {}
    for page in pages:
        if not page.is_file():
            raise DetrqError(f"{page}: no such page to regenerate")
        text = page.read_text()
        new, found = fill_sections(text, bodies, str(page))
        updated[page] = found
        if new != text:
            tmp = page.with_name(f".{page.name}.tmp")
            tmp.write_text(new)
            tmp.replace(page)
    return updated
