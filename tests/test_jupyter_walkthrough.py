"""The interactive walkthrough works as README says: the venv's Jupyter server, rooted at the repository, lists the
notebooks over its REST API, and a kernel that the server starts imports detrq and runs notebook 01's parameters and
setup cells (tests/test_browser_walkthrough.py drives JupyterLab itself in a browser)."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from detrq.artifact.notebooks import ALL_NOTEBOOKS
from detrq.io.paths import PROJECT_ROOT

TOKEN = "detrq-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(f"{base}{path}", method=method, data=None if body is None else
                                 json.dumps(body).encode(), headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.Popen([str(jupyter), "server", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={PROJECT_ROOT}"]
                            + (["--allow-root"] if os.geteuid() == 0 else []),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                _api(base, "/api/status")
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyter server exited: {proc.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        else:
            raise RuntimeError("jupyter server did not answer within 60 s")
        yield base, tmp_path / "runtime"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_server_lists_notebooks_and_its_kernel_runs_notebook_01(server):
    from jupyter_client import BlockingKernelClient

    base, runtime = server
    listed = {item["name"] for item in _api(base, "/api/contents/notebooks")["content"]}
    assert {f"{n}.ipynb" for n in ALL_NOTEBOOKS} <= listed

    kernel = _api(base, "/api/kernels", "POST", {"name": "python3", "path": "notebooks"})
    try:
        client = BlockingKernelClient(connection_file=str(runtime / f"kernel-{kernel['id']}.json"))
        client.load_connection_file()
        client.start_channels()
        client.wait_for_ready(timeout=120)
        nb = nbformat.read(str(PROJECT_ROOT / "notebooks" / "01_hessian_traces.ipynb"), as_version=4)
        # The parameters cell and the setup cell: imports detrq, fills the walkthrough's run directory (under
        # runs/, gitignored) on first use, loads the mini checkpoint, builds the settings.
        first = [c.source for c in nb.cells if c.cell_type == "code"][:2]
        outputs = []
        for source in first + ["import detrq, os; print(type(model).__name__, len(schemes), detrq.__file__)"]:
            reply = client.execute_interactive(source, timeout=300, output_hook=outputs.append)
            assert reply["content"]["status"] == "ok", reply["content"]
        printed = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        name, n_schemes, path = printed.split()[-3:]
        assert name == "DETR" and int(n_schemes) >= 4
        assert Path(path).resolve().is_relative_to(PROJECT_ROOT)  # the venv's editable detrq, not another one
        client.stop_channels()
    finally:
        _api(base, f"/api/kernels/{kernel['id']}", "DELETE")
