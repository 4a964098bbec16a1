"""The executed notebooks that a run writes are byte-stable: rerunning with the same results changes nothing,
so a run that reproduces the committed numbers leaves `git status` clean. Each has one parameters cell, with
papermill's injected values folded into it, so that an edit of it is what runs; the kernelspec is the one
JupyterLab writes, so that opening a notebook does not modify it. The committed files hold no paths of the
machine that made them."""

import ast
import json
import re

import nbformat
import pytest

from detrq.artifact.notebooks import (ALL_NOTEBOOKS, INJECTED_TAG, KERNELSPEC, NOTEBOOK_DIR, PARAMETERS_TAG,
                                      fold_parameters, load_parameters, profile_notebooks, run_notebooks)
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT


def _tiny_notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"),
                nbformat.v4.new_code_cell("x = 1  # int: a number (ünïcode — kept)\nname = 'a'  # str: a name",
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import sys\nprint(x * 2, name)\n"
                                          "print('/home/me/warning', file=sys.stderr)\n3")]
    nbformat.write(nb, str(path))
    return [c.id for c in nb.cells]


def test_rerun_writes_identical_bytes_with_the_values_folded_into_the_parameters_cell(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids = _tiny_notebook(src / "tiny.ipynb")
    out = tmp_path / "out"
    run_notebooks({"x": 21, "name": "zz"}, out, names=("tiny",), notebook_dir=src, log=lambda _: None)
    first = (out / "tiny.ipynb").read_bytes()
    # The second run starts from the executed copy, as a rerun over the committed notebooks does.
    run_notebooks({"x": 21, "name": "zz"}, out, names=("tiny",), notebook_dir=out, log=lambda _: None)
    assert (out / "tiny.ipynb").read_bytes() == first
    nb = json.loads(first)
    assert [c["id"] for c in nb["cells"]] == ids  # no injected cell: folded into the parameters cell
    params = "".join(nb["cells"][1]["source"])
    assert params == "x = 21  # int: a number (ünïcode — kept)\nname = \"zz\"  # str: a name"
    assert nb["metadata"]["kernelspec"] == KERNELSPEC and "papermill" not in nb["metadata"]
    assert all(not ({"papermill", "execution", "ExecuteTime"} & set(c["metadata"])) for c in nb["cells"])
    code = nb["cells"][2]
    assert [o["output_type"] for o in code["outputs"]] == ["stream", "execute_result"]  # stderr dropped
    assert "".join(code["outputs"][0]["text"]) == "42 zz\n"
    # numbered as a run of all cells in a fresh kernel numbers them
    assert [c.get("execution_count") for c in nb["cells"][1:]] == [1, 2] and code["outputs"][1]["execution_count"] == 2


def test_fold_keeps_comments_replaces_multiline_values_and_appends_new_names():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('d = {"a": [1,\n     2]}  # dict: spans lines\nb = None  # int | None: kept',
                                  metadata={"tags": [PARAMETERS_TAG]}),
        nbformat.v4.new_code_cell('# Parameters\nd = {"z": 3}\nnew = [4.5]\n', metadata={"tags": [INJECTED_TAG]}),
        nbformat.v4.new_code_cell("print(d)")])
    fold_parameters(nb)
    assert len(nb.cells) == 2
    assert nb.cells[0].source == 'd = {"z": 3}  # dict: spans lines\nb = None  # int | None: kept\nnew = [4.5]'


def _committed(name):
    return nbformat.read(str(NOTEBOOK_DIR / f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_committed_notebook_has_one_parameters_cell_the_walkthrough_folders_and_jupyterlab_kernelspec(name):
    nb = _committed(name)
    tagged = [c for c in nb.cells if {PARAMETERS_TAG, INJECTED_TAG} & set(c.metadata.get("tags", []))]
    assert len(tagged) == 1 and tagged[0].metadata["tags"] == [PARAMETERS_TAG]
    assert tagged[0] is next(c for c in nb.cells if c.cell_type == "code")  # the first code cell
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(tagged[0].source).body}
    assert values["results_dir"] == "runs/walkthrough/results"
    assert values.get("figures_dir", "runs/walkthrough/figures") == "runs/walkthrough/figures"
    assert nb.metadata["kernelspec"] == KERNELSPEC
    assert not any("](../" in c.source for c in nb.cells if c.cell_type == "markdown")  # no links out of notebooks/
    assert not any(re.search(r"^\s*(def|class) ", c.source, re.M) for c in nb.cells if c.cell_type == "code")


def _machine_paths(text: str) -> list[str]:
    pattern = re.compile(rf"{re.escape(str(PROJECT_ROOT))}|(?<![\w.])/(?:home|tmp|work|root|Users)/[\w.-]+")
    return pattern.findall(text)


def test_committed_results_and_notebooks_hold_no_machine_paths():
    files = sorted((PROJECT_ROOT / "results").rglob("*.json")) + sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))
    found = {p.name: hits[:2] for p in files if (hits := _machine_paths(p.read_text()))}
    assert not found, f"absolute paths in committed files: {found}"


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_papermill_sees_every_parameter_of_the_parameters_cell(name):
    # papermill drops a parameter whose help comment it cannot parse (an apostrophe, a '='), and a dropped name
    # makes params/*.yaml reject that key; compare its list with the names the cell assigns.
    import papermill

    path = NOTEBOOK_DIR / f"{name}.ipynb"
    cell = next(c for c in _committed(name).cells if PARAMETERS_TAG in c.metadata.get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert list(papermill.inspect_notebook(str(path))) == assigned


def test_a_headless_run_shows_each_cell_and_the_kernels_progress_but_no_transport_warning(tmp_path, capfd):
    src = tmp_path / "src"
    src.mkdir()
    _tiny_notebook(src / "tiny.ipynb")
    said = []
    run_notebooks({"x": 1}, tmp_path / "out", names=("tiny",), notebook_dir=src, log=said.append)
    assert said[0] == "== notebook tiny"
    assert [line.split("]")[0].split(",")[0] for line in said[1:3]] == ["   [tiny cell 1/2", "   [tiny cell 2/2"]
    assert said[1].endswith("] tiny")  # the heading above the cell
    err = capfd.readouterr().err
    assert "/home/me/warning" in err  # the kernel's stderr (progress bars) reaches the console
    assert "without encryption" not in err and "[IPKernelApp]" not in err


def test_profiles_choose_the_notebooks_and_override_values():
    paper = load_parameters("params/default.yaml", names=ALL_NOTEBOOKS, profile="paper")
    complete = load_parameters("params/default.yaml", names=ALL_NOTEBOOKS)
    assert set(paper["estimators"]) == {"loss", "out-float", "out-quant"} and paper["stability_seeds"] == 1
    assert "modelopt" in complete["estimators"] and complete["stability_seeds"] == 3
    assert {k: v for k, v in paper.items() if k not in ("estimators", "extra_variants", "probes", "stability_seeds",
                                                        "measured_sen")} == \
           {k: v for k, v in complete.items() if k not in ("estimators", "extra_variants", "probes", "stability_seeds",
                                                           "measured_sen")}
    assert profile_notebooks("params/default.yaml", "paper") == ("01_hessian_traces", "02_bit_allocation",
                                                                 "03_table1", "04_figures")
    assert profile_notebooks("params/default.yaml") == profile_notebooks("params/default.yaml", "complete")
    assert profile_notebooks("params/full.yaml", "paper") == profile_notebooks("params/default.yaml", "paper")
    with pytest.raises(DetrqError, match="no profile 'fast'"):
        profile_notebooks("params/default.yaml", "fast")


def test_notebooks_run_together_give_what_each_gives_alone(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tiny_notebook(src / "one.ipynb")
    _tiny_notebook(src / "two.ipynb")
    alone, together = tmp_path / "alone", tmp_path / "together"
    for name in ("one", "two"):
        run_notebooks({"x": 3, "threads": 2}, alone, names=(name,), notebook_dir=src, log=lambda _: None)
    said = []
    seconds = run_notebooks({"x": 3, "threads": 2}, together, names=("one", "two"), notebook_dir=src,
                            log=said.append, together=True)
    assert set(seconds) == {"one", "two"} and {"== notebook one", "== notebook two"} <= set(said)
    for name in ("one", "two"):
        assert (together / f"{name}.ipynb").read_bytes() == (alone / f"{name}.ipynb").read_bytes()
