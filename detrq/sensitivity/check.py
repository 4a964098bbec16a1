"""Each sensitivity metric checked against the truth: predicted omega_l(b) against measured per-layer costs.

For every scheme (a metric estimated one way, ``pipeline.Scheme``) and every ``negative_traces`` policy, the
predicted cost table (``costs.cost_table``) is ranked against the measured one (``truth.run_measured_costs``):
Spearman's rho across layers with a bootstrap interval over layers, at each bit width and pooled over all
(layer, bits) pairs, against

* the measured rise of Eq. (5) with only that layer quantized, the rest in float (what Loss Sen, Out Sen Float
  and the first-order metric predict), and, for Out Sen Quant, the rise at its own expansion point (the rest at
  uniform 8 bits);
* the measured val AP drop at 3 and 4 bits.

``choose_policy`` names the policy whose predictions agree best with the measured Eq. (5) rise (mean pooled
rho over the paper's three metrics): the evidence behind the ``negative_traces`` default in params/.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from detrq.io.results import write_json_atomic
from detrq.sensitivity import FIRST_ORDER, METRICS
from detrq.sensitivity.costs import NEGATIVE_POLICIES, cost_table
from detrq.sensitivity.truth import measured_table, spearman_ci

# The truths each prediction is ranked against: the measured cost of Eq. (5) at a float reference, at the
# 8-bit reference (Out Sen Quant's point), and the val AP drop.
TRUTHS: tuple[str, ...] = ("rise", "rise-8bit", "ap-drop")


def predicted_tables(traces: Mapping[str, Mapping[str, Any]], weights: Mapping[str, Tensor], bits: Iterable[int],
                     policies: Sequence[str] = NEGATIVE_POLICIES) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """``{scheme: {policy: omega}}`` for every traces result and policy (the policy does nothing where every
    estimate is >= 0, e.g. ggn; it is still listed so that every scheme has a row per policy)."""
    bits = sorted(set(bits))
    return {name: {p: cost_table(tr, weights, bits, p) for p in policies} for name, tr in traces.items()}


def rho_rows(predicted: Mapping[str, Mapping[str, Mapping[str, Mapping[int, float]]]],
             metrics: Mapping[str, str], truths: Mapping[str, Mapping[str, Mapping[int, float]]], *,
             per_bits: Sequence[int] = (3, 4, 5, 6, 7), n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per scheme x policy x truth x bits (and pooled, ``bits`` None): rho with its interval.

    ``metrics`` maps a scheme to its metric; ``truths`` are ``{truth name: measured table}`` (``TRUTHS``).
    Out Sen Quant is ranked against ``rise-8bit`` as well as the others; the other metrics are not, since the
    8-bit reference is not what they model.
    """
    rows = []
    for scheme, by_policy in predicted.items():
        for truth, table in truths.items():
            if truth == "rise-8bit" and metrics[scheme] != "out-quant":
                continue
            widths = [b for b in per_bits if all(b in v for v in table.values())]
            for policy, omega in by_policy.items():
                for b in [*widths, None]:
                    r = spearman_ci(omega, table, b, n_boot=n_boot, seed=seed)
                    rows.append({"scheme": scheme, "metric": metrics[scheme], "policy": policy, "truth": truth,
                                 "bits": b, "rho": r["rho"], "low": r["low"], "high": r["high"],
                                 "n_layers": r["n_layers"]})
    return rows


def choose_policy(rows: Sequence[Mapping[str, Any]], schemes: Iterable[str] = METRICS) -> dict[str, Any]:
    """The policy with the highest mean pooled rho against the measured Eq. (5) rise over ``schemes`` (the
    paper's three metrics' default schemes), with every policy's mean; ties go to the first in
    ``NEGATIVE_POLICIES`` order."""
    schemes = set(schemes)
    means = {}
    for policy in NEGATIVE_POLICIES:
        picked = [r["rho"] for r in rows if r["policy"] == policy and r["truth"] == "rise" and r["bits"] is None
                  and r["scheme"] in schemes]
        means[policy] = statistics.fmean(picked) if picked else float("nan")
    best = max(NEGATIVE_POLICIES, key=lambda p: (means[p], -NEGATIVE_POLICIES.index(p)))
    return {"best": best, "mean_pooled_rho": means}


def eq5_decomposition(measured: Mapping[str, Any], bits: int = 4) -> dict[str, Any]:
    """Per layer, the measured Eq. (5) rise at ``bits`` split into its KL and L1 parts, and the L1 share."""
    kl = measured_table(measured, "kl")
    l1 = measured_table(measured, "l1")
    layers = list(kl)
    shares = [l1[n][bits] / (l1[n][bits] + kl[n][bits]) if l1[n][bits] + kl[n][bits] > 0 else float("nan")
              for n in layers]
    valid = [s for s in shares if s == s]
    return {"bits": bits, "layers": layers, "kl": [kl[n][bits] for n in layers], "l1": [l1[n][bits] for n in layers],
            "l1_share": shares, "median_l1_share": statistics.median(valid), "min_l1_share": min(valid)}


def rho_lookup(rows: Sequence[Mapping[str, Any]], scheme: str, policy: str, truth: str, bits: int | None
               ) -> dict[str, Any] | None:
    """The row of ``rho_rows`` for one scheme, policy, truth and bit width (None: pooled)."""
    return next((r for r in rows if (r["scheme"], r["policy"], r["truth"], r["bits"]) == (scheme, policy, truth, bits)),
                None)


def first_order_targets(rows: Sequence[Mapping[str, Any]], table1: Mapping[str, Any] | None,
                        seed_check: Mapping[str, Any] | None, first_order_traces: Mapping[str, Any], policy: str,
                        *, rho_target: float = 0.9, ap_target: float = 1.0, agreement_target: float = 0.95,
                        probe_budget_s: float = 60.0) -> list[dict[str, Any]]:
    """Issue targets of the first-order metric, each ``{"target", "value", "met"}`` from measured figures."""
    out = []
    r = rho_lookup(rows, FIRST_ORDER, policy, "rise", 4)
    if r is not None:
        out.append({"target": f"Spearman rho >= {rho_target} against the measured Eq. (5) rise at 4 bits",
                    "value": f"{r['rho']:.3f} [{r['low']:.3f}, {r['high']:.3f}]", "met": r["rho"] >= rho_target})
    if table1 is not None:
        for row in table1["rows"]:
            if row["scheme"] == FIRST_ORDER and row.get("delta_vs_measured") is not None:
                gap = row["delta_vs_measured"]
                out.append({"target": f"Table 1 AP within {ap_target} of Measured Sen at {row['precision']} bits",
                            "value": f"{gap:+.2f} AP", "met": abs(gap) <= ap_target})
    if seed_check is not None and FIRST_ORDER in seed_check["schemes"]:
        worst = min(v["min_agreement"] for v in seed_check["schemes"][FIRST_ORDER].values())
        out.append({"target": f"bit maps agree on >= {agreement_target:.0%} of weights across "
                              f"{seed_check['seeds']} probe seeds", "value": f"{worst:.1%} (worst budget)",
                    "met": worst >= agreement_target})
    seconds = first_order_traces.get("seconds")
    if seconds is not None:
        out.append({"target": f"<= {probe_budget_s:g} s of probes on the embedded default",
                    "value": f"{seconds:.0f} s", "met": seconds <= probe_budget_s})
    return out


def write_check(result: Mapping[str, Any], path: str | Path) -> Path:
    """The check's numbers as JSON, atomically."""
    return write_json_atomic(path, dict(result))


def rho_markdown(rows: Sequence[Mapping[str, Any]], truth: str, bits: Sequence[int | None]) -> str:
    """A Markdown table: one line per scheme and policy, rho [interval] against ``truth`` at each of ``bits``
    (None: pooled over all bit widths)."""
    keys = list(dict.fromkeys((r["scheme"], r["policy"]) for r in rows if r["truth"] == truth))
    head = ["scheme", "negative_traces", *[f"{b} bits" if b is not None else "pooled" for b in bits]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(bits)]
    for scheme, policy in keys:
        cells = []
        for b in bits:
            r = rho_lookup(rows, scheme, policy, truth, b)
            cells.append("-" if r is None else f"{r['rho']:.2f} [{r['low']:.2f}, {r['high']:.2f}]")
        lines.append(f"| {scheme} | {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def subset_markdown(rows: Sequence[Mapping[str, Any]], truths: Sequence[str], policy: str, bits: int | None = 4
                    ) -> str:
    """A Markdown table of how an AP scan's size moves rho: one line per scheme, rho [interval] against each of
    ``truths`` (the same AP drops measured on val subsets of growing size, named as ``rho_rows`` got them), and the
    interval's width, which is what fewer images cost."""
    schemes = list(dict.fromkeys(r["scheme"] for r in rows if r["policy"] == policy))
    lines = ["| scheme | " + " | ".join(truths) + " |", "|---|" + "---:|" * len(truths)]
    for scheme in schemes:
        cells = []
        for truth in truths:
            r = rho_lookup(rows, scheme, policy, truth, bits)
            cells.append("-" if r is None else f"{r['rho']:.2f} [{r['low']:.2f}, {r['high']:.2f}] "
                         f"(width {r['high'] - r['low']:.2f})")
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_point_check(measured: Mapping[str, Any], measured_8bit: Mapping[str, Any], *, n_boot: int = 2000,
                          seed: int = 0) -> dict[str, Any]:
    """How the 8-bit reference point (Out Sen Quant's) changes the measured per-layer costs: Spearman's rho of
    the rise with the rest at 8 bits against the rise with the rest in float, per bit width, and the median
    ratio of the two rises."""
    a, b = measured_table(measured_8bit, "rise"), measured_table(measured, "rise")
    widths = sorted({w for v in a.values() for w in v} & {w for v in b.values() for w in v})
    out = {}
    for w in widths:
        r = spearman_ci(a, b, w, n_boot=n_boot, seed=seed)
        ratios = [a[n][w] / b[n][w] for n in a if n in b and b[n][w] > 0]
        out[str(w)] = {"rho": r["rho"], "low": r["low"], "high": r["high"],
                       "median_ratio": statistics.median(ratios) if ratios else float("nan")}
    return {"per_bits": out, "reference_loss_8bit": measured_8bit["reference_loss"]}
