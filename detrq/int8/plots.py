"""Figures of float-vs-int8 behaviour: activation maps, difference maps, hexbins and per-layer SQNR.

Each ``plot_*`` function takes the data (``LayerDiff`` lists, paired scores) and a path, writes one PNG and
returns the path; the data behind a figure is what tests check, since images are not compared. ``layer_figures``
draws all four for any FX-quantized CNN: a classifier, or a detector's backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers, CI or papermill kernels
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from detrq.int8.activations import LayerDiff, compare_layers, fused_float_reference  # noqa: E402

_ROWS = (("float_map", "float", "viridis"), ("int8_map", "int8", "viridis"),
         ("abs_diff_map", "|float - int8|", "magma"), ("rel_diff_map", "relative diff (%)", "magma"))


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight", metadata={"Software": None})  # no version line: reruns match
    plt.close(fig)
    return path


def plot_first_layer(image: Tensor, diff: LayerDiff, path: str | Path) -> Path:
    """The input image and the first conv layer's channel-averaged maps: float, int8, absolute and relative diff."""
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.2))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title("input")
    for ax, (key, title, cmap) in zip(axes[1:], _ROWS):
        im = ax.imshow(getattr(diff, key).numpy(), cmap=cmap)
        ax.set_title(f"{diff.name}: {title}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"first conv layer, SQNR {diff.sqnr_db:.1f} dB")
    return _save(fig, path)


ISOLATED = "each int8 layer fed the float input"


def plot_layer_maps(diffs: Sequence[LayerDiff], path: str | Path, feed: str = ISOLATED) -> Path:
    """Every conv layer (columns) x float map, int8 map, absolute diff, relative diff % (rows); ``feed`` says
    what each int8 layer was given (the title)."""
    fig, axes = plt.subplots(4, len(diffs), figsize=(1.25 * len(diffs), 5.6), squeeze=False)
    for col, d in enumerate(diffs):
        for row, (key, title, cmap) in enumerate(_ROWS):
            ax = axes[row, col]
            m = getattr(d, key).numpy()
            ax.imshow(m, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if key == "rel_diff_map":
                ax.set_xlabel(f"{m.mean():.1f}%", fontsize=7)
            if col == 0:
                ax.set_ylabel(title, fontsize=8)
        axes[0, col].set_title(d.name.replace("body.", "").replace("fpn.", "fpn\n"), fontsize=6)
    fig.suptitle(f"channel-averaged activations per conv layer, {feed}", fontsize=10)
    return _save(fig, path)


def plot_hexbins(diffs: Sequence[LayerDiff], scores: tuple[np.ndarray, np.ndarray] | None, path: str | Path,
                 max_points: int = 20000, scores_label: str = "detection scores") -> Path:
    """Float vs int8 activations per layer (log-count hexbins) and, for a detector, float vs int8 detection
    scores (last panel, titled ``scores_label``)."""
    panels = [(d.name, d.float_values.numpy(), d.int8_values.numpy()) for d in diffs]
    if scores is not None:
        panels.append((scores_label, scores[0], scores[1]))
    cols = min(6, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.3 * rows), squeeze=False)
    for ax, (name, f, q) in zip(axes.flat, panels):
        # Strided subsample: keeps the plot light and deterministic.
        step = max(1, len(f) // max_points)
        f, q = f[::step], q[::step]
        ax.hexbin(f, q, gridsize=40, bins="log", cmap="viridis", mincnt=1)
        lo, hi = float(min(f.min(), q.min())), float(max(f.max(), q.max()))
        ax.plot([lo, hi], [lo, hi], "r-", lw=0.5)
        ax.set_title(name.replace("body.", ""), fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.supxlabel("float")
    fig.supylabel("int8")
    return _save(fig, path)


def plot_sqnr(diffs: Sequence[LayerDiff], path: str | Path, feed: str = ISOLATED) -> Path:
    """Per-layer SQNR (dB) of each int8 layer (fed as ``feed`` says); higher is better."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(diffs)), 3.5))
    ax.bar(range(len(diffs)), [d.sqnr_db for d in diffs], color="tab:blue")
    ax.set_xticks(range(len(diffs)), [d.name.replace("body.", "") for d in diffs], rotation=75, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"int8 vs float, per conv layer ({feed})", fontsize=9)
    return _save(fig, path)


def layer_figures(float_cnn: nn.Module, int8_cnn: nn.Module, x: Tensor, image: Tensor,
                  scores: tuple[np.ndarray, np.ndarray] | None, fig_dir: str | Path, prefix: str) -> dict:
    """The four layer figures of an FX-quantized CNN (``int8_cnn``, the int8 twin of ``float_cnn``) on one input
    batch ``x`` of size 1 (``image``: the picture it came from, shown beside the first layer); ``scores``: the
    detection-score pairs for a detector, None for a classifier. Returns per-layer SQNR and the file names."""
    diffs = compare_layers(fused_float_reference(float_cnn), int8_cnn, x)
    return draw_layer_figures(diffs, image, scores, fig_dir, prefix)


def draw_layer_figures(diffs: Sequence[LayerDiff], image: Tensor, scores: tuple[np.ndarray, np.ndarray] | None,
                       fig_dir: str | Path | None, prefix: str, feed: str = ISOLATED,
                       scores_label: str = "detection scores") -> dict:
    """The four layer figures of ``diffs`` (none where ``fig_dir`` is None) and the numbers behind them."""
    paths = [] if fig_dir is None else [
        plot_first_layer(image, diffs[0], Path(fig_dir) / f"{prefix}_first_layer.png"),
        plot_layer_maps(diffs, Path(fig_dir) / f"{prefix}_layer_maps.png", feed),
        plot_hexbins(diffs, scores, Path(fig_dir) / f"{prefix}_hexbin.png", scores_label=scores_label),
        plot_sqnr(diffs, Path(fig_dir) / f"{prefix}_sqnr.png", feed),
    ]
    return {"sqnr_db": {d.name: d.sqnr_db for d in diffs},
            "mean_rel_diff_pct": {d.name: float(d.rel_diff_map.mean()) for d in diffs},
            "min_sqnr_layer": min(diffs, key=lambda d: d.sqnr_db).name,
            "median_sqnr_db": float(np.median([d.sqnr_db for d in diffs])),
            "figures": [p.name for p in paths]}
