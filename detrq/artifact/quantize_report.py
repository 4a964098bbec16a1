"""The report of ``detrq quantize``: one JSON object with everything the run decided and measured, and its Markdown.

JSON (``format`` ``detrq-quantize-report/1``): the checkpoint and data it started from, the recipe and why it is the
default, the bit map per layer and per region, the sizes (float, ideal packed, the file as written), float and
quantized COCO AP with the paired bootstrap CI of their difference, and the wall time of each step (cached steps
flagged). The Markdown shows the same, for people.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from torch import nn

from detrq.io.results import environment
from detrq.quant.bitmaps import REGIONS, OTHER_REGION, layer_region, model_size_bits, quantizable_layers
from detrq.quant.packing import PACK_MAX_BITS

FORMAT = "detrq-quantize-report/1"
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
STEP_NAMES = {"load": "load the checkpoint", "validate": "validate the data", "quantizer": "prepare the quantizer",
              "sensitivities": "sensitivities", "allocation": "ILP allocation", "evaluate_float": "float AP",
              "evaluate_quantized": "quantized AP", "bootstrap": "paired bootstrap", "pack": "packed checkpoint",
              "total": "total"}


def _regions(layers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for region in [r for r, _ in REGIONS] + [OTHER_REGION]:
        mine = [x for x in layers if x["region"] == region]
        if not mine:
            continue
        weights = sum(x["numel"] for x in mine)
        out[region] = {"layers": len(mine), "weights": weights,
                       "avg_bits": sum(x["bits"] * x["numel"] for x in mine) / weights,
                       "layers_at_bits": {str(b): n for b, n in sorted(Counter(x["bits"] for x in mine).items())}}
    return out


def report_json(*, model: nn.Module, ckpt: Any, source: Any, settings: Any, recipe_why: str, allocation: dict,
                quantizer: Any, evaluations: dict[str, dict], bootstrap: dict, packed: dict, steps: Any,
                traces: dict) -> dict[str, Any]:
    """The report object (module docstring) from the results of ``quantize``'s steps."""
    params = quantizable_layers(model)
    bit_map = allocation["bit_map"]
    layers = [{"name": n, "region": layer_region(n), "shape": list(p.shape), "numel": p.numel(), "bits": bit_map[n]}
              for n, p in params.items() if n in bit_map]
    delta = bootstrap["quantized|float"]
    return {
        "format": FORMAT,
        "checkpoint": {"path": str(source.checkpoint), "sha256": ckpt.sha256, "architecture": asdict(model.cfg),
                       "hf_backbone": ckpt.variant, "labels": "id2label" if ckpt.id2label else "class index = "
                       "category id"},
        "data": {"coco": str(source.coco), "eval_split": source.eval_split, "calib_split": source.calib_split,
                 "eval_images": evaluations["float"]["protocol"]["num_images"],
                 "hessian_images": len(traces["image_ids"]),
                 "protocol": evaluations["float"]["protocol"]},
        "recipe": {**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
                   "scheme": settings.scheme.name, "scheme_label": settings.scheme.label,
                   "quantizer_key": quantizer.key, "default_because": recipe_why},
        "allocation": {"avg_bits": allocation["avg_bits"], "objective": allocation["objective"],
                       "bit_map": bit_map},
        "regions": _regions(layers),
        "layers": layers,
        "size": {"float_bytes": model_size_bits(model, {}) / 8, "ideal_bytes": packed["ideal_bytes"],
                 "packed_file_bytes": packed["file_bytes"], "overhead": packed["overhead"],
                 "compression": packed["compression"], "parts": packed["parts"]},
        "ap": {"float": evaluations["float"]["metrics"], "quantized": evaluations["quantized"]["metrics"],
               "delta": {k: delta[k] for k in ("delta", "low", "high", "se", "p_le_0", "n_boot", "seed", "level",
                                                "n_images")}},
        "seconds": dict(steps.seconds), "cached": dict(steps.cached),
        "files": {"packed": "detr_packed.pth", "markdown": "report.md", "cache": "cache/"},
        "load_packed": "detrq.quant.packing.load_packed(path) -> (state_dict, meta); the state dict loads into the "
                       f"DETR of meta['architecture'] with strict=True (codes of 2..{PACK_MAX_BITS} bits)",
        "environment": environment(),
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def report_markdown(r: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    rec, ap, size, d = r["recipe"], r["ap"], r["size"], r["ap"]["delta"]
    lines = [
        f"# Mixed-precision DETR: {rec['avg_bits']:g} average bits",
        "",
        f"Checkpoint `{r['checkpoint']['path']}` (sha256 `{r['checkpoint']['sha256'][:12]}`, "
        f"{r['checkpoint']['architecture']['backbone']}), data `{r['data']['coco']}`: evaluated on "
        f"{r['data']['eval_images']} `{r['data']['eval_split']}` images; sensitivities on "
        f"{r['data']['hessian_images']} class-balanced `{r['data']['calib_split']}` images.",
        "",
        f"Recipe: **{rec['scheme_label']}** costs, **{rec['quantizer']}** quantizer, every layer {rec['bits'][0]}-"
        f"{rec['bits'][1]} bits, ILP at {rec['avg_bits']:g} average bits (reached {r['allocation']['avg_bits']:.3f}).",
        "",
        "| | float | quantized | Δ (95% CI, paired bootstrap) |",
        "|---|---:|---:|---:|",
        f"| mAP (%) | {_pct(ap['float']['AP'])} | {_pct(ap['quantized']['AP'])} | {100 * d['delta']:+.1f} "
        f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |",
        *[f"| {k} (%) | {_pct(ap['float'].get(k))} | {_pct(ap['quantized'].get(k))} | |" for k in METRIC_KEYS[1:]],
        "",
        f"The CI resamples the {d['n_images']} images {d['n_boot']} times (seed {d['seed']}); the quantized model is "
        f"no better than float in {100 * d['p_le_0']:.1f}% of the resamples.",
        "",
        "## Size",
        "",
        "| | MB |",
        "|---|---:|",
        f"| float32 | {_mb(size['float_bytes'])} |",
        f"| ideal packed (codes + scales + float rest) | {_mb(size['ideal_bytes'])} |",
        f"| packed file `detr_packed.pth` | {_mb(size['packed_file_bytes'])} ({100 * size['overhead']:+.2f}% over "
        f"ideal; {size['compression']:.2f}x smaller than float) |",
        "",
        "## Bits per region",
        "",
        "| region | layers | weights | average bits | layers at each width |",
        "|---|---:|---:|---:|---|",
        *[f"| {name} | {x['layers']} | {x['weights']:,} | {x['avg_bits']:.2f} | "
          f"{', '.join(f'{n}x{b}' for b, n in x['layers_at_bits'].items())} |" for name, x in r["regions"].items()],
        "",
        "Biases, norms, the class head and the last box layer stay in float.",
        "",
        "## Bits per layer",
        "",
        "| layer | region | weights | bits |",
        "|---|---|---:|---:|",
        *[f"| `{x['name']}` | {x['region']} | {x['numel']:,} | {x['bits']} |" for x in r["layers"]],
        "",
        "## Time of each step",
        "",
        "| step | seconds | |",
        "|---|---:|---|",
        *[f"| {STEP_NAMES.get(k, k)} | {v:.1f} | {'cached' if r['cached'].get(k) else ''} |"
          for k, v in r["seconds"].items()],
        "",
        "## Why this recipe is the default",
        "",
        rec["default_because"],
        "",
    ]
    return "\n".join(lines)
