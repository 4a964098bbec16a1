"""Table 1, the claims, the figures' data and files, the stability statistics, the notebook helpers: on small,
made-up inputs (fast)."""

import json
import math
import subprocess
import sys

import nbformat
import pytest
import torch

from detrq.artifact.figures import (figure1_data, figure2_data, layer_region, negative_at, plot_figure1, plot_figure2,
                                    region_spans)
from detrq.artifact.notebooks import (allocation_summary, claims_overview, clean_notebook, load_parameters,
                                      parse_override, region_mean_bits, seed_stability_markdown,
                                      seed_stability_summary, table1_summary, traces_markdown)
from detrq.artifact.table1 import (PAPER_TABLE1, ROWS, bootstrap_pairs, build_table1, check_claims, claims_markdown,
                                   interval_verdict, paper_delta, row_key, table1_csv, table1_markdown, table_rows,
                                   write_claims, write_table1)
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file
from detrq.io.paths import PROJECT_ROOT
from detrq.models.detr import build_detr
from detrq.sensitivity import distillation_term_traces
from detrq.sensitivity.stability import set_statistics

torch.set_num_threads(1)

# The Delta column as printed in the paper's Table 1, to check that paper_delta derives it exactly.
PRINTED_DELTA = {("6", "loss"): -3.1, ("6", "out-float"): -2.0, ("6", "out-quant"): 1.1,
                 ("5", "loss"): -8.5, ("5", "out-float"): -7.6, ("5", "out-quant"): 1.3,
                 ("4", "loss"): -0.8, ("4", "out-float"): 0.0, ("4", "out-quant"): 5.2}
LAYERS = ["transformer.encoder.layers.0.linear1.weight", "transformer.decoder.layers.0.linear1.weight",
          "bbox_embed.layers.0.weight", "backbone.0.body.conv1.weight"]


def fake_evaluations(ap: dict[tuple[str, str], float]) -> dict:
    """run_evaluation-shaped results with the given AP (in percent)."""
    protocol = {"split": "val", "num_images": 5, "batch_size": 8}
    return {row: {"metrics": {"AP": value / 100}, "protocol": protocol, "checkpoint_sha256": "abc",
                  "avg_bits": 32.0 if row[0] == "float" else float(row[0]),
                  "size_bits": 8e6 * (32.0 if row[0] == "float" else float(row[0]))} for row, value in ap.items()}


def fake_traces(avg: dict[str, list[float]], rel: float = 0.1) -> dict:
    return {m: {"layers": {n: {"trace": a * 10, "avg_trace": a, "stderr": abs(a) * 10 * rel, "numel": 10,
                               "n_probes": 4} for n, a in zip(LAYERS, values)}, "image_ids": [1], "split": "train"}
            for m, values in avg.items()}


def test_paper_table_has_the_14_rows_and_its_printed_deltas():
    assert len(PAPER_TABLE1) == len(ROWS) == 14
    assert PAPER_TABLE1["float", "none"] == 42.0 and PAPER_TABLE1["4", "out-quant"] == 25.9
    assert {r: paper_delta(*r) for r in PRINTED_DELTA} == PRINTED_DELTA
    assert paper_delta("6", "uniform") is None and paper_delta("float", "none") is None


def test_build_table1_rows_keys_and_deltas(tmp_path):
    table = build_table1(fake_evaluations(PAPER_TABLE1))
    assert len(table["rows"]) == 14 and table["checkpoint_sha256"] == "abc"
    assert all(set(r) == {"precision", "scheme", "label", "paper", "AP", "paper_AP", "avg_bits", "size_mb",
                          "delta_vs_uniform", "delta_ci", "delta_seed_range", "delta_vs_measured", "delta_vs_measured_ci", "paper_delta"}
               for r in table["rows"])
    rows = {(r["precision"], r["scheme"]): r for r in table["rows"]}
    assert rows["5", "out-quant"]["delta_vs_uniform"] == pytest.approx(1.3)
    assert rows["5", "out-quant"]["size_mb"] == pytest.approx(5.0) and rows["float", "none"]["size_mb"] == 32.0
    assert rows["8", "uniform"]["delta_vs_uniform"] is None
    write_table1(table, tmp_path)
    assert json.loads(results_file(tmp_path, "table1.json").read_text()) == table
    csv_lines = results_file(tmp_path, "table1.csv").read_text().splitlines()
    assert csv_lines[0].startswith("precision,scheme,label,AP") and len(csv_lines) == 15
    md = results_file(tmp_path, "table1.md").read_text().splitlines()
    assert len(md) == 16 and "| 5-bit | Out Sen Quant | 36.4 | +1.3 | - | - | - |" in md[11]
    assert table1_csv(table) == results_file(tmp_path, "table1.csv").read_text()


def test_table_with_extra_rows_intervals_and_seed_ranges():
    ap = {**PAPER_TABLE1, **{(p, s): v for p in ("6", "5", "4") for s, v in (("out-first-order", 40.0),
                                                                             ("measured", 41.0))}}
    rows = table_rows(["out-first-order", "measured"])
    assert rows[6:8] == [("6", "out-first-order"), ("6", "measured")] and len(rows) == 20
    pairs = {f"{row_key(*a)}|{row_key(*b)}": {"low": -0.01, "high": 0.02} for a, b in
             [(("5", "out-first-order"), ("5", "uniform")), (("5", "out-first-order"), ("5", "measured"))]}
    table = build_table1(fake_evaluations(ap), rows=rows, pairs=pairs,
                         replica_aps={("5", "out-first-order"): [39.0, 40.5]})
    r = {(x["precision"], x["scheme"]): x for x in table["rows"]}["5", "out-first-order"]
    assert r["paper_AP"] is None and not r["paper"] and r["label"] == "Out Sen First-Order (beyond the paper)"
    assert r["delta_ci"] == pytest.approx([-1.0, 2.0]) and r["delta_vs_measured"] == pytest.approx(-1.0)
    assert r["delta_seed_range"] == pytest.approx([39.0 - 35.1, 40.5 - 35.1])
    assert ("5/out-first-order", "5/measured") in bootstrap_pairs(rows)
    assert "| 5-bit | Out Sen First-Order (beyond the paper) | 40.0 | +4.9 | [-1.0, +2.0] | +3.9 to +5.4 | " \
           "-1.0 [-1.0, +2.0] |" in table1_markdown(table)


def test_interval_verdicts():
    assert interval_verdict(1.0, [0.2, 1.8]) == "holds"
    assert interval_verdict(1.0, [-0.2, 1.8]) == "inconclusive"
    assert interval_verdict(-1.0, [-1.8, -0.2]) == "does not hold"
    assert interval_verdict(0.0, [0.0, 0.0]) == "does not hold"
    assert interval_verdict(-1.0, [-1.8, -0.2], above=False) == "holds"
    assert interval_verdict(-0.3, [-0.45, -0.1], -0.5) == "holds"
    assert interval_verdict(0.5, None) == "holds" and interval_verdict(-0.5, None) == "does not hold"


def test_build_table1_refuses_missing_rows_and_mixed_checkpoints():
    evaluations = fake_evaluations(PAPER_TABLE1)
    with pytest.raises(DetrqError, match="missing"):
        build_table1({k: v for k, v in evaluations.items() if k != ("4", "loss")})
    evaluations["4", "loss"] = {**evaluations["4", "loss"], "checkpoint_sha256": "other"}
    with pytest.raises(DetrqError, match="different checkpoints"):
        build_table1(evaluations)


def test_claims_hold_on_the_papers_own_numbers_and_fail_when_reversed(tmp_path):
    claims = check_claims(build_table1(fake_evaluations(PAPER_TABLE1)))
    assert len(claims) == 13 and all(c.holds for c in claims), [c for c in claims if not c.holds]
    reversed_ap = {**PAPER_TABLE1, ("5", "out-quant"): 30.0}
    by_text = {c.claim: c for c in check_claims(build_table1(fake_evaluations(reversed_ap)))}
    assert not by_text["Out Sen Quant beats uniform at 5 bits"].holds
    assert "30.00 vs Uniform 35.10 (-5.10)" in by_text["Out Sen Quant beats uniform at 5 bits"].evidence
    assert by_text["Out Sen Quant beats uniform at 6 bits"].holds and "note" not in by_text[
        "Out Sen Quant beats uniform at 6 bits"].evidence
    under = fake_evaluations(PAPER_TABLE1)
    under["5", "loss"] = {**under["5", "loss"], "avg_bits": 3.26}
    loss5 = check_claims(build_table1(under))[4]
    assert loss5.claim == "Loss Sen does not beat uniform at 5 bits"
    assert loss5.evidence.endswith("note: Loss Sen uses 3.26 average bits, under the 5-bit budget")
    write_claims(list(by_text.values()), tmp_path / "claims.json")
    stored = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert {"claim", "verdict", "holds", "evidence", "beyond_paper"} == set(stored[0])
    text = claims_markdown(stored)
    assert text.startswith("On this run, of 13 claims: 12 hold, 1 do not hold, 0 are inconclusive")
    assert "**does not hold**: Out Sen Quant beats uniform at 5" in text


def test_claims_from_traces_stability_and_curvature():
    traces = fake_traces({"loss": [1.0, -2.0, 3.0, 4.0], "out-float": [1e-3, 1e-1, 1e-5, 0.0],
                          "out-quant": [1e-4, 2e-4, 3e-4, 4e-4]})
    traces["loss"] = fake_traces({"loss": [1.0, -2.0, 3.0, 4.0]}, rel=0.5)["loss"]
    stability = {**set_statistics([10.0, 10.1, 9.9]), "num_sets": 3, "set_size": 100}
    curvature = {"points": {"float": {"eq5": {"trace": 2.0, "stderr": 0.1, "zero_layers": ["bbox_embed.layers.0"]},
                                      "l1": {"trace": 0.0, "stderr": 0.0},
                                      "kl": {"trace": 2.0, "stderr": 0.1}}}}
    claims = check_claims(build_table1(fake_evaluations(PAPER_TABLE1)), traces, stability=stability,
                          curvature=curvature)
    extra = {c.claim.split(" (")[0]: c for c in claims[13:]}
    assert len(extra) == 5 and all(c.holds for c in extra.values()), extra
    assert "L1 box term 0" in claims[-1].evidence and claims[-1].evidence.endswith("zero Eq.(5) curvature: 1")
    only = claims_markdown(claims, only="Figure")
    assert only.startswith("On this run, of 3 claims: 3 hold")


def test_set_statistics_reports_both_readings():
    stats = set_statistics([2.0, 4.0])
    assert stats["mean"] == 3.0 and stats["var"] == 2.0 and stats["std"] == pytest.approx(math.sqrt(2))
    assert stats["var_over_mean"] == pytest.approx(2 / 3) and stats["std_over_mean"] == pytest.approx(math.sqrt(2) / 3)
    assert stats["compared"] == "var_over_mean" and stats["holds"] is False
    with pytest.raises(DetrqError, match="at least 2 sets"):
        set_statistics([1.0])


def test_regions_and_spans_follow_model_order():
    assert [layer_region(n) for n in LAYERS] == ["encoder", "decoder", "heads/proj", "backbone"]
    assert region_spans(LAYERS + ["backbone.0.body.layer1.0.conv1.weight"]) == [
        ("encoder", 0, 0), ("decoder", 1, 1), ("heads/proj", 2, 2), ("backbone", 3, 4)]


def test_figure1_data_keeps_nonpositive_estimates_visible():
    traces = fake_traces({"loss": [1.0, -2.0, 0.0, 100.0], "out-float": [1e-3, 1e-1, 1e-5, 1e-2],
                          "out-quant": [1e-4, 2e-4, 3e-4, 4e-4]})
    traces["loss"]["layers"][LAYERS[0]]["stderr"] = 20.0  # stderr of the average 2.0 >= the average 1.0
    data = figure1_data(traces)
    loss = data["metrics"]["loss"]
    assert loss["nonpositive"] == [1, 2] and loss["log10"][1] is None and loss["log10"][3] == pytest.approx(2.0)
    assert loss["lower"][0] is None and loss["upper"][0] == pytest.approx(math.log10(3.0))
    assert data["metrics"]["out-float"]["nonpositive"] == []
    assert loss["significant_negative"] == []  # no samples: nothing is known to lie below zero
    for n, samples in zip(LAYERS, ([1.0], [-2.1, -1.9], [0.3, -0.3], [4.0])):
        traces["loss"]["layers"][n]["samples"] = samples
    replica = {"loss": {"layers": {n: {"samples": s} for n, s in zip(LAYERS, ([1.0], [-2.0, -2.2], [0.2, -0.4],
                                                                              [4.0]))}}}
    pooled = figure1_data(traces, [replica])["metrics"]["loss"]
    assert pooled["significant_negative"] == [1] and pooled["pooled_samples"] == 2
    assert negative_at([-2.1, -1.9, -2.0, -2.2]) and not negative_at([0.3, -0.3, 0.2, -0.4])
    assert not negative_at([-1.0]) and negative_at([-1.0, -1.0])
    assert data["floor"] == math.floor(min(math.log10(1e-5 * 0.9), -5)) - 1
    assert data["layers"] == LAYERS and [s[0] for s in data["spans"]] == ["encoder", "decoder", "heads/proj",
                                                                            "backbone"]
    mismatched = fake_traces({"loss": [1.0] * 4, "out-float": [1.0] * 4})
    mismatched["out-float"]["layers"] = dict(reversed(mismatched["out-float"]["layers"].items()))
    with pytest.raises(DetrqError, match="different layers"):
        figure1_data(mismatched)


def allocation(bits: list[int], target: float = 5) -> dict:
    return {"avg_bits_target": target, "bits_range": [3, 6], "avg_bits": sum(bits) / len(bits),
            "bit_map": dict(zip(LAYERS, bits))}


def test_figure2_data_and_both_figures_are_byte_stable(tmp_path):
    allocations = {"loss": allocation([3, 6, 6, 5]), "out-float": allocation([5, 5, 5, 5]),
                   "out-quant": allocation([6, 4, 5, 5])}
    data = figure2_data(allocations)
    assert data["bits"]["out-quant"] == [6, 4, 5, 5] and data["avg_bits"]["loss"] == 5.0 and data["target"] == 5
    with pytest.raises(DetrqError, match="one budget"):
        figure2_data({**allocations, "loss": allocation([3, 6, 6, 5], target=6)})
    fig1 = figure1_data(fake_traces({"loss": [1.0, -2.0, 3.0, 4.0], "out-float": [1e-3, 1e-1, 1e-5, 1e-2]}))
    first = plot_figure1(fig1, tmp_path / "a" / "fig1") + plot_figure2(data, tmp_path / "a" / "fig2")
    second = plot_figure1(fig1, tmp_path / "b" / "fig1") + plot_figure2(data, tmp_path / "b" / "fig2")
    assert sorted(p.name for p in first) == ["fig1.pdf", "fig1.png", "fig2.pdf", "fig2.png"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert b"CreationDate" not in first[1].read_bytes()


def test_region_mean_bits_and_summaries():
    bit_map = dict(zip(LAYERS, [4, 6, 3, 5]))
    assert region_mean_bits(bit_map) == {"backbone": 5.0, "encoder": 4.0, "decoder": 6.0, "heads/proj": 3.0}
    assert region_mean_bits(bit_map, dict(zip(LAYERS, [1, 1, 1, 1])))["decoder"] == 6.0
    text = allocation_summary({"loss": {5: allocation([3, 6, 6, 5])}})
    assert text.splitlines() == ["negative_traces keep, quantizer eq6, per-layer bits 5: 3-6",
                                 "loss            : average bits 5 -> 5.00"]
    table = build_table1(fake_evaluations(PAPER_TABLE1))
    summary = table1_summary(table, [{"verdict": "holds"}, {"verdict": "inconclusive"}])
    assert summary.splitlines()[:2] == ["float 42.0", "8 bits: uniform 41.1"]
    assert "5 bits: uniform 35.1, loss 26.6, out-float 27.5, out-quant 36.4" in summary
    assert summary.endswith("claims: holds 1, does not hold 0, inconclusive 1 (of 2)")


def test_table1_at_a_target_of_notebook_02_beyond_the_papers():
    # targets = [4.5] in notebook 02: 4.5-bit rows, the uniform rows of the paper's widths, no Δ vs uniform there
    rows = table_rows(["measured"], [4.5])
    assert rows == [("float", "none"), ("8", "uniform"), ("6", "uniform"), ("5", "uniform"), ("4.5", "loss"),
                    ("4.5", "out-float"), ("4.5", "out-quant"), ("4.5", "measured"), ("4", "uniform")]
    assert table_rows() == list(ROWS) and table_rows(targets=[6, 5, 4, 8]).count(("8", "uniform")) == 1
    assert table_rows(["measured"], [5], sources=["loss", "measured"])[-4:] == [
        ("5", "uniform"), ("5", "loss"), ("5", "measured"), ("4", "uniform")]
    ap = {r: 40.0 for r in rows}
    table = build_table1(fake_evaluations({**ap, ("4.5", "out-quant"): 41.0}), rows=rows)
    row = {(r["precision"], r["scheme"]): r for r in table["rows"]}["4.5", "out-quant"]
    assert row["delta_vs_uniform"] is None and row["paper_AP"] is None and row["paper_delta"] is None
    assert row["delta_vs_measured"] == pytest.approx(1.0)
    assert ("4.5/out-quant", "4.5/measured") in bootstrap_pairs(rows)
    assert check_claims(table) == []  # the paper's claims are about 6, 5 and 4 bits
    assert "| 4.5-bit | Out Sen Quant | 41.0 | - |" in table1_markdown(table)


def test_readable_notebook_outputs():
    traces = fake_traces({"loss": [1.0, -2.0, 3.0, 4.0]})
    traces["loss"]["metric"] = "loss"
    head = traces_markdown(traces).splitlines()[0]
    assert head == "| layer | loss Tr/\\|W\\| | z |"  # pipes in a cell escaped: the table renders
    claims = [{"claim": "a", "verdict": "holds", "evidence": "e"}, {"claim": "b", "verdict": "inconclusive",
                                                                     "evidence": "e"}]
    text = claims_overview(claims)
    assert text.startswith("Of 2 claims on this run, 1 holds, 0 do not hold, 1 is inconclusive")
    assert claims_overview(claims[:1]).startswith("Of 1 claim on this run, 1 holds, 0 do not hold:")
    check = {"seeds": 3, "min_agreement_required": 0.95, "max_objective_spread": 0.02, "schemes": {
        "a": {"6": {"min_agreement": 1.0, "objective_spread": 0.035}},
        "b": {"6": {"min_agreement": 0.71, "objective_spread": 0.4}},
        "c": {"6": {"min_agreement": 1.0, "objective_spread": 0.0}}}}
    lines = seed_stability_summary(check).splitlines()
    assert lines[1].startswith("a               : bit maps stable, agreement 100%, objective spread 3.5%")
    assert "NOT stable, agreement 71%" in lines[2] and lines[3].startswith("c               : stable,")
    assert "| a | **bit maps stable** | 100% | 3.5% |" in seed_stability_markdown(check)


def test_l1_term_has_no_curvature_at_float_weights_but_kl_does():
    torch.manual_seed(0)
    model = build_detr("tiny").eval()
    images = [torch.randn(3, 64, 64), torch.randn(3, 64, 48)]
    terms = distillation_term_traces(model, [(images, [{}, {}])], probes=3)
    assert all(e.trace == 0.0 and set(e.samples) == {0.0} for e in terms["l1"].values())
    assert sum(e.trace for e in terms["kl"].values()) > 0
    assert all(terms["kl"][n].samples == terms["eq5"][n].samples for n in terms["kl"])
    quant = distillation_term_traces(model, [(images, [{}, {}])], quant_bits=4, probes=3)
    assert any(e.trace != 0.0 for e in quant["l1"].values())


def test_parse_override_types_values():
    assert parse_override("max_probes=8") == ("max_probes", 8)
    assert parse_override("device=cuda") == ("device", "cuda")
    assert parse_override("max_eval_images=null") == ("max_eval_images", None)
    assert parse_override("coco_root=/data/my coco #2") == ("coco_root", "/data/my coco #2")
    assert parse_override("results_dir=2017") == ("results_dir", "2017")
    with pytest.raises(DetrqError, match="KEY=VALUE"):
        parse_override("device")


def test_load_parameters_checks_keys_and_paths(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        'checkpoint = "x.pth"  # str: checkpoint\ncoco_root = "data"  # str: data\nthreads = 2  # int: threads',
        metadata={"tags": ["parameters"]})], metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nbformat.write(nb, str(tmp_path / "only.ipynb"))
    (tmp_path / "ckpt.pth").write_bytes(b"")
    params = tmp_path / "p.yaml"
    params.write_text(f"checkpoint: {tmp_path / 'ckpt.pth'}\ncoco_root: {tmp_path}\nthreads: 1\n")
    kwargs = {"names": ("only",), "notebook_dir": tmp_path}
    assert load_parameters(params, {"threads": 3}, **kwargs)["threads"] == 3
    with pytest.raises(DetrqError, match="'device' is not a parameter of any notebook"):
        load_parameters(params, {"device": "cuda"}, **kwargs)
    with pytest.raises(DetrqError, match="coco_root not found"):
        load_parameters(params, {"coco_root": str(tmp_path / "missing")}, **kwargs)
    with pytest.raises(DetrqError, match="'checkpoint' is not set"):
        load_parameters(params, {"checkpoint": None}, **kwargs)
    with pytest.raises(DetrqError, match="parameter file not found"):
        load_parameters(tmp_path / "none.yaml", **kwargs)


def test_clean_notebook_drops_run_metadata_and_keeps_tags(tmp_path):
    cell = nbformat.v4.new_code_cell("1", metadata={"tags": ["parameters"], "papermill": {"duration": 1.0},
                                                    "execution": {"iopub.status.busy": "2026-01-01"}})
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"papermill": {"start_time": "2026-01-01"}})
    nbformat.write(nb, str(tmp_path / "n.ipynb"))
    clean_notebook(tmp_path / "n.ipynb")
    cleaned = nbformat.read(str(tmp_path / "n.ipynb"), as_version=4)
    assert "papermill" not in cleaned.metadata
    assert cleaned.cells[0].metadata == {"tags": ["parameters"]}


def test_notebooks_command_gives_one_line_errors(tmp_path):
    for args, message in ((["--params", str(tmp_path / "none.yaml")], "parameter file not found"),
                          (["--params", "params/default.yaml", "--only", "05_x"], "unknown notebook '05_x'"),
                          (["--params", "params/full.yaml"], "'checkpoint' is not set in full.yaml")):
        proc = subprocess.run([sys.executable, "-m", "detrq", "notebooks", *args], capture_output=True, text=True,
                              timeout=120, cwd=PROJECT_ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0]


def test_reproduce_sh_refuses_bad_arguments_before_doing_anything(tmp_path):
    cases = ((["bogus"], "unknown argument 'bogus'"),
             (["full", "--checkpoint", str(tmp_path)], "full needs --coco DIR"),
             (["full", "--coco", str(tmp_path / "missing"), "--checkpoint", "x.pth"], "COCO directory not found"),
             (["full", "--coco", str(tmp_path), "--checkpoint", str(tmp_path / "x.pth")], "checkpoint not found"),
             (["full", "--coco", str(tmp_path), "--checkpoint", __file__, "--device", "tpu"], "--device must be"),
             (["full", "--coco", str(tmp_path), "--bogus"], "unknown argument to full: '--bogus'"))
    for args, message in cases:
        proc = subprocess.run(["bash", str(PROJECT_ROOT / "reproduce.sh"), *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stdout)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.stderr.startswith("usage:") and last.startswith("error: ") and message in last, (args, proc.stderr)
