"""Figures 1 and 2 of the paper from the results files: the data behind each figure, and the figure itself.

Figure 1: log10 of the averaged Hessian trace per layer for the three sensitivity metrics, layers in model
(official state-dict) order, with the backbone / encoder / decoder regions marked. Figure 2: the per-layer
bits that the ILP picks at the 5-bit average for each metric. The ``*_data`` functions hold everything a
figure shows, so tests check them (nbval does not compare images); the ``plot_*`` functions only draw.
Files are saved without timestamps so that a rerun on the same numbers gives the same bytes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from detrq.artifact.table1 import SCHEME_NAMES
from detrq.io.errors import DetrqError
from detrq.io.results import atomic_output
from detrq.quant.bitmaps import OTHER_REGION, layer_region
from detrq.sensitivity import METRICS

REGION_COLORS = {"backbone": "#e8e8e8", "encoder": "#dbe9f6", "decoder": "#fdebd3", OTHER_REGION: "#e5f5e0"}
METRIC_STYLE = {"loss": ("tab:red", "o"), "out-float": ("tab:blue", "s"), "out-quant": ("tab:green", "^"),
                "out-first-order": ("tab:purple", "D"), "measured": ("tab:gray", "x")}
# Fixed file metadata: no creation date in the PDF, no software/version line in the PNG.
SAVE_METADATA = {"pdf": {"CreationDate": None}, "png": {"Software": None}}


def region_spans(layers: list[str]) -> list[tuple[str, int, int]]:
    """Consecutive runs of one region as ``(region, first index, last index)``, in layer order."""
    spans: list[tuple[str, int, int]] = []
    for i, name in enumerate(layers):
        region = layer_region(name)
        if spans and spans[-1][0] == region:
            spans[-1] = (region, spans[-1][1], i)
        else:
            spans.append((region, i, i))
    return spans


def _common_layers(per_metric_layers: dict[str, list[str]]) -> list[str]:
    orders = {tuple(v) for v in per_metric_layers.values()}
    if len(orders) != 1:
        raise DetrqError("the metrics' results list different layers: recompute them on the same model")
    return list(orders.pop())


def negative_at(samples: list[float], level: float = 0.95) -> bool:
    """Whether the mean of ``samples`` lies below zero at ``level``: the upper end of its two-sided Student-t
    interval is negative (False for fewer than 2 samples or no spread)."""
    n = len(samples)
    if n < 2:
        return False
    sd = statistics.stdev(samples)
    if sd == 0:
        return statistics.fmean(samples) < 0
    from scipy.stats import t

    return statistics.fmean(samples) + t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) < 0


def figure1_data(traces: dict[str, dict[str, Any]], replicas: Sequence[dict[str, dict[str, Any]]] = ()
                 ) -> dict[str, Any]:
    """Per metric, the log10 averaged trace of every layer and its stderr bar in log space.

    A trace estimate can be zero or negative; its log does not exist, so it is listed in ``nonpositive`` and
    drawn as a marker at ``floor`` instead of being dropped or clipped. Of those, ``significant_negative`` are
    the layers whose per-probe samples, pooled over this estimate and the other probe seeds' (``replicas``, the
    same traces with other seeds), have a 95% t-interval below zero: the loss's own negative curvature there, not
    estimator noise. A bar's lower end ``log10(avg - stderr)`` does not exist when ``stderr >= avg``; then it
    reaches down to ``floor``.
    """
    metrics = [m for m in METRICS if m in traces]
    layers = _common_layers({m: list(traces[m]["layers"]) for m in metrics})
    per_metric = {}
    finite: list[float] = []
    for m in metrics:
        est = traces[m]["layers"]
        avg = [est[n]["avg_trace"] for n in layers]
        se = [est[n]["stderr"] / est[n]["numel"] for n in layers]
        log = [math.log10(a) if a > 0 else None for a in avg]
        upper = [math.log10(a + s) if a > 0 else None for a, s in zip(avg, se)]
        lower = [math.log10(a - s) if a > s else None for a, s in zip(avg, se)]
        finite += [v for v in log + lower if v is not None]
        pooled = [[*est[n].get("samples", []), *(x for rep in replicas if m in rep
                                                    for x in rep[m]["layers"][n].get("samples", []))]
                   for n in layers]
        nonpositive = [i for i, a in enumerate(avg) if a <= 0]
        per_metric[m] = {"avg_trace": avg, "stderr": se, "log10": log, "upper": upper, "lower": lower,
                         "nonpositive": nonpositive,
                         "significant_negative": [i for i in nonpositive if negative_at(pooled[i])],
                         "pooled_samples": len(pooled[0]) if pooled else 0,
                         "rel_stderr": [s / abs(a) if a else math.inf for a, s in zip(avg, se)]}
    floor = math.floor(min(finite)) - 1 if finite else 0.0
    return {"layers": layers, "regions": [layer_region(n) for n in layers], "spans": region_spans(layers),
            "floor": floor, "metrics": per_metric}


def figure2_data(allocations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per metric, the bits of every layer in model order and the achieved average (``{metric: allocation}``)."""
    metrics = [m for m in METRICS if m in allocations]
    targets = {allocations[m]["avg_bits_target"] for m in metrics}
    if len(targets) != 1:
        raise DetrqError(f"Figure 2 compares one budget; got targets {sorted(targets)}")
    layers = _common_layers({m: list(allocations[m]["bit_map"]) for m in metrics})
    return {"layers": layers, "regions": [layer_region(n) for n in layers], "spans": region_spans(layers),
            "target": targets.pop(), "bits_range": allocations[metrics[0]]["bits_range"],
            "bits": {m: [allocations[m]["bit_map"][n] for n in layers] for m in metrics},
            "avg_bits": {m: allocations[m]["avg_bits"] for m in metrics}}


def _shade_regions(ax: Any, spans: list[tuple[str, int, int]], label_y: float | None = None) -> None:
    for region, first, last in spans:
        ax.axvspan(first - 0.5, last + 0.5, color=REGION_COLORS[region], zorder=0, lw=0)
        if label_y is not None:
            ax.text((first + last) / 2, label_y, region, ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """``stem.png`` and ``stem.pdf``, each written atomically with fixed metadata."""
    paths = []
    for fmt in ("png", "pdf"):
        path = Path(f"{stem}.{fmt}")
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, metadata=SAVE_METADATA[fmt])
        paths.append(path)
    return paths


FIGURE1_NOTE = ("Markers at the bottom: estimates <= 0, which have no log. Filled: the probe samples pooled over the "
                "seeds lie below zero at 95% (t-interval), the loss's own negative curvature. Hollow: not "
                "distinguishable from zero, estimator noise.")


def plot_figure1(data: dict[str, Any], stem: str | Path) -> list[Path]:
    """Figure 1 from ``figure1_data``: log10 averaged traces per layer, one series per metric; estimates <= 0
    as markers at the bottom, filled where they are significantly negative and hollow where they are noise."""
    n = len(data["layers"])
    fig = Figure(figsize=(max(8.0, 0.12 * n), 5.2))
    ax = fig.add_subplot()
    _shade_regions(ax, data["spans"], label_y=1.01)
    floor = data["floor"]
    for k, (m, d) in enumerate(data["metrics"].items()):
        color, marker = METRIC_STYLE[m]
        # NaN where the log does not exist, so that the line breaks there instead of bridging the gap.
        y = [math.nan if v is None else v for v in d["log10"]]
        bottom = [floor if lo is None else lo for lo in d["lower"]]
        top = [math.nan if up is None else up for up in d["upper"]]
        yerr = [[v - b for v, b in zip(y, bottom)], [t - v for v, t in zip(y, top)]]
        label = SCHEME_NAMES[m]
        negative = d.get("significant_negative", [])
        noise = [i for i in d["nonpositive"] if i not in negative]
        if d["nonpositive"]:
            label += (f" ({len(d['nonpositive'])} of {n} estimates <= 0: {len(negative)} significantly < 0, "
                      f"{len(noise)} noise)")
        ax.errorbar(range(n), y, yerr=yerr, color=color, marker=marker, ms=3, lw=0.8, elinewidth=0.6, capsize=0,
                    label=label)
        # Side by side, so that several metrics' markers at one layer stay distinguishable.
        offset = (k - (len(data["metrics"]) - 1) / 2) * 0.25
        for idx, face in ((negative, color), (noise, "white")):
            if idx:
                ax.plot([i + offset for i in idx], [floor] * len(idx), ls="none", marker="v", color=color,
                        markerfacecolor=face, ms=4.5, mew=0.9, clip_on=False)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(bottom=floor - 0.2)
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("log10 averaged Hessian trace")
    # Below the axes, so that it covers no estimate; the note under it says what the bottom markers are.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=1, frameon=False)
    fig.text(0.01, 0.01, FIGURE1_NOTE, fontsize=6.5, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, stem)


def plot_figure2(data: dict[str, Any], stem: str | Path) -> list[Path]:
    """Figure 2 from ``figure2_data``: per-layer bits, one panel per metric."""
    n = len(data["layers"])
    metrics = list(data["bits"])
    fig = Figure(figsize=(max(8.0, 0.12 * n), 1.6 * len(metrics) + 0.8))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    lo, hi = data["bits_range"]
    for k, (ax, m) in enumerate(zip(axes, metrics)):
        _shade_regions(ax, data["spans"], label_y=1.02 if k == 0 else None)
        ax.bar(range(n), data["bits"][m], color=METRIC_STYLE.get(m, ("tab:olive", "."))[0], width=0.8, zorder=2)
        ax.set_ylim(lo - 1, hi + 0.5)
        ax.set_yticks(range(lo, hi + 1))
        ax.set_ylabel("bits")
        ax.set_title(f"{SCHEME_NAMES.get(m, m)} (average {data['avg_bits'][m]:.2f} bits, target {data['target']:g})",
                     fontsize=9, loc="left", pad=12 if k == 0 else 4)
    axes[-1].set_xlim(-0.5, n - 0.5)
    axes[-1].set_xlabel("layer (model order)")
    fig.tight_layout()
    return save_figure(fig, stem)


def _series_style(source: str, k: int) -> tuple[str, str]:
    palette = ("tab:orange", "tab:cyan", "tab:brown", "tab:pink", "tab:olive")
    if source == "uniform":
        return "black", "o"
    base = source.split("-fisher")[0].split("-ggn")[0]
    color, marker = METRIC_STYLE.get(source, METRIC_STYLE.get(base, (palette[k % len(palette)], ".")))
    return (palette[k % len(palette)], marker) if source != base else (color, marker)


# One line style per quantizer, so that a source's curves under different quantizers stay apart.
QUANTIZER_LINES = {"eq6": "-", "per-channel": "--", "gptq": ":"}


def plot_figure3(sweep: dict[str, Any], labels: dict[str, str], stem: str | Path) -> list[Path]:
    """Figure 3 (beyond the paper): AP against average bits and against the ideal packed size in MB, one curve
    per cost source (and uniform) with the full-front quantizer; the other quantizers' Measured Sen and uniform
    curves in their own line style with hollow markers. The legend sits below the panels, off the curves."""
    from detrq.artifact.pareto import MEASURED, QUANTIZER_NAMES, UNIFORM, front

    points = sweep["points"]
    full = sweep["settings"]["full_front"]
    fig = Figure(figsize=(12.0, 6.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, x_key, x_label in ((axes[0], "avg_bits", "average bits over quantized weights"),
                               (axes[1], "size_mb", "ideal packed size (MB)")):
        sources = list(dict.fromkeys(p["source"] for p in points))
        for k, source in enumerate(sources):
            color, marker = _series_style(source, k)
            for j, q in enumerate(sweep["quantizers"]):
                curve = front(points, q, source)
                if not curve or (q not in full and source not in (MEASURED, UNIFORM)):
                    continue
                name = "Uniform" if source == UNIFORM else labels.get(source, source)
                ls = QUANTIZER_LINES.get(q, ("-", "--", ":", "-.")[j % 4])
                ax.plot([p[x_key] for p in curve], [100 * p["AP"] for p in curve], color=color, marker=marker,
                        ms=4, lw=1.0 if q in full else 1.3, ls=ls, markerfacecolor=color if q in full else "white",
                        label=name if q in full else f"{name}, {QUANTIZER_NAMES.get(q, q)}")
        ax.axhline(100 * sweep["float"]["AP"], color="gray", lw=0.8, ls="-.", label="float")
        ax.set_xlabel(x_label)
        ax.set_ylabel("COCO AP (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=3, fontsize=7, frameon=False)
    return save_figure(fig, stem)


def plot_per_class(data: dict[str, Any], labels: dict[str, str], category_names: dict[str, str],
                   stem: str | Path) -> list[Path]:
    """Per-class AP drop against float of each scheme at one width (``pareto.per_class_losses``), classes
    sorted by their largest drop."""
    classes = data["classes"]
    sources = list(data["drops"])
    fig = Figure(figsize=(max(7.0, 0.7 * len(classes)), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(sources))
    for k, source in enumerate(sources):
        color, _ = _series_style(source, k)
        name = "Uniform" if source == "uniform" else labels.get(source, source)
        ax.bar([i + (k - (len(sources) - 1) / 2) * width for i in range(len(classes))],
               [100 * d for d in data["drops"][source]], width=width, color=color, label=name)
    ax.set_xticks(range(len(classes)), [category_names.get(c, c) for c in classes], rotation=45, ha="right",
                  fontsize=7)
    ax.set_ylabel("AP drop vs float (points)")
    ax.set_title(f"per-class AP loss at {data['target']:g} average bits ({data['quantizer']})", fontsize=9)
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    return save_figure(fig, stem)
