"""Beyond the paper: mAP against average bits and real size for every cost source and quantizer, and Table 2.

One sweep serves both. For each quantizer (``quant/quantizers.py``: eq6, per-channel, gptq) and each cost source (the
traces of every scheme, and Measured Sen measured with that quantizer) the ILP allocates bits at each target
average, every layer choosing from ``SweepSettings.bits`` (3-8: one range for the whole front, so that its points
are comparable), and the bit map is evaluated with that quantizer (cached like Table 1's evaluations).
Uniform quantization at each integer width is the baseline. ``results/pareto.json`` holds every point: AP,
average bits, the ideal packed size in MB (``quant.model_size_bits``: what ``packing.save_packed`` writes within
1%), the per-class AP and the bit map's file.

Table 2 reads the sweep at the targets 6, 5 and 4: one row per quantizer and source, Δ against uniform at the
same width with the same quantizer, and against float.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from detrq.artifact.pipeline import run_allocation, run_evaluation
from detrq.artifact.workers import EvaluationJob, run_evaluations
from detrq.data.coco import CocoDetection
from detrq.io.errors import DetrqError
from detrq.io.layout import kind_dir, results_file
from detrq.io.results import write_json_atomic, write_table_files
from detrq.models.detr import DETR
from detrq.parallel.launch import Launch
from detrq.quant.bitmaps import model_size_bits, quantizable_layers
from detrq.quant.codes import QUANTIZERS
from detrq.quant.quantizers import WeightQuantizer

UNIFORM = "uniform"
MEASURED = "measured"
TABLE2_TARGETS: tuple[float, ...] = (6.0, 5.0, 4.0)
PARETO_FILE = "pareto.json"
QUANTIZER_NAMES = {"eq6": "Eq. (6) per-tensor", "per-channel": "per-channel RTN", "gptq": "GPTQ per-channel"}


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep covers; flows from params/ (``pareto_*`` keys) to ``run_sweep``."""

    targets: tuple[float, ...] = (3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0)  # the front's budgets
    bits: tuple[int, int] = (3, 8)  # every layer's choices, inclusive
    uniform_bits: tuple[int, ...] = (3, 4, 5, 6, 7, 8)
    full_front: tuple[str, ...] = ("eq6",)  # quantizers swept over every target; the others at those of
    # ``targets`` that are Table 2's (6, 5, 4)
    negative_traces: str = "abs"
    batch_size: int = 8
    time_limit: float = 60.0
    device: str = "cpu"
    launch: Launch = Launch()  # torchrun ranks for the Eq. (6) evaluations (the full run), or workers side by side for
    # all of them; not in the results

    def __post_init__(self) -> None:
        lo, hi = self.bits
        if not 2 <= lo <= hi <= 16:
            raise DetrqError(f"pareto bits must be [lo, hi] with 2 <= lo <= hi <= 16, got {list(self.bits)}")
        outside = [t for t in self.targets if not lo <= t <= hi]
        if outside:
            raise DetrqError(f"pareto target {outside[0]} lies outside the bit range {lo}-{hi}")
        unknown = [q for q in self.full_front if q not in QUANTIZERS]
        if unknown:
            raise DetrqError(f"unknown quantizer {unknown[0]!r} in pareto_full_front; choose from "
                             f"{', '.join(QUANTIZERS)}")

    @property
    def bits_range(self) -> range:
        return range(self.bits[0], self.bits[1] + 1)

    def targets_for(self, quantizer: str) -> tuple[float, ...]:
        return self.targets if quantizer in self.full_front else tuple(t for t in self.targets if t in TABLE2_TARGETS)


@dataclass
class Point:
    """One evaluated bit map on a front."""

    quantizer: str
    source: str
    target: float
    avg_bits: float
    size_mb: float
    AP: float
    per_class: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _file_stem(quantizer: str, source: str, target: float) -> str:
    return f"{quantizer}_{source}_{target:g}bit"


def run_sweep(model: DETR, checkpoint_sha: str, dataset: CocoDetection, sources: Mapping[str, Mapping[str, Any]],
              quantizers: Mapping[str, WeightQuantizer], results_dir: str | Path, settings: SweepSettings,
              *, progress: bool = False) -> dict[str, Any]:
    """Allocate and evaluate every (quantizer, source, target) and uniform at every width; write pareto.json.

    ``sources[q]`` are quantizer q's cost sources ``{name: traces or measured-costs result}`` (its Measured Sen
    must have been measured with q: ``costs.cost_table`` checks it). Bit maps and evaluations are cached under
    ``results_dir/pareto/``.
    """
    out_dir = kind_dir(results_dir, "pareto")
    float_eval = run_evaluation(model, checkpoint_sha, dataset, {}, out_dir / "eval_float.json",
                                batch_size=settings.batch_size, device=settings.device, progress=progress,
                                label="float")
    mb = 1e6 * 8
    names = list(quantizable_layers(model))
    # Every point is allocated first, then all are evaluated (side by side when settings.launch has workers); per
    # quantizer, uniform comes first, then each source's targets.
    to_allocate = [(q, source, t, data) for q in quantizers for source, data in sources[q].items()
                   for t in settings.targets_for(q)]
    bit_maps = {(q, source, t): run_allocation(model, dict(data), t, settings.bits_range,
                                               out_dir / f"bitmap_{_file_stem(q, source, t)}.json",
                                               negative_traces=settings.negative_traces,
                                               time_limit=settings.time_limit, quantizer=quantizers[q])["bit_map"]
                for q, source, t, data in tqdm(to_allocate, desc="ILP allocations", unit="bit map",
                                               disable=not progress)}
    evaluations: list[tuple[str, str, float, dict[str, int]]] = []
    for q in quantizers:
        evaluations += [(q, UNIFORM, float(b), {n: b for n in names}) for b in settings.uniform_bits]
        evaluations += [(q, source, t, bit_map) for (q2, source, t), bit_map in bit_maps.items() if q2 == q]
    jobs = [EvaluationJob(bit_map, out_dir / f"eval_{_file_stem(q, source, t)}.json", f"{q} {source} {t:g}",
                          quantizer=quantizers[q]) for q, source, t, bit_map in evaluations]
    done = run_evaluations(model, checkpoint_sha, dataset, jobs, batch_size=settings.batch_size,
                           device=settings.device, launch=settings.launch, progress=progress)
    points = [Point(q, source, t, r["avg_bits"], model_size_bits(model, bit_map, quantizers[q]) / mb,
                    r["metrics"]["AP"], r["metrics"].get("per_class", {}))
              for (q, source, t, bit_map), r in zip(evaluations, done)]
    result = {
        "settings": {**{k: v for k, v in asdict(settings).items() if k != "launch"},
                     "bits_range": [settings.bits[0], settings.bits[1]]},
        "float": {"AP": float_eval["metrics"]["AP"], "size_mb": model_size_bits(model, {}) / mb,
                  "per_class": float_eval["metrics"].get("per_class", {})},
        "protocol": float_eval["protocol"], "checkpoint_sha256": checkpoint_sha,
        "quantizers": {q: quantizers[q].key for q in quantizers},
        "points": [p.to_dict() for p in points],
    }
    write_json_atomic(results_file(results_dir, PARETO_FILE), result)
    return result


def front(points: Sequence[Mapping[str, Any]], quantizer: str, source: str) -> list[Mapping[str, Any]]:
    """One curve of the sweep, by increasing average bits."""
    return sorted((p for p in points if p["quantizer"] == quantizer and p["source"] == source),
                  key=lambda p: p["avg_bits"])


def table2(sweep: Mapping[str, Any], labels: Mapping[str, str]) -> dict[str, Any]:
    """Table 2 from the sweep: at each of ``TABLE2_TARGETS``, every quantizer × source, Δ vs uniform (same
    quantizer, same width) and vs float. ``labels`` names the sources."""
    points = sweep["points"]
    uniform = {(p["quantizer"], p["target"]): p for p in points if p["source"] == UNIFORM}
    rows = []
    for t in TABLE2_TARGETS:
        for q in sweep["quantizers"]:
            base = uniform.get((q, t))
            for p in points:
                if p["quantizer"] != q or p["target"] != t:
                    continue
                rows.append({"precision": f"{t:g}-bit", "quantizer": q, "source": p["source"],
                             "label": "Uniform" if p["source"] == UNIFORM else labels.get(p["source"], p["source"]),
                             "AP": p["AP"], "avg_bits": p["avg_bits"], "size_mb": p["size_mb"],
                             "delta_uniform": None if base is None or p["source"] == UNIFORM
                             else p["AP"] - base["AP"],
                             "delta_float": p["AP"] - sweep["float"]["AP"]})
    return {"float": sweep["float"], "rows": rows, "protocol": sweep["protocol"],
            "moonshot": moonshot(rows, sweep["float"]["AP"])}


def moonshot(rows: Sequence[Mapping[str, Any]], float_ap: float) -> dict[str, Any]:
    """The issue's bar: some 4-bit row within 1 AP point of float. Reports the best 4-bit row and whether it holds."""
    four = [r for r in rows if r["precision"] == "4-bit" and r["source"] != UNIFORM]
    if not four:
        return {"holds": None, "best": None}
    best = max(four, key=lambda r: r["AP"])
    gap = 100 * (float_ap - best["AP"])
    return {"holds": gap <= 1.0, "gap_points": gap, "best": {k: best[k] for k in ("quantizer", "source", "AP")}}


def _fmt(v: float | None, scale: float = 100.0, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{scale * v:+.1f}" if signed else f"{scale * v:.1f}"


def table2_markdown(table: Mapping[str, Any]) -> str:
    """Table 2 as markdown: AP (%), Δ vs uniform and vs float in points, average bits and ideal size in MB."""
    lines = ["| Precision | Quantizer | Scheme | mAP (%) | Δ uniform | Δ float | avg bits | size (MB) |",
             "|---|---|---|---:|---:|---:|---:|---:|",
             f"| Float | - | - | {_fmt(table['float']['AP'])} | - | - | 32.00 | {table['float']['size_mb']:.3f} |"]
    for r in table["rows"]:
        lines.append(f"| {r['precision']} | {QUANTIZER_NAMES.get(r['quantizer'], r['quantizer'])} | {r['label']} | "
                     f"{_fmt(r['AP'])} | {_fmt(r['delta_uniform'], signed=True)} | "
                     f"{_fmt(r['delta_float'], signed=True)} | {r['avg_bits']:.2f} | {r['size_mb']:.3f} |")
    return "\n".join(lines) + "\n"


def write_table2(table: Mapping[str, Any], results_dir: str | Path) -> None:
    """``table2.json``, ``table2.csv`` and ``table2.md`` in ``results_dir/tables/``, each written atomically."""
    buf = io.StringIO()
    fields = ["precision", "quantizer", "source", "label", "AP", "delta_uniform", "delta_float", "avg_bits",
              "size_mb"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table["rows"])
    write_table_files(results_dir, "table2", table, {"csv": buf.getvalue(), "md": table2_markdown(table)})


def per_class_losses(sweep: Mapping[str, Any], quantizer: str = "eq6", target: float = 4.0) -> dict[str, Any]:
    """Per-class AP drop against float of every scheme at ``target`` bits with ``quantizer`` (the follow-up
    paper's critical-category view): ``{"classes": [...] sorted by the largest drop, "drops": {source: [...]}}``."""
    float_pc = sweep["float"]["per_class"]
    chosen = [p for p in sweep["points"] if p["quantizer"] == quantizer and p["target"] == target]
    if not chosen:
        raise DetrqError(f"the sweep has no {target:g}-bit points for quantizer {quantizer!r}")
    classes = [c for c in float_pc if float_pc[c] is not None]
    drops = {p["source"]: [float_pc[c] - (p["per_class"].get(c) or 0.0) for c in classes] for p in chosen}
    worst = [max(d[i] for d in drops.values()) for i in range(len(classes))]
    order = sorted(range(len(classes)), key=lambda i: -worst[i])
    return {"quantizer": quantizer, "target": target, "classes": [classes[i] for i in order],
            "drops": {s: [d[i] for i in order] for s, d in drops.items()}}
