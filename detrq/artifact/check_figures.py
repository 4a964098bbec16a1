"""The sensitivity check's figures (notebook 05): predicted vs measured per-layer costs, and Eq. (5)'s parts.

* ``plot_predicted_vs_measured``: one log-log panel per scheme, predicted omega_l(b) against the measured Eq. (5)
  rise, one point per (layer, bits), coloured by bits, with Spearman's rho in the title; a non-positive prediction
  (which a log axis cannot show) is drawn as a marker on the panel's left edge and counted.
* ``plot_eq5_decomposition``: per layer, the measured rise at one bit width split into its KL and L1 parts.
Files are saved with ``plots.save_figure`` (fixed metadata, atomic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure

from detrq.artifact.figures import save_figure


def scatter_data(predicted: Mapping[str, Mapping[int, float]], measured: Mapping[str, Mapping[int, float]]
                 ) -> dict[str, Any]:
    """The points of one panel: ``{"bits", "x", "y", "nonpositive"}`` over (layer, bits) pairs in both tables
    (x = predicted, y = measured; pairs with a measured cost <= 0 are left out of the log plot and counted)."""
    points = [(b, predicted[n][b], measured[n][b]) for n in predicted if n in measured
              for b in sorted(predicted[n]) if b in measured[n]]
    shown = [(b, x, y) for b, x, y in points if y > 0]
    return {"bits": [b for b, _, _ in shown], "x": [x for _, x, _ in shown], "y": [y for _, _, y in shown],
            "nonpositive_predicted": sum(x <= 0 for _, x, _ in shown),
            "nonpositive_measured": len(points) - len(shown)}


def plot_predicted_vs_measured(panels: Mapping[str, dict[str, Any]], stem: str | Path) -> list[Path]:
    """One panel per entry ``{title: scatter_data(...) | {"rho": ...}}``."""
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    cmap = colormaps["viridis"]
    for ax, (title, d) in zip(axes, panels.items()):
        positive = [x for x in d["x"] if x > 0]
        edge = min(positive) / 10 if positive else 1e-12
        xs = [x if x > 0 else edge for x in d["x"]]
        bits = sorted(set(d["bits"]))
        for b in bits:
            idx = [i for i, bb in enumerate(d["bits"]) if bb == b]
            color = cmap((b - bits[0]) / max(1, bits[-1] - bits[0]))
            ax.scatter([xs[i] for i in idx], [d["y"][i] for i in idx], s=10, color=color, label=f"{b} bits",
                       marker="o", alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        note = f"; {d['nonpositive_predicted']} predicted <= 0 at left edge" if d["nonpositive_predicted"] else ""
        rho = d.get("rho")
        ax.set_title(f"{title}\nrho {rho['rho']:.2f} [{rho['low']:.2f}, {rho['high']:.2f}]{note}" if rho else title,
                     fontsize=8)
        ax.set_xlabel("predicted omega_l(b)")
        ax.set_ylabel("measured Eq. (5) rise")
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_eq5_decomposition(data: Mapping[str, Any], stem: str | Path) -> list[Path]:
    """``sensitivity_check.eq5_decomposition``: stacked KL and L1 parts of each layer's measured rise."""
    n = len(data["layers"])
    fig = Figure(figsize=(max(8.0, 0.16 * n), 4.0))
    ax = fig.add_subplot()
    ax.bar(range(n), data["l1"], color="tab:orange", label="L1 box term")
    ax.bar(range(n), data["kl"], bottom=data["l1"], color="tab:blue", label="lambda_KL x KL term")
    ax.set_yscale("log")
    ax.set_xticks(range(n))
    ax.set_xticklabels([name.replace(".weight", "") for name in data["layers"]], rotation=90, fontsize=5)
    ax.set_ylabel(f"measured Eq. (5) rise, one layer at {data['bits']} bits")
    ax.set_title(f"L1 share of the rise: median {data['median_l1_share']:.4f}, min {data['min_l1_share']:.4f}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)
