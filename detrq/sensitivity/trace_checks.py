"""Checks of the project's own files where they are read: traces files (and measured-costs files, which
``allocate`` takes in their place).

A traces file is what ``pipeline.run_traces`` writes: ``metric``, ``layers`` and, per layer, a
``TraceEstimate.to_dict()`` (``trace``, ``avg_trace``, ``stderr``, ``n_probes``, ``numel``, ``samples``), or for
the first-order metric ``{"kl": estimate, "jacobian": row-norm sum}`` plus ``l1_scale``, or for ModelOpt's score
``{bits: estimate}``. ``check_traces``
checks the schema, that every value is finite, that ``trace``/``avg_trace``/``numel``/``stderr`` agree with each
other and with the samples, and (given the model's layers) that every layer is a quantizable layer of the model
with the recorded ``numel``. Every problem is collected and reported in one ``DetrqError`` line.

Bit maps are checked by ``quant.load_bit_map``/``validate_bit_map`` (known layers, bits in ``MIN_BITS..MAX_BITS``)
and parameter files by ``notebooks.load_parameters`` (unknown keys are an error listing the known ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from detrq.io.errors import DetrqError
from detrq.sensitivity import ALL_METRICS, FIRST_ORDER
from detrq.sensitivity.modelopt import MODELOPT

ESTIMATE_KEYS = ("trace", "avg_trace", "stderr", "n_probes", "numel")
JACOBIAN_KEYS = ("sum", "stderr", "n_probes", "n_rows")
REL_TOL = 1e-6  # stored floats round-trip exactly through JSON; this only absorbs summation order


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _close(a: float, b: float, scale: float = 0.0) -> bool:
    return abs(a - b) <= REL_TOL * max(abs(a), abs(b), scale) + 1e-300


def _samples(entry: Mapping[str, Any], problems: list[str], where: str) -> list[float] | None:
    samples = entry.get("samples")
    if samples is None:
        return None
    if not isinstance(samples, list) or not all(_number(s) for s in samples):
        problems.append(f"{where}: samples are not a list of finite numbers")
        return None
    if len(samples) != entry["n_probes"]:
        problems.append(f"{where}: {len(samples)} samples but n_probes {entry['n_probes']}")
        return None
    return samples


def _check_estimate(entry: Any, where: str, problems: list[str], numel: int | None) -> None:
    if not isinstance(entry, Mapping) or any(k not in entry for k in ESTIMATE_KEYS):
        problems.append(f"{where}: needs {', '.join(ESTIMATE_KEYS)}")
        return
    bad = [k for k in ("trace", "avg_trace") if not _number(entry[k])]
    bad += [k for k in ("n_probes", "numel") if not _count(entry[k])]
    stderr = entry["stderr"]
    if not (_number(stderr) and stderr >= 0) and not (stderr == math.inf and entry["n_probes"] == 1):
        bad.append("stderr")
    if bad:
        problems.append(f"{where}: {', '.join(f'{k} {entry[k]!r}' for k in bad)} (need finite numbers, stderr >= 0, "
                        "positive integer counts)")
        return
    if numel is not None and entry["numel"] != numel:
        problems.append(f"{where}: numel {entry['numel']} but the model's layer has {numel} weights")
    if not _close(entry["avg_trace"], entry["trace"] / entry["numel"]):
        problems.append(f"{where}: avg_trace {entry['avg_trace']!r} is not trace / numel "
                        f"({entry['trace'] / entry['numel']!r})")
    samples = _samples(entry, problems, where)
    if samples:
        n = len(samples)
        mean = math.fsum(samples) / n
        scale = max(abs(s) for s in samples)
        if not _close(entry["trace"], mean, scale):
            problems.append(f"{where}: trace {entry['trace']!r} is not the mean of its samples ({mean!r})")
        elif n > 1:
            stderr_expected = math.sqrt(math.fsum((s - mean) ** 2 for s in samples) / (n - 1) / n)
            if not _close(stderr, stderr_expected, REL_TOL * scale):
                problems.append(f"{where}: stderr {stderr!r} is not the samples' ({stderr_expected!r})")


def _check_jacobian(entry: Any, where: str, problems: list[str]) -> None:
    if not isinstance(entry, Mapping) or any(k not in entry for k in JACOBIAN_KEYS):
        problems.append(f"{where}: needs {', '.join(JACOBIAN_KEYS)}")
        return
    bad = [k for k in ("sum", "stderr") if not (_number(entry[k]) and entry[k] >= 0)]
    bad += [k for k in ("n_probes", "n_rows") if not _count(entry[k])]
    if bad:
        problems.append(f"{where}: {', '.join(f'{k} {entry[k]!r}' for k in bad)} (need finite numbers >= 0, "
                        "positive integer counts)")
        return
    samples = _samples(entry, problems, where)
    if samples:
        mean = math.fsum(samples) / len(samples)
        expected = mean if entry.get("estimator") == "rows" else math.sqrt(entry["n_rows"] * max(mean, 0.0))
        if not _close(entry["sum"], expected, REL_TOL * max(abs(s) for s in samples)):
            problems.append(f"{where}: sum {entry['sum']!r} does not follow from its samples ({expected!r})")


def _check_measured(layers: Mapping[str, Any], problems: list[str]) -> None:
    for name, per_bits in layers.items():
        if not isinstance(per_bits, Mapping) or not per_bits:
            problems.append(f"layer {name!r}: needs {{bits: {{'rise': ...}}}}")
            continue
        for b, v in per_bits.items():
            if not str(b).isdigit():
                problems.append(f"layer {name!r}: bit width {b!r} is not an integer")
            elif not isinstance(v, Mapping) or not _number(v.get("rise")):
                problems.append(f"layer {name!r} at {b} bits: 'rise' is not a finite number")


def check_traces(data: Any, source: str, layers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``data`` (a parsed traces or measured-costs file named ``source``) if it is sound; else one ``DetrqError``
    that names the file, counts the problems and gives the first few. ``layers`` ({name: weight tensor}, e.g.
    ``quant.quantizable_layers(model)``) also checks the layer names and sizes against the model."""
    if not isinstance(data, dict):
        raise DetrqError(f"{source} is not a traces file (a JSON object); pass a file written by `detrq traces`")
    metric = data.get("metric", "measured" if "reference_bits" in data else None)
    entries = data.get("layers")
    if metric not in (*ALL_METRICS, MODELOPT, "measured") or not isinstance(entries, Mapping) or not entries:
        raise DetrqError(f"{source} is not a traces file (metric {metric!r}, {'no' if not entries else 'bad'} "
                         "'layers'); pass a file written by `detrq traces` or a measured-costs file")
    problems: list[str] = []
    if layers is not None:
        unknown = [n for n in entries if n not in layers]
        if unknown:
            problems.append(f"{len(unknown)} layers are not quantizable layers of this model (first: {unknown[0]!r})")
    if metric == "measured":
        _check_measured(entries, problems)
    for name, entry in entries.items() if metric != "measured" else ():
        numel = layers[name].numel() if layers is not None and name in layers else None
        if metric == FIRST_ORDER:
            if not isinstance(entry, Mapping) or set(entry) != {"kl", "jacobian"}:
                problems.append(f"layer {name!r}: needs exactly 'kl' and 'jacobian'")
                continue
            _check_estimate(entry["kl"], f"layer {name!r} kl", problems, numel)
            _check_jacobian(entry["jacobian"], f"layer {name!r} jacobian", problems)
        elif metric == MODELOPT:
            if not isinstance(entry, Mapping) or not entry or not all(str(b).isdigit() for b in entry):
                problems.append(f"layer {name!r}: needs {{bits: estimate}}")
                continue
            for b, estimate in entry.items():
                _check_estimate(estimate, f"layer {name!r} at {b} bits", problems, numel)
        else:
            _check_estimate(entry, f"layer {name!r}", problems, numel)
    if metric == FIRST_ORDER and not (_number(data.get("l1_scale")) and data["l1_scale"] > 0):
        problems.append(f"l1_scale {data.get('l1_scale')!r} is not a positive finite number")
    if problems:
        raise DetrqError(f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in this traces file: "
                         f"{'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}; recompute it with "
                         "`detrq traces` (or notebook 01)")
    return data
