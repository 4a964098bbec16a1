"""One writer per results folder: a second writer stops with one line naming the holder, or waits; an
interrupted run keeps the committed files and resumes."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from detrq.io.errors import DetrqError
from detrq.io.locking import folder_lock

HOLD = ("import sys, time\nfrom detrq.io.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(60)\n")


def test_second_writer_in_process_is_refused_then_admitted(tmp_path):
    with folder_lock(tmp_path):
        with pytest.raises(DetrqError, match=r"is being written by pid \d+"):
            with folder_lock(tmp_path):
                pass
    with folder_lock(tmp_path):  # released on exit
        pass


def test_wait_blocks_until_the_holder_is_done(tmp_path):
    order = []

    def holder():
        with folder_lock(tmp_path):
            order.append("held")
            time.sleep(0.5)
            order.append("released")

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        time.sleep(0.01)
    with folder_lock(tmp_path, wait=True):
        order.append("second")
    t.join()
    assert order == ["held", "released", "second"]


def test_cli_writer_names_the_process_that_holds_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run([sys.executable, "-m", "detrq", "curve", "--results-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines() == [
            f"error: {tmp_path} is being written by pid {holder.pid} (-c {tmp_path}); wait for it to finish "
            "(or pass --wait)"]
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no stale lock: the kernel released it.
    with folder_lock(tmp_path):
        pass


def test_a_second_reproduce_run_names_the_first_and_stops():
    from detrq.io.paths import PROJECT_ROOT

    lock = PROJECT_ROOT / "runs" / ".reproduce.pid"
    if lock.exists():
        pytest.skip("a ./reproduce.sh run holds this checkout")
    lock.parent.mkdir(exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{sleeper.pid}\n")
        out = subprocess.run(["bash", str(PROJECT_ROOT / "reproduce.sh"), "accept"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2
        assert f"another ./reproduce.sh (pid {sleeper.pid}) is running" in out.stderr
        assert lock.read_text().strip() == str(sleeper.pid)  # the first run's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()
        lock.unlink(missing_ok=True)


HOLD_UNTIL_STDIN = ("import sys\nfrom detrq.io.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n"
                    "    print('held', flush=True)\n    sys.stdin.readline()\n")


def test_a_second_cli_writer_with_wait_waits_for_the_holder_then_writes(tmp_path):
    from test_bad_inputs import traces_file

    from detrq.io.paths import PROJECT_ROOT
    from detrq.models.detr import build_detr
    from detrq.quant.bitmaps import quantizable_layers

    folder = tmp_path / "results"
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps(traces_file(quantizable_layers(build_detr("mini")))))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_STDIN, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        writer = subprocess.Popen([sys.executable, "-m", "detrq", "--wait", "allocate", "--traces", str(traces),
                                   "--checkpoint", str(PROJECT_ROOT / "checkpoints" / "detr_mini.pth"),
                                   "--avg-bits", "5", "--out", str(folder / "bitmap.json")],
                                  stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = writer.stderr.readline()  # the writer says whom it waits for, and blocks
        assert line.startswith(f"waiting for pid {holder.pid} ") and str(folder) in line, line
        time.sleep(0.5)
        assert writer.poll() is None and not (folder / "bitmap.json").exists()
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert (folder / "bitmap.json").is_file()
    finally:
        for p in (holder, locals().get("writer")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_ctrl_c_in_a_notebook_keeps_committed_files_and_the_run_resumes(tmp_path, monkeypatch):
    """An interrupted run leaves the committed notebooks (and results, README: a run writes only runs/<run>/) as
    they were; started again it resumes: the steps it finished are kept."""
    import nbformat
    import papermill

    import detrq.artifact.notebooks as nb
    from detrq.artifact import reproduction as rp

    committed = tmp_path / "notebooks"
    committed.mkdir()
    for name in ("01_a", "02_b"):
        cell = nbformat.v4.new_code_cell("print('committed')")
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), str(committed / f"{name}.ipynb"))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table1.json").write_text('{"committed": true}')
    (tmp_path / "README.md").write_text("committed README\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    run = tmp_path / "runs" / "default"
    assert rp.start_run(run, reuse=False).mode == "fresh"

    def execute(source, output, **kwargs):
        if source.endswith("02_b.ipynb"):
            Path(output).write_text("partial")  # a half-written executed copy ...
            raise KeyboardInterrupt  # ... when Ctrl-C arrives
        (run / "results").mkdir(exist_ok=True)
        (run / "results" / "step_a.json").write_text("{}")
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('run')")]), output)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(nb, "declared_parameters", lambda names, notebook_dir: {n: set() for n in names})
    with pytest.raises(KeyboardInterrupt):
        nb.run_notebooks({}, run / "notebooks", names=("01_a", "02_b"), notebook_dir=committed, log=lambda s: None)
    assert {p: p.read_bytes() for p in before} == before  # committed notebooks, results and README untouched
    assert (run / "notebooks" / "01_a.ipynb").is_file() and not (run / "notebooks" / "02_b.ipynb").exists()
    start = rp.start_run(run, reuse=False)  # ./reproduce.sh again
    assert start.mode == "resumed" and (run / "results" / "step_a.json").is_file()
