"""The walkthrough in a real browser: Debian's chromium, driven by playwright, on JupyterLab started with README's
command in a copy of this checkout (its own git repository, so that `git status` can be asserted).

As a reader would: open notebook 04 and run it (its figures load; saving it writes the committed bytes back),
then in notebook 02 edit a parameter (``targets = [4.5]``) and run all (the edit is what runs), then run 04
again (it draws the edited bit maps). No news popup, nothing marked modified on opening, and afterwards
`git status` is clean: the walkthrough wrote only under runs/. Skipped where chromium or playwright is missing.
Screenshots go to $DETRQ_SCREENSHOTS when it is set.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detrq.io.paths import PROJECT_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# README's launch command, run in the repository root; --allow-root as README says when running as root.
README_COMMAND = [".venv/bin/jupyter", "lab"]
TOKEN = "detrq-browser-test"
RUN_TIMEOUT_MS = 600_000

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                       "(apt-get install chromium); .ci/run installs it"),
    pytest.mark.skipif(shutil.which("git") is None or not (PROJECT_ROOT / ".git").exists(),
                       reason="needs git and a git checkout (the test copies the checkout's files)"),
]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _copy_checkout(dst: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files, with its .venv and data linked, committed in a
    repository of its own."""
    files = _git(PROJECT_ROOT, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        src = PROJECT_ROOT / name
        if src.is_file() and not src.is_symlink():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    (dst / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (dst / "data").mkdir(exist_ok=True)
    (dst / "data" / "synthetic").symlink_to(PROJECT_ROOT / "data" / "synthetic")
    _git(dst, "init", "-q")
    _git(dst, "add", "-A")
    _git(dst, "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "copy")
    return dst


@pytest.fixture
def lab(tmp_path):
    pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package (pip install playwright)")
    if not (PROJECT_ROOT / ".venv" / "bin" / "jupyter").is_file():
        pytest.skip("needs .venv/bin/jupyter (./reproduce.sh sets up .venv)")
    if not (PROJECT_ROOT / "data" / "synthetic").is_dir():
        pytest.skip("needs the synthetic data (./reproduce.sh test generates it)")
    installed = PROJECT_ROOT / ".venv" / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    shipped = PROJECT_ROOT / "notebooks" / "jupyterlab-overrides.json"
    assert installed.is_file() and installed.read_bytes() == shipped.read_bytes(), \
        "the venv lacks the project's JupyterLab settings: ./reproduce.sh installs notebooks/jupyterlab-overrides.json"
    repo = _copy_checkout(tmp_path / "repo")
    home = tmp_path / "home"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The user's own Jupyter settings stay out (the project's settings must do the work); the kernel imports the
    # copy's detrq, so that everything it writes lands in the copy.
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "PYTHONPATH": str(repo)}
    command = README_COMMAND + (["--allow-root"] if os.geteuid() == 0 else []) + [
        "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}"]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield repo, base
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("DETRQ_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


ACTIVE = ".jp-NotebookPanel:not(.lm-mod-hidden)"


def _wait_kernel_idle(page) -> None:
    # The status bar names the active notebook's kernel and its state: "Python 3 (ipykernel) | Idle".
    page.wait_for_function("() => document.querySelector('#jp-main-statusbar')?.innerText.includes('| Idle')",
                           timeout=180_000)


def _run_all(page) -> None:
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
    # Running: the queued cells show [*] at once; done when every code cell shows an execution count again.
    prompts = f"[...document.querySelectorAll('{ACTIVE} .jp-CodeCell .jp-InputPrompt')]"
    page.wait_for_function(f"() => {prompts}.some(p => p.textContent.includes('*'))", timeout=30_000)
    page.wait_for_function(f"() => {prompts}.every(p => /\\[\\d+\\]/.test(p.textContent))",
                           timeout=RUN_TIMEOUT_MS)
    errors = page.locator(f"{ACTIVE} .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t.split("\n")[0]]
    assert not tracebacks, tracebacks[:1]


def _open(page, base: str, name: str) -> None:
    page.locator(".jp-DirListing-item", has_text=name).first.dblclick()
    # The page title names the active document: "04_figures.ipynb - JupyterLab" (shortened when long).
    page.wait_for_function(f"() => document.querySelector('{ACTIVE} .jp-CodeCell') && "
                           f"document.title.startsWith('{name[:8]}')", timeout=60_000)
    _wait_kernel_idle(page)


def _outputs_text(page) -> str:
    # textContent, not innerText: cells scrolled out of view are not laid out, and have no innerText.
    return "\n".join(page.locator(f"{ACTIVE} .jp-OutputArea-output").all_text_contents())


def _images(page) -> list[int]:
    return page.evaluate(f"() => [...document.querySelectorAll('{ACTIVE} .jp-OutputArea-output img')]"
                         ".map(img => img.naturalWidth)")


def _dirty(page) -> bool:
    return page.evaluate("() => !!document.querySelector('.lm-TabBar-tab.jp-mod-dirty')")


def test_walkthrough_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    repo, base = lab
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        try:
            _walkthrough(page, repo, base)
        except Exception:
            _shot(page, "failure")
            raise
        finally:
            browser.close()

    # Nothing the walkthrough wrote is tracked or unignored: the edited 02 was not saved (autosave is off), the
    # results and figures went to runs/walkthrough/.
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert (repo / "runs" / "walkthrough" / "results" / "bitmaps" / "bitmap_loss_4.5bit.json").is_file()
    assert not (repo / "results" / "bitmaps" / "bitmap_loss_4.5bit.json").exists()


def _walkthrough(page, repo: Path, base: str) -> None:
    committed_04 = (repo / "notebooks" / "04_figures.ipynb").read_bytes()
    page.goto(f"{base}/lab/tree/notebooks?token={TOKEN}")
    page.wait_for_selector(".jp-DirListing-item", timeout=120_000)

    # 04 as committed: figures load, nothing is marked modified on opening, no news popup; a save after
    # running it writes the committed bytes back (the outputs did not change).
    _open(page, base, "04_figures.ipynb")
    page.wait_for_timeout(3000)
    assert not _dirty(page), "opening 04 marked it modified"
    assert "Jupyter news" not in page.inner_text("body"), "the news popup is shown"
    _shot(page, "01_opened_04")
    _run_all(page)
    widths = _images(page)
    assert len(widths) >= 2 and all(w > 0 for w in widths), widths
    page.locator(f"{ACTIVE} .jp-OutputArea-output img").first.scroll_into_view_if_needed()
    _shot(page, "02_ran_04_figure1")
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-dirty')", timeout=30_000)
    assert (repo / "notebooks" / "04_figures.ipynb").read_bytes() == committed_04, \
        "running and saving 04 changed the committed notebook"

    # 02: edit one parameter in its parameters cell and run all: the edit is what runs.
    _open(page, base, "02_bit_allocation.ipynb")
    line = page.locator(f"{ACTIVE} .jp-CodeCell .cm-line", has_text="targets = [6, 5, 4]").first
    line.click()
    page.keyboard.press("End")
    page.keyboard.press("Shift+Home")
    page.keyboard.insert_text("targets = [4.5]  # list: edited in the browser")
    _shot(page, "03_edited_02")
    _run_all(page)
    text = _outputs_text(page)
    assert "loss            : average bits 4.5 -> " in text, text[-3000:]
    assert "average bits 6 ->" not in text
    page.locator(f"{ACTIVE} .jp-Cell").last.scroll_into_view_if_needed()
    _shot(page, "04_ran_02")

    # 04 again: Figure 2 now shows notebook 02's 4.5-bit maps, and every figure loads.
    page.locator(".lm-TabBar-tab", has_text="04_figures").first.click()
    page.wait_for_function("() => document.title.startsWith('04_figur')")
    _wait_kernel_idle(page)
    _run_all(page)
    assert "Figure 2 shows 4.5 bits" in _outputs_text(page)
    widths = _images(page)
    assert len(widths) >= 2 and all(w > 0 for w in widths), widths
    page.locator(f"{ACTIVE} .jp-OutputArea-output img").nth(1).scroll_into_view_if_needed()
    _shot(page, "05_reran_04_figure2")
