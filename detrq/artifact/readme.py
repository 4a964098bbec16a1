"""Regenerates README.md's result sections from results/*.json, so no number in the README is typed by hand.

A generated section sits between ``<!-- BEGIN generated:NAME -->`` and ``<!-- END generated:NAME -->``;
everything outside the markers is hand-written prose and is left alone. A section whose results file is
missing says so instead of showing numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detrq.artifact.pareto import table2_markdown
from detrq.artifact.table1 import claims_markdown, table1_markdown
from detrq.io.results import read_json
from detrq.sensitivity.check import rho_lookup


def _missing(name: str) -> str:
    return f"_Not generated yet: `results/{name}` is missing; run `./reproduce.sh`._\n"


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
        lines.append(f"- `{command}`: {runtime['total_seconds'] / 60:.1f} minutes from scratch on {runtime['cpu']} "
                     f"({runtime['threads_available']} cores available, no GPU): {steps}.")
    return "\n".join(lines) + "\n"


def reproduction_markdown(report: dict[str, Any]) -> str:
    """The report of the run that the committed results come from, against the results committed before it."""
    c = report["counts"]
    lines = [f"The committed results come from a run on {report['cpu']} whose report said **{report['verdict']}** "
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
    targets = list(next(iter(check["schemes"].values())))
    lines = ["| scheme | stable | " + " | ".join(f"{t}-bit agreement / objective spread" for t in targets) + " |",
             "|---|---|" + "---:|" * len(targets)]
    for scheme, by_target in check["schemes"].items():
        lines.append(f"| {scheme} | {'yes' if check['stable'][scheme] else 'no'} | " + " | ".join(
            f"{by_target[t]['min_agreement']:.1%} / {by_target[t]['objective_spread']:.1%}" for t in targets) + " |")
    return "\n".join(lines) + f"\n\n{check['seeds']} probe seeds; stable means >= " \
        f"{check['min_agreement_required']:.0%} of the quantized weights get the same bits under every pair of " \
        f"seeds and the ILP objectives lie within {check['max_objective_spread']:.0%}.\n"


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
    path = results / name
    return render(read_json(path)) if path.is_file() else _missing(name)


def sections(results_dir: str | Path) -> dict[str, str]:
    """The text of every generated section, from the files in ``results_dir``."""
    results = Path(results_dir)
    int8 = sorted(results.glob("int8_*.json"))
    runtimes = {command: read_json(results / f"runtime_{run}.json")
                for run, command in (("default", "./reproduce.sh"), ("int8", "./reproduce.sh int8"))
                if (results / f"runtime_{run}.json").is_file()}
    return {
        "table1": _section(results, "table1.json", table1_markdown),
        "claims": _section(results, "claims.json", lambda d: claims_markdown(d["claims"])),
        "sensitivity": _section(results, "sensitivity_check.json", sensitivity_markdown),
        "convergence": _section(results, "seed_stability.json", convergence_markdown),
        "quant-curve": _section(results, "quant_curve.json", quant_curve_markdown),
        "table2": _section(results, "table2.json", table2_section),
        "runtime": runtime_markdown(runtimes) if runtimes else _missing("runtime_default.json"),
        "reproduction": _section(results, "reproduction_accepted.json", reproduction_markdown),
        "int8": int8_markdown([read_json(p) for p in int8]) if int8 else _missing("int8_*.json"),
        "int8-breakdown": int8_breakdown_markdown([read_json(p) for p in int8]) if int8 else _missing("int8_*.json"),
    }


def update_readme(readme: str | Path, results_dir: str | Path) -> list[str]:
    """Rewrite the generated sections of ``readme`` in place; returns the names of the sections found."""
    readme = Path(readme)
    text = readme.read_text()
    found = []
    for name, body in sections(results_dir).items():
        pattern = re.compile(rf"(<!-- BEGIN generated:{name} -->\n).*?(<!-- END generated:{name} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
            found.append(name)
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text)
    tmp.replace(readme)
    return found
