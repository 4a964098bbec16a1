"""README sections are regenerated from results files, and only between their markers."""

import json

from detrq.artifact.readme import update_readme


def test_update_readme_fills_marked_sections_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN generated:quant-curve -->\nstale\n<!-- END generated:quant-curve -->\n"
                      "middle\n<!-- BEGIN generated:table1 -->\nold\n<!-- END generated:table1 -->\nend\n")
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"label": "float", "bits": None, "AP": 0.5, "AP50": 0.7}, {"label": "W4", "bits": 4, "AP": 0.25,
                                                                        "AP50": 0.4}]
    (results / "quant_curve.json").write_text(json.dumps({"rows": rows}))
    found = update_readme(readme, results)
    text = readme.read_text()
    assert set(found) == {"quant-curve", "table1"}
    assert "| AP (%) | 50.0 | 25.0 |" in text and "| of float | 1.00 | 0.50 |" in text and "stale" not in text
    assert "`results/table1.json` is missing" in text and "old" not in text
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    update_readme(readme, results)
    assert readme.read_text() == text  # idempotent


def test_runtime_and_reproduction_sections_come_from_accepted_files(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BEGIN generated:runtime -->\n<!-- END generated:runtime -->\n"
                      "<!-- BEGIN generated:reproduction -->\n<!-- END generated:reproduction -->\n")
    results = tmp_path / "results"
    results.mkdir()
    update_readme(readme, results)
    assert "`results/runtime_default.json` is missing" in readme.read_text()
    (results / "runtime_default.json").write_text(json.dumps({
        "steps": [{"name": "notebooks 01-04", "seconds": 1200}, {"name": "curve", "seconds": 60}],
        "total_seconds": 1260, "cpu": "AMD EPYC 9B14", "threads_available": 2, "from_scratch": True}))
    lines = [{"item": "Table 1 4 loss AP", "committed": 40.0, "regenerated": 40.05, "verdict": "within tolerance"},
             {"item": "claim: x", "committed": "holds", "regenerated": "holds", "verdict": "identical"}]
    (results / "reproduction_accepted.json").write_text(json.dumps({
        "verdict": "reproduced", "cpu": "AMD EPYC 9B14", "lines": lines,
        "counts": {"identical": 1, "within tolerance": 1, "differs": 0, "not run": 0}}))
    update_readme(readme, results)
    text = readme.read_text()
    assert "`./reproduce.sh`: 21.0 minutes from scratch on AMD EPYC 9B14 (2 cores available" in text
    assert "**reproduced**" in text and "| Table 1 4 loss AP | 40 | 40.05 | within tolerance |" in text
    assert "claim: x" not in text  # identical lines are counted, not listed
