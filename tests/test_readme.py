"""README sections are regenerated from results files, and only between their markers."""

import json

from detrq.readme import update_readme


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
