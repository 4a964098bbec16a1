"""README.md and docs/*.md: generated sections are regenerated from results files, only between their markers, and the
committed pages are up to date; README.md is a front page of at most 200 lines whose links lead somewhere."""

import json
import re
import shutil
from pathlib import Path

import pytest

from detrq.artifact.claim_commands import FIGURES, STEPS, claim_commands_markdown, figure_entry
from detrq.artifact.notebooks import INT8_NOTEBOOK, profile_steps, step_name
from detrq.artifact.readme import SECTIONS, doc_files, update_readme
from detrq.artifact.table1 import PAPER_TABLE1, table1_compact_markdown
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import read_json

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_update_readme_fills_marked_sections_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN generated:quant-curve -->\nstale\n<!-- END generated:quant-curve -->\n"
                      "middle\n<!-- BEGIN generated:table1 -->\nold\n<!-- END generated:table1 -->\nend\n")
    results = tmp_path / "results"
    rows = [{"label": "float", "bits": None, "AP": 0.5, "AP50": 0.7}, {"label": "W4", "bits": 4, "AP": 0.25,
                                                                        "AP50": 0.4}]
    _write(results / "evaluations" / "quant_curve.json", {"rows": rows})
    found = update_readme(readme, results)
    text = readme.read_text()
    assert found == {readme: ["quant-curve", "table1"]}
    assert "| AP (%) | 50.0 | 25.0 |" in text and "| of float | 1.00 | 0.50 |" in text and "stale" not in text
    assert "`results/tables/table1.json` is missing" in text and "old" not in text  # the layout's path
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    update_readme(readme, results)
    assert readme.read_text() == text  # idempotent


def test_runtime_and_reproduction_sections_come_from_accepted_files(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- BEGIN generated:runtime -->\n<!-- END generated:runtime -->\n"
                      "<!-- BEGIN generated:runtime-compact -->\n<!-- END generated:runtime-compact -->\n"
                      "<!-- BEGIN generated:reproduction -->\n<!-- END generated:reproduction -->\n")
    results = tmp_path / "results"
    results.mkdir()
    update_readme(readme, results)
    assert "`results/runtime_default.json` is missing" in readme.read_text()
    _write(results / "runtime_default.json", {
        "steps": [{"name": "notebooks 01-04", "seconds": 1200}, {"name": "curve", "seconds": 60}],
        "total_seconds": 1260, "cpu": "AMD EPYC 9B14", "threads_available": 2, "from_scratch": True})
    lines = [{"item": "Table 1 4 loss AP", "committed": 40.0, "regenerated": 40.05, "verdict": "within tolerance"},
             {"item": "claim: x", "committed": "holds", "regenerated": "holds", "verdict": "identical"}]
    _write(results / "reproduction_accepted.json", {
        "verdict": "reproduced", "cpu": "AMD EPYC 9B14", "lines": lines,
        "counts": {"identical": 1, "within tolerance": 1, "differs": 0, "not run": 0}})
    update_readme(readme, results)
    text = readme.read_text()
    assert "`./reproduce.sh`: 21.0 minutes from scratch on AMD EPYC 9B14 (2 cores available" in text
    assert "- `./reproduce.sh`: 21 minutes from scratch on AMD EPYC 9B14 (2 cores, no GPU)" in text
    assert "**reproduced**" in text and "| Table 1 4 loss AP | 40 | 40.05 | within tolerance |" in text
    assert "claim: x" not in text  # identical lines are counted, not listed


def test_a_repository_root_regenerates_readme_and_every_docs_page(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- BEGIN generated:claims-summary -->\n<!-- END generated:claims-summary -->\n")
    (tmp_path / "docs" / "results.md").write_text("a\n<!-- BEGIN generated:claims -->\nx\n<!-- END generated:claims -->\n")
    (tmp_path / "docs" / "prose.md").write_text("no sections here\n")
    results = tmp_path / "results"
    claims = [{"claim": "A beats B", "verdict": "holds", "holds": True, "evidence": "1 vs 0", "beyond_paper": False},
              {"claim": "C beats B", "verdict": "inconclusive", "holds": False, "evidence": "0 vs 0",
               "beyond_paper": True}]
    _write(results / "tables" / "claims.json", {"claims": claims})
    found = update_readme(tmp_path, results)
    assert {p.relative_to(tmp_path).as_posix(): names for p, names in found.items()} == {
        "README.md": ["claims-summary"], "docs/prose.md": [], "docs/results.md": ["claims"]}
    assert "of the 1 claims from the paper, 1 hold" in (tmp_path / "README.md").read_text()
    assert "- **holds**: A beats B — 1 vs 0" in (tmp_path / "docs" / "results.md").read_text()
    assert (tmp_path / "docs" / "prose.md").read_text() == "no sections here\n"


@pytest.mark.parametrize("text, problem", [
    ("<!-- BEGIN generated:nonsense -->\n<!-- END generated:nonsense -->\n", "unknown generated section 'nonsense'"),
    ("<!-- BEGIN generated:claims -->\nbody\n", "'claims' has no END marker"),
    ("<!-- END generated:claims -->\n", "END of 'claims' without its BEGIN"),
])
def test_a_broken_marker_is_an_error_naming_the_page(tmp_path, text, problem):
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises(DetrqError, match=re.escape(problem)) as info:
        update_readme(page, tmp_path / "results")
    assert "page.md" in str(info.value)
    assert page.read_text() == text  # nothing written


def _row(precision: str, scheme: str, ap: float) -> dict:
    mixed = precision in ("6", "5", "4") and scheme != "uniform"
    return {"precision": precision, "scheme": scheme, "label": f"label {scheme}", "AP": ap, "avg_bits": 4.0,
            "paper_AP": PAPER_TABLE1.get((precision, scheme)), "delta_vs_uniform": 1.0 if mixed else None,
            "delta_ci": [0.5, 1.5] if mixed else None}


def test_compact_table1_has_the_papers_rows_then_first_order_and_measured():
    schemes = ["uniform", "loss", "out-float", "out-quant", "out-first-order", "out-quant-ggn", "loss-fisher",
               "measured"]
    rows = [_row("float", "none", 50.0), _row("8", "uniform", 49.0)]
    rows += [_row(p, s, 40.0) for p in ("6", "5", "4") for s in schemes]
    text = table1_compact_markdown({"rows": rows, "protocol": {"bootstrap": {"level": 0.95}}})
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    shown = [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in body]
    paper = ["label uniform", "label loss", "label out-float", "label out-quant"]
    beyond = ["label out-first-order *", "label measured *"]
    assert shown == [("Float", "label none"), ("8-bit", "label uniform")] + [
        (f"{p}-bit", s) for p in ("6", "5", "4") for s in paper + beyond]
    assert len(body) == len(PAPER_TABLE1) + 6  # the paper's 14 rows, First-Order and Measured Sen at 3 budgets
    assert "| 6-bit | label loss | 40.0 | +1.0 [+0.5, +1.5] | 4.00 | 36.7 |" in text
    assert "| 6-bit | label measured * | 40.0 | +1.0 [+0.5, +1.5] | 4.00 | - |" in text


def test_readme_is_a_front_page_whose_links_lead_somewhere():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "./reproduce.sh        #" in text and "./reproduce.sh test   #" in text  # the two commands, as CI runs
    assert "Nothing is installed\nby hand" in text and "requirements.lock" in text
    linked = {link.split("#")[0] for link in LINK.findall(text) if not link.startswith("http")}
    assert {p.relative_to(PROJECT_ROOT).as_posix() for p in DOCS.glob("*.md")} <= linked  # every docs page
    for link in sorted(linked):
        assert (PROJECT_ROOT / link).exists(), f"README.md links to {link}, which does not exist"
    assert "figures/fig1_hessian_traces.png" in linked or "figures/fig2_bit_allocation.png" in linked


def _slugs(page: Path) -> set[str]:
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_links_between_the_pages_resolve_to_files_and_headings():
    for page in doc_files(PROJECT_ROOT):
        for link in LINK.findall(page.read_text()):
            if link.startswith("http"):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            assert path.exists(), f"{page.name} links to {link}: no such file"
            if anchor:
                assert anchor in _slugs(path), f"{page.name} links to {link}: no such heading"


def test_pages_hold_no_machine_paths():
    for page in doc_files(PROJECT_ROOT):
        text = page.read_text()
        assert str(PROJECT_ROOT) not in text
        assert not re.search(r"(?<![\w.])/(work|home|root|Users|tmp|mnt)/", text), page.name


def test_committed_pages_are_up_to_date_with_results(tmp_path):
    """Regenerating README.md and docs/ from the committed results/ changes nothing (else: python -m detrq readme)."""
    shutil.copy2(README, tmp_path / "README.md")
    shutil.copytree(DOCS, tmp_path / "docs")
    found = update_readme(tmp_path, PROJECT_ROOT / "results")
    for page in doc_files(tmp_path):
        committed = PROJECT_ROOT / page.relative_to(tmp_path)
        assert page.read_text() == committed.read_text(), f"{committed.name} is stale: run python -m detrq readme"
    assert {name for names in found.values() for name in names} == set(SECTIONS)  # every section lives somewhere


def test_the_claims_table_follows_reproduce_sh_the_runtimes_and_the_figures():
    script = (PROJECT_ROOT / "reproduce.sh").read_text()
    notebook_steps = {step_name(s): s for s in profile_steps("params/default.yaml", "complete")}
    for step in STEPS:
        only = step.command.partition("--only ")[2]
        if step.run == "default" and only:  # reproduce.sh's notebook_steps: one step per step of the profile
            assert 'timed "$name"' in script and "--profile complete" in step.command
            names = notebook_steps.pop(step.name)
            assert only == " ".join(names) + (" --together" if len(names) > 1 else "")
        else:
            assert f'step "{step.name}"' in script, f"{step.name!r} is no step of reproduce.sh"
            assert not only or only in script
    assert not notebook_steps, f"steps of the complete profile missing from STEPS: {list(notebook_steps)}"
    assert INT8_NOTEBOOK in script
    for run in ("default", "int8"):
        runtime = PROJECT_ROOT / "results" / f"runtime_{run}.json"
        declared = {s.name for s in STEPS if s.run == run}
        assert {s["name"] for s in read_json(runtime)["steps"]} <= declared
    for png in sorted((PROJECT_ROOT / "figures").glob("*.png")):
        assert figure_entry(png.name) is not None, f"figures/{png.name} is in no row of FIGURES"
    assert all(any(figure_entry(p.name) == f for p in (PROJECT_ROOT / "figures").glob("*.png")) for f in FIGURES)
    text = claim_commands_markdown(PROJECT_ROOT / "results")
    for claim in read_json(PROJECT_ROOT / "results" / "tables" / "claims.json")["claims"]:
        assert f"| {claim['claim']} | {claim['verdict']} |" in text


def test_the_claims_table_says_not_measured_without_runtimes(tmp_path):
    _write(tmp_path / "tables" / "claims.json", {"claims": [
        {"claim": "A beats B", "verdict": "holds", "holds": True, "evidence": "-", "beyond_paper": False}]})
    text = claim_commands_markdown(tmp_path)
    assert "| A beats B | holds | 01, 02 → 03, `results/tables/claims.json` | 4 | not measured |" in text
    assert "none accepted yet" in text
