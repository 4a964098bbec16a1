"""The reproduction report: verdicts per number, reused results never pass for a reproduction, and accepting
replaces only the files a run owns."""

import json
import os
import time

import pytest

from detrq.artifact import reproduction as rp
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _results(root, ap=48.5, bits=None, trace=10.0, verdict="holds", latency=0.7, int8_ap=0.65, cpu="CPU A"):
    """A minimal committed-results directory: Table 1, a bit map, traces, claims, curve, notebook 05, INT8."""
    bits = bits or {"a": 4, "b": 6}
    _write(results_file(root, "table1.json"),
           {"rows": [{"precision": "4", "scheme": "loss", "AP": ap, "avg_bits": 4.0}]})
    _write(results_file(root, "bitmap_loss_4bit.json"), {"bit_map": bits})
    _write(results_file(root, "traces_loss.json"), {"layers": {
        "a": {"trace": trace, "stderr": 1.0, "numel": 90},
        "b": {"trace": 0.5, "stderr": 1.0, "numel": 10}}})  # b is below its stderr: not compared
    _write(results_file(root, "claims.json"),
           {"claims": [{"claim": "Loss Sen beats uniform at 4 bits", "verdict": verdict}]})
    _write(results_file(root, "quant_curve.json"), {"rows": [{"label": "W4", "AP": ap / 100}]})
    _write(results_file(root, "sensitivity_check.json"), {"rho_default": [{"scheme": "loss", "rho": 0.7}]})
    _write(results_file(root, "int8_frcnn_narrow_fx.json"), {
        "model": "frcnn_narrow", "backend": "fx", "AP_float": 0.65, "AP_int8": int8_ap,
        "size_bytes": {"float": 100, "int8": 27}, "latency_ratio": latency, "environment": {"cpu": cpu}})
    return root


def _run(tmp_path, name, **kw):
    run = tmp_path / "runs" / name
    rp.start_run(run, reuse=False)
    _results(run / "results", **kw)
    return run


def _verdicts(report):
    return {line["item"]: line["verdict"] for line in report["lines"]}


def test_identical_run_is_reproduced(tmp_path):
    committed = _results(tmp_path / "results")
    runs = {"default": _run(tmp_path, "default"), "int8": _run(tmp_path, "int8")}
    report = rp.compare_runs(committed, runs)
    assert report["counts"]["differs"] == 0 and report["counts"]["within tolerance"] == 0
    assert report["verdict"] == "reproduced" and report["from_scratch"]
    assert set(_verdicts(report).values()) == {"identical"}


def test_each_kind_of_number_gets_its_verdict(tmp_path):
    committed = _results(tmp_path / "results")
    runs = {"default": _run(tmp_path, "default", ap=48.55, bits={"a": 4, "b": 5}, trace=10.0 + 1e-6,
                            verdict="does not hold"),
            "int8": _run(tmp_path, "int8", latency=0.8, int8_ap=0.64)}
    report = rp.compare_runs(committed, runs)
    v = _verdicts(report)
    assert v["Table 1 4 loss AP"] == "within tolerance"  # 0.05 points
    assert v["Table 1 4 loss avg_bits"] == "identical"
    assert v["bit map loss_4bit"] == "differs"  # layer b is 10% of the weights
    assert v["traces loss"] == "within tolerance"
    assert v["claim: Loss Sen beats uniform at 4 bits"] == "differs"
    assert v["INT8 frcnn_narrow fx AP_int8"] == "differs"  # 1 point, past Table 1's 0.1
    assert v["INT8 frcnn_narrow fx latency ratio"] == "within tolerance"  # 0.8 / 0.7 inside the band, same CPU
    assert report["verdict"] == "DIFFERS"
    text = rp.report_text(report)
    assert "WARNING: claim: Loss Sen beats uniform at 4 bits DIFFERS" in text and "committed results are unchanged" in text


def test_int8_ap_takes_table1_tolerance_and_latency_only_the_same_cpu(tmp_path):
    committed = _results(tmp_path / "results")
    runs = {"default": _run(tmp_path, "default"),
            "int8": _run(tmp_path, "int8", latency=0.81, int8_ap=0.649999, cpu="CPU B")}
    report = rp.compare_runs(committed, runs)
    v = _verdicts(report)
    assert v["INT8 frcnn_narrow fx AP_int8"] == "within tolerance"  # float rounding, 1e-4 points
    assert v["INT8 frcnn_narrow fx size int8 (bytes)"] == "identical"
    assert v["INT8 frcnn_narrow fx latency ratio"] == "not compared"  # 0.81 vs 0.7 on another CPU is no verdict
    assert report["verdict"] == "reproduced"
    assert "other CPU: not compared: INT8 frcnn_narrow fx latency ratio: committed 0.7 on CPU A, regenerated 0.81 " \
           "on CPU B" in rp.report_text(report)


def test_int8_file_without_cpu_takes_the_committed_runs_cpu(tmp_path):
    committed = _results(tmp_path / "results", cpu=None)
    _write(results_file(committed, "runtime_int8.json"), {"cpu": "CPU B"})
    runs = {"default": _run(tmp_path, "default"), "int8": _run(tmp_path, "int8", latency=2.0, cpu="CPU B")}
    assert _verdicts(rp.compare_runs(committed, runs))["INT8 frcnn_narrow fx latency ratio"] == "differs"


def test_bitmap_share_is_weighted_by_layer_size():
    assert rp.identical_share({"a": 4, "b": 6}, {"a": 4, "b": 5}, {"a": 90, "b": 10}) == pytest.approx(0.9)
    assert rp.identical_share({"a": 4, "b": 6}, {"a": 3, "b": 6}, {"a": 90, "b": 10}) == pytest.approx(0.1)


def test_traces_ignore_noise_level_layers_but_not_resolved_ones():
    old = {"a": {"trace": 10.0, "stderr": 1.0}, "b": {"trace": 0.5, "stderr": 1.0}}
    worst, n, equal = rp.trace_difference(old, {"a": {"trace": 10.0, "stderr": 1.0},
                                                "b": {"trace": -3.0, "stderr": 1.0}})
    assert (worst, n, equal) == (0.0, 1, False)
    worst, _, _ = rp.trace_difference(old, {"a": {"trace": 11.0, "stderr": 1.0}, "b": {"trace": 0.5, "stderr": 1.0}})
    assert worst == pytest.approx(0.1)


def test_traces_at_float_rounding_of_zero_are_not_compared():
    # A layer resolved against its tiny stderr, but at 1e-18 of the largest trace: rounding of a zero.
    old = {"a": {"trace": 1.0, "stderr": 0.1}, "z": {"trace": 8e-18, "stderr": 3e-19}}
    new = {"a": {"trace": 1.0, "stderr": 0.1}, "z": {"trace": 7e-18, "stderr": 3e-19}}
    assert rp.trace_difference(old, new)[0] == pytest.approx(0.125)
    worst, n, equal = rp.trace_difference(old, new, floor=rp.Tolerances().trace_floor)
    assert (worst, n, equal) == (0.0, 1, False)


def test_missing_int8_run_is_not_run_not_differs(tmp_path):
    committed = _results(tmp_path / "results")
    report = rp.compare_runs(committed, {"default": _run(tmp_path, "default"), "int8": tmp_path / "runs" / "int8"})
    v = _verdicts(report)
    assert v["INT8 frcnn_narrow fx AP_float"] == "not run" and report["counts"]["differs"] == 0
    assert report["verdict"].startswith("reproduced (part")
    assert "./reproduce.sh int8" in rp.report_text(report)


def test_reused_results_never_pass_for_a_reproduction(tmp_path):
    committed = _results(tmp_path / "results")
    old = time.time() - 100
    for p in committed.rglob("*.json"):
        os.utime(p, (old, old))
    run = tmp_path / "runs" / "default"
    start = rp.start_run(run, reuse=True, seed_from=committed)
    assert start.mode == "reused" and "tables/" in start.seeded
    report = rp.compare_runs(committed, {"default": run})
    assert report["counts"]["differs"] == 0 and not report["from_scratch"]
    assert report["verdict"] == "reused cached results: not a reproduction"
    assert "tables/table1.json" in report["reused"]["default"]
    # A file the run writes again counts as computed; the rest stay reused.
    results_file(run / "results", "table1.json").write_text(results_file(committed, "table1.json").read_text())
    assert "tables/table1.json" not in rp.reused_files(run / "results")
    # Without --reuse a finished run's directory starts empty, so nothing can be a cache hit.
    (run / rp.REPORT_NAME).write_text("{}")
    assert rp.start_run(run, reuse=False).mode == "fresh"
    assert not any((run / "results").iterdir())


def test_an_interrupted_run_resumes_and_its_files_count_as_computed(tmp_path):
    committed = _results(tmp_path / "results")
    run = _run(tmp_path, "default")  # started, wrote its results, never wrote its report
    assert rp.start_run(run, reuse=False).mode == "resumed"
    assert results_file(run / "results", "table1.json").is_file()
    report = rp.compare_runs(committed, {"default": run})
    assert report["from_scratch"] and report["verdict"].startswith("reproduced")
    # ... but its step times cover only what was left, so they are not a from-scratch runtime.
    assert not rp.write_runtime(run, [("notebook 05", 300)])["from_scratch"]


def test_accept_replaces_only_what_each_run_owns_and_needs_a_report(tmp_path):
    results, figures = _results(tmp_path / "results"), tmp_path / "figures"
    figures.mkdir()
    (figures / "fig1.png").write_bytes(b"old")
    (figures / "int8_sqnr.png").write_bytes(b"old int8")
    _write(results_file(results, "runtime_default.json"), {"kept": True})
    _write(results / "stale_default.json", {})
    run = _run(tmp_path, "default", ap=40.0)
    (run / "figures").mkdir()
    (run / "figures" / "fig1.png").write_bytes(b"new")
    runs = {"default": run, "int8": tmp_path / "runs" / "int8"}
    with pytest.raises(DetrqError, match="no reproduction.json"):
        rp.accept_runs(runs, results, figures, rp.PARTS)
    assert json.loads(results_file(results, "table1.json").read_text())["rows"][0]["AP"] == 48.5  # untouched
    (run / rp.REPORT_NAME).write_text("{}")
    copied = rp.accept_runs(runs, results, figures, rp.PARTS)
    assert "results/tables/table1.json" in copied and "figures/fig1.png" in copied
    assert json.loads(results_file(results, "table1.json").read_text())["rows"][0]["AP"] == 40.0
    assert (figures / "fig1.png").read_bytes() == b"new"
    assert (figures / "int8_sqnr.png").read_bytes() == b"old int8"  # the INT8 part was not run: kept
    assert results_file(results, "int8_frcnn_narrow_fx.json").is_file()
    # runtimes are taken only from from-scratch runs
    assert results_file(results, "runtime_default.json").is_file()
    assert not (results / "stale_default.json").exists()  # a file the run no longer makes goes


def test_the_accepted_report_is_the_accepted_runs_not_a_later_profiles(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    complete = _run(tmp_path, "default")
    _write(complete / rp.REPORT_NAME, {"of": "complete"})
    int8 = tmp_path / "runs" / "int8"
    int8.mkdir(parents=True)
    time.sleep(0.01)
    _write(results / rp.REPORT_NAME, {"of": "paper"})  # ./reproduce.sh --profile paper, run after the complete run
    assert rp.accepted_report({"default": complete, "int8": int8}, results) == complete / rp.REPORT_NAME
    time.sleep(0.01)
    _write(int8 / rp.REPORT_NAME, {"of": "int8"})
    assert rp.accepted_report({"default": complete, "int8": int8}, results) == int8 / rp.REPORT_NAME
    assert rp.accepted_report({"int8": tmp_path / "nowhere"}, results) == results / rp.REPORT_NAME


def test_runtime_records_the_cpu_and_whether_it_was_from_scratch(tmp_path):
    run = _run(tmp_path, "default")
    runtime = rp.write_runtime(run, [("notebooks 01-04", 1200), ("curve", 25)])
    assert runtime["total_seconds"] == 1225 and runtime["from_scratch"] and runtime["cpu"]
    assert json.loads((run / rp.RUNTIME_NAME).read_text()) == runtime


def test_a_smaller_profile_marks_what_it_did_not_compute_not_run(tmp_path):
    committed = _results(tmp_path / "results")
    _write(results_file(committed, "table1.json"), {"rows": [
        {"precision": "4", "scheme": "loss", "AP": 48.5, "avg_bits": 4.0},
        {"precision": "4", "scheme": "measured", "AP": 49.0, "avg_bits": 4.0}]})
    _write(results_file(committed, "bitmap_measured_4bit.json"), {"bit_map": {"a": 4, "b": 6}})
    paper = _run(tmp_path, "paper")
    for name in ("quant_curve.json", "sensitivity_check.json", "int8_frcnn_narrow_fx.json"):
        results_file(paper / "results", name).unlink()
    _write(results_file(paper / "results", "table1.json"),
           {"rows": [{"precision": "4", "scheme": "loss", "AP": 48.5, "avg_bits": 4.0}]})
    report = rp.compare_runs(committed, {"paper": paper})
    v = _verdicts(report)
    assert v["Table 1 4 loss AP"] == "identical" and v["bit map loss_4bit"] == "identical"
    assert v["Table 1 4 measured AP"] == "not run" and v["bit map measured_4bit"] == "not run"
    assert v["uniform curve W4 AP"] == "not run" and v["notebook 05 rho loss (4 bits)"] == "not run"
    assert report["counts"]["differs"] == 0 and report["verdict"] == "reproduced (part of the artifact not run)"
    # The same files missing from a complete run are differences.
    full = tmp_path / "runs" / "default"
    (paper).rename(full)
    v = _verdicts(rp.compare_runs(committed, {"default": full}))
    assert v["Table 1 4 measured AP"] == "differs" and v["bit map measured_4bit"] == "differs"
    assert v["quant_curve.json"] == "differs"


def test_modelopt_traces_are_compared_per_bit_width():
    old = {"a": {"4": {"trace": 2.0, "stderr": 0.1}, "8": {"trace": 1.0, "stderr": 0.1}}}
    new = {"a": {"4": {"trace": 2.0, "stderr": 0.1}, "8": {"trace": 1.5, "stderr": 0.1}}}
    worst, n, equal = rp.trace_difference(old, new)
    assert n == 2 and not equal and worst == pytest.approx(0.5)
    assert rp.trace_difference(old, old)[2]


def test_the_report_names_each_cpu_with_its_vector_units():
    """Two CPUs of one model name can differ in AVX-512: the report line says which, and says so when they differ."""
    report = {"verdict": "DIFFERS", "counts": {rp.IDENTICAL: 1, rp.WITHIN: 0, rp.DIFFERS: 1, rp.NOT_RUN: 0},
              "reused": {}, "lines": [], "cpu": "AMD EPYC", "cpu_isa": ["avx2"], "committed_cpu": "AMD EPYC",
              "committed_cpu_isa": ["avx2", "avx512f", "avx512bw", "avx512_vnni"]}
    text = rp.report_text(report)
    assert "on AMD EPYC [avx2]; committed results from AMD EPYC [avx2, avx512f, avx512bw, avx512_vnni]" in text
    assert "another CPU than the committed results'" in text
    same = rp.report_text({**report, "committed_cpu_isa": ["avx2"]})
    assert "another CPU" not in same
    unrecorded = rp.report_text({**report, "committed_cpu_isa": None})  # results made before the ISA was recorded
    assert "committed results from AMD EPYC\n" in unrecorded + "\n" and "another CPU" not in unrecorded
