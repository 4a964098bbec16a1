"""One writer per results folder: a second writer stops with one line naming the holder, or waits."""

import subprocess
import sys
import threading
import time

import pytest

from detrq.errors import DetrqError
from detrq.locking import folder_lock

HOLD = ("import sys, time\nfrom detrq.locking import folder_lock\nwith folder_lock(sys.argv[1]):\n"
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
    from detrq.paths import PROJECT_ROOT

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
