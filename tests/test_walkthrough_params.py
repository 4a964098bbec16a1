"""The walkthrough as a person runs it: an edited parameters cell is what runs, an edit of notebook 02 reaches
Table 1 (notebook 03) through the run directory they share, and the walkthrough's run directory is filled from
the committed results without ever writing them."""

import hashlib
import re
import shutil

import nbformat
import pytest

from detrq.artifact import walkthrough
from detrq.artifact.notebooks import NOTEBOOK_DIR, PARAMETERS_TAG
from detrq.artifact.walkthrough import (SEEDED_MARKER, bits_range_rule, notebook02_allocations, run_dirs,
                                        seed_folder)
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file
from detrq.io.paths import PROJECT_ROOT
from detrq.io.results import read_json


def _tree_digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_seed_folder_fills_once_never_overwrites_and_only_reads_the_source(tmp_path):
    source = tmp_path / "results"
    (source / "traces").mkdir(parents=True)
    (source / "traces" / "traces_loss.json").write_text("{}")
    (source / "runtime_default.json").write_text("{}")  # run-level: not copied
    (source / ".lock").write_text("")
    before = _tree_digest(source)
    run = tmp_path / "run" / "results"
    run.mkdir(parents=True)
    (run / ".lock").write_text("")  # what `python -m detrq notebooks` leaves: the folder still counts as empty
    assert seed_folder(run, source) == ["traces"]
    assert (run / "traces" / "traces_loss.json").read_text() == "{}" and not (run / "runtime_default.json").exists()
    assert (run / SEEDED_MARKER).is_file()
    (run / "traces" / "traces_loss.json").write_text('{"mine": 1}')  # a walkthrough edit
    shutil.rmtree(run / "traces")
    assert seed_folder(run, source) == []  # filled once: a later call changes nothing
    assert _tree_digest(source) == before
    with pytest.raises(DetrqError, match="from itself"):
        seed_folder(source, source)


def test_run_dirs_fills_only_folders_under_runs_walkthrough(tmp_path, monkeypatch):
    committed = tmp_path / "results"
    committed.mkdir()
    (committed / "claims.json").write_text("{}")
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "fig1.png").write_bytes(b"png")
    monkeypatch.setattr(walkthrough, "WALKTHROUGH_DIR", tmp_path / "runs" / "walkthrough")
    monkeypatch.setattr(walkthrough, "COMMITTED_RESULTS", committed)
    monkeypatch.setattr(walkthrough, "COMMITTED_FIGURES", figures)
    dirs = run_dirs(tmp_path / "runs" / "walkthrough" / "results", tmp_path / "runs" / "walkthrough" / "figures")
    assert (dirs.results / "claims.json").is_file() and (dirs.figures / "fig1.png").is_file()
    other = run_dirs(tmp_path / "runs" / "default" / "results")  # a reproduction computes everything itself
    assert other.figures is None and not other.results.exists()
    assert run_dirs("results").results == PROJECT_ROOT / "results"  # relative paths are taken from the repo root


def test_bits_range_rule():
    paper = bits_range_rule(None)
    assert paper(6) == range(4, 8) and paper(4.5) == range(3, 7)
    assert bits_range_rule([2, 8])(4.5) == range(2, 9)
    per_target = bits_range_rule({4.5: [3, 5]})
    assert per_target(4.5) == range(3, 6) and per_target(6) == range(4, 8)
    for bad in ([3], [6, 4], [1, 8], "3-6"):
        with pytest.raises(DetrqError, match="bits_range"):
            bits_range_rule(bad)


def test_notebook02_allocations_reads_the_committed_bit_maps():
    nb02 = notebook02_allocations(PROJECT_ROOT / "results")
    assert nb02.targets == (6, 5, 4) and nb02.negative_traces == "abs" and nb02.quantizer == "eq6"
    assert "measured" in nb02.allocations and {"loss", "out-float", "out-quant"} <= set(nb02.allocations)
    assert len(nb02.replicas) == 2 and "measured" not in nb02.replicas[0]
    assert nb02.allocations["loss"][5]["avg_bits_target"] == 5


def _with_parameters(name, **values):
    """The committed notebook with its parameters cell edited as a reader edits it: one line per value."""
    nb = nbformat.read(str(NOTEBOOK_DIR / f"{name}.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if PARAMETERS_TAG in c.metadata.get("tags", []))
    for key, value in values.items():
        cell.source, n = re.subn(rf"^{key} = .*$", f"{key} = {value!r}", cell.source, flags=re.M)
        assert n == 1, key
    return nb


def _execute(nb):
    from nbclient import NotebookClient

    # As JupyterLab runs it: the kernel starts in notebooks/.
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    return nb


def _printed(nb):
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_an_edit_of_notebook_02_is_used_and_reaches_table1_without_writing_the_committed_results(tmp_path):
    committed = PROJECT_ROOT / "results"
    before = _tree_digest(committed)
    results = tmp_path / "results"
    seed_folder(results, committed)  # as the walkthrough's run directory is filled
    nb02 = _execute(_with_parameters("02_bit_allocation", results_dir=str(results), targets=[4.5]))
    assert "loss            : average bits 4.5 -> " in _printed(nb02)
    assert read_json(results_file(results, "bitmap_loss_4.5bit.json"))["avg_bits_target"] == 4.5
    nb03 = _execute(_with_parameters("03_table1", results_dir=str(results)))
    assert "targets 4.5," in _printed(nb03)
    rows = read_json(results_file(results, "table1.json"))["rows"]
    mixed = {(r["precision"], r["scheme"]) for r in rows if r["scheme"] not in ("none", "uniform")}
    assert ("4.5", "out-quant") in mixed and ("4.5", "measured") in mixed and all(p == "4.5" for p, _ in mixed)
    assert "4.5 bits: loss" in _printed(nb03)
    assert _tree_digest(committed) == before
