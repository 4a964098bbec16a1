"""The executed notebooks that a run writes are byte-stable: rerunning with the same results changes nothing,
so a run that reproduces the committed numbers leaves `git status` clean. The committed files hold no paths
of the machine that made them."""

import json
import re

import nbformat
import pytest

from detrq.artifact.notebooks import ALL_NOTEBOOKS, INJECTED_ID, NOTEBOOK_DIR, run_notebooks
from detrq.io.paths import PROJECT_ROOT


def _tiny_notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# tiny"),
                nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import sys\nprint(x * 2)\nprint('/home/me/warning', file=sys.stderr)")]
    nbformat.write(nb, str(path))
    return [c.id for c in nb.cells]


def test_rerun_writes_identical_bytes_with_fixed_ids(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    ids = _tiny_notebook(src / "tiny.ipynb")
    out = tmp_path / "out"
    run_notebooks({"x": 21}, out, names=("tiny",), notebook_dir=src, log=lambda _: None)
    first = (out / "tiny.ipynb").read_bytes()
    # The second run starts from the executed copy, as a rerun over the committed notebooks does.
    run_notebooks({"x": 21}, out, names=("tiny",), notebook_dir=out, log=lambda _: None)
    assert (out / "tiny.ipynb").read_bytes() == first
    nb = json.loads(first)
    assert [c["id"] for c in nb["cells"]] == [ids[0], ids[1], INJECTED_ID, ids[2]]
    assert "papermill" not in nb["metadata"]
    assert all(not ({"papermill", "execution", "ExecuteTime"} & set(c["metadata"])) for c in nb["cells"])
    assert [o["name"] for o in nb["cells"][3]["outputs"]] == ["stdout"]  # stderr (warnings, bars) dropped
    assert "".join(nb["cells"][3]["outputs"][0]["text"]) == "42\n"


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
    import ast

    import papermill

    path = NOTEBOOK_DIR / f"{name}.ipynb"
    cell = next(c for c in nbformat.read(str(path), as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = [t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert list(papermill.inspect_notebook(str(path))) == assigned
