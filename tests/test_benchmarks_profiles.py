"""The benchmarks of issue 24's run profiles: benchmarks/full_run_estimate.py counts each profile's work from its
values (params/full.yaml), benchmarks/reproduce_time.py prints its timing table and benchmarks/replica_evidence.py
cuts replicas from one seed's samples. Fast: no model is built, no
notebook runs."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "params" / "full.yaml"
LAYERS = 106  # quantizable layers of the r50 preset (full_run_estimate.r50_layers(), not built here)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def est():
    return _load("full_run_estimate")


@pytest.fixture(scope="module")
def both(est):
    return {p: est.estimate(FULL, p, LAYERS) for p in est.PROFILES}


def test_paper_profile_has_fewer_evaluations_and_no_notebook_05_or_07_rows(both):
    paper, complete = both["paper"], both["complete"]
    assert {r.notebook for r in paper["rows"]} <= {"01", "02", "03", "04"}
    assert {"05", "07"} <= {r.notebook for r in complete["rows"]}
    count = lambda e: sum(e["evaluations"].values()) - e["evaluations"]["pareto_shared"]  # noqa: E731
    assert count(paper) < count(complete)
    assert paper["evaluations"]["pareto"] == 0 and paper["evaluations"]["table1_replicas"] == 0
    assert not any(r.step.startswith("02") for r in paper["rows"])  # no Measured Sen: no scan in notebook 02


def test_paper_profile_costs_less_gpu_time_than_complete(both):
    assert 0 < both["paper"]["gpu_hours"] < both["complete"]["gpu_hours"]
    assert both["paper"]["gpu_hours_n"] < both["complete"]["gpu_hours_n"]


def test_paper_table1_has_the_papers_14_evaluations(est):
    params, notebooks = est.profile_params(FULL, "paper")
    assert notebooks == ("01_hessian_traces", "02_bit_allocation", "03_table1", "04_figures")
    t1 = est.table1_evaluations(params)
    assert len(t1["rows"]) == 14 and t1["replicas"] == []
    assert [r for r in t1["rows"] if r[1] in ("none", "uniform")] == [
        ("float", "none"), ("8", "uniform"), ("6", "uniform"), ("5", "uniform"), ("4", "uniform")]
    assert {s for _, s in t1["rows"]} - {"none", "uniform"} == {"loss", "out-float", "out-quant"}


def test_deterministic_schemes_are_counted_for_one_seed(est, both):
    params, _ = est.profile_params(FULL, "complete")
    assert params["stability_seeds"] == 3
    seeds = {s.name: est.seeds_of(s, params) for s in est.schemes(params)}
    assert seeds["modelopt"] == seeds["loss-fisher"] == seeds["out-quant-fisher"] == 1
    assert seeds["loss"] == seeds["out-float"] == seeds["out-quant"] == seeds["out-first-order"] == 3
    # Table 1's replicas: the other 2 seeds' bit maps of the 5 stochastic schemes at 3 budgets, none for the others.
    replicas = est.table1_evaluations(params)["replicas"]
    assert len(replicas) == 2 * 5 * 3
    assert not {s for _, s, _ in replicas} & {"modelopt", "loss-fisher", "out-quant-fisher", "measured"}
    # The empirical Fisher traces cost one forward+backward per image, whatever the number of probe seeds.
    cost = est.Costs()
    fisher = next(r for r in both["complete"]["rows"] if "empirical Fisher" in r.step)
    assert fisher.seconds == pytest.approx(2 * params["num_hessian_images"] * cost.fwd_bwd)
    more = est.passes({**params, "stability_seeds": 5}, est.profile_params(FULL, "complete")[1], LAYERS, cost)
    assert next(r for r in more if "empirical Fisher" in r.step).seconds == fisher.seconds
    blockwise = [next(r for r in rows if "blockwise" in r.step).seconds for rows in (both["complete"]["rows"], more)]
    assert blockwise[1] == pytest.approx(blockwise[0] * 5 / 3)


def test_notebook_07_reuses_table1s_float_and_uniform_eq6_evaluations(est):
    params, _ = est.profile_params(FULL, "complete")
    pareto = est.pareto_evaluations(params, table1_ran=True)
    assert sorted(pareto["shared"], key=str) == sorted(
        [("float", "none", 32.0)] + [("eq6", "uniform", float(b)) for b in (8, 6, 5, 4)], key=str)
    alone = est.pareto_evaluations(params, table1_ran=False)
    assert len(alone["eq6"]) + len(alone["other"]) == len(pareto["eq6"]) + len(pareto["other"]) + 5


def test_main_prints_both_profiles_and_the_target_line(est, monkeypatch, capsys):
    monkeypatch.setattr(est, "r50_layers", lambda: LAYERS)
    est.main([])
    out = capsys.readouterr().out
    assert "profile paper" in out and "profile complete" in out
    assert out.count("| total |") == 2
    assert "vs the 3 GPU-hour target" in out


@pytest.fixture(scope="module")
def rt():
    return _load("reproduce_time")


def test_reproduce_time_table_has_a_row_per_step_and_the_total(rt):
    table = rt.timing_table([("notebook 01_hessian_traces", 100.04), ("notebook 02_bit_allocation", 20.5)])
    assert table.splitlines() == ["| step | seconds |", "|---|---:|", "| notebook 01_hessian_traces | 100.0 |",
                                  "| notebook 02_bit_allocation | 20.5 |", "| total | 120.5 |"]
    assert "within" in rt.target_line("paper", 299.0) and "over" in rt.target_line("complete", 1201.0)


def test_reproduce_time_runs_each_notebook_into_the_temporary_directory(rt, tmp_path):
    cmd = rt.step_command("paper", ("03_table1",), tmp_path)
    assert cmd[1:] == ["-m", "detrq", "notebooks", "--params", "params/default.yaml", "--profile", "paper",
                       "--set", f"results_dir={tmp_path / 'results'}", "--set", f"figures_dir={tmp_path / 'figures'}",
                       "--out-dir", str(tmp_path / "notebooks"), "--only", "03_table1"]
    together = rt.step_command("complete", ("05_sensitivity_check", "07_pareto"), tmp_path)
    assert together[-4:] == ["--only", "05_sensitivity_check", "07_pareto", "--together"]
    assert rt.run_step([sys.executable, "-c", "pass"]) >= 0
    with pytest.raises(SystemExit):
        rt.run_step([sys.executable, "-c", "raise SystemExit(3)"])


def test_replicas_cut_from_one_seed_are_its_samples_in_disjoint_runs():
    """benchmarks/replica_evidence.py: one run of all the samples is the committed estimate; three runs are
    estimates whose means average back to it (equal runs), each from its own third of the probes."""
    import json

    rep = _load("replica_evidence")
    traces = json.loads((ROOT / "results" / "traces" / "traces_out-first-order.json").read_text())
    whole = rep.split_replica(traces, 0, 1)
    thirds = [rep.split_replica(traces, g, 3) for g in range(3)]
    for name, entry in traces["layers"].items():
        assert whole["layers"][name]["kl"]["trace"] == pytest.approx(entry["kl"]["trace"], rel=1e-12)
        assert whole["layers"][name]["jacobian"]["sum"] == pytest.approx(entry["jacobian"]["sum"], rel=1e-12)
        parts = [t["layers"][name]["kl"] for t in thirds]
        assert [p["n_probes"] for p in parts] == [entry["kl"]["n_probes"] // 3] * 3
        assert sum((p["samples"] for p in parts), []) == entry["kl"]["samples"][:3 * parts[0]["n_probes"]]
        assert sum(p["trace"] for p in parts) / 3 == pytest.approx(entry["kl"]["trace"], rel=1e-9)
