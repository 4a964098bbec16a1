"""requirements.lock pins the whole environment with hashes and agrees with pyproject.toml; environment.yml and
./reproduce.sh install from it. Reads files only: no network, no installs."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
COMPILE = (
    "pip-compile --allow-unsafe --generate-hashes --no-emit-find-links --no-emit-index-url --strip-extras "
    "--extra test --output-file=requirements.lock pyproject.toml"
)


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries():
    """{normalized name: (version, [sha256 hashes])} of every requirement in the lock."""
    entries, current = {}, None
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)\s*\\?$", line)
        if m:
            name = norm(m[1])
            assert name not in entries, f"{m[1]} is in the lock twice"
            entries[name] = (m[2], [])
            current = name
            continue
        h = re.fullmatch(r"\s+--hash=sha256:([0-9a-f]{64})\s*\\?", line)
        assert h and current, f"unexpected line in requirements.lock: {line!r}"
        entries[current][1].append(h[1])
    return entries


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_direct_dependency_is_locked_at_its_pin():
    # the test extra is locked too: ./reproduce.sh test installs only from the lock
    entries = lock_entries()
    project = pyproject()["project"]
    for dep in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", dep)
        assert m, f"pyproject.toml dependency not pinned with ==: {dep}"
        assert norm(m[1]) in entries, f"{m[1]} is missing from requirements.lock (regenerate it, see pyproject.toml)"
        assert entries[norm(m[1])][0] == m[2], f"{m[1]}: pyproject pins {m[2]}, the lock {entries[norm(m[1])][0]}"


def test_every_lock_entry_has_a_hash():
    entries = lock_entries()
    assert len(entries) > len(pyproject()["project"]["dependencies"]), "the lock holds the transitive packages too"
    assert not [n for n, (_, hashes) in entries.items() if not hashes], "lock entries without --hash"


def test_lock_has_setuptools_for_the_editable_install():
    # reproduce.sh installs detrq with --no-build-isolation, so the build backend comes from the lock.
    entries = lock_entries()
    assert "setuptools" in entries
    major = int(entries["setuptools"][0].split(".")[0])
    assert any(r.startswith("setuptools") for r in pyproject()["build-system"]["requires"])
    assert major >= 61


def test_lock_has_the_cuda_dependencies_of_torch():
    entries = lock_entries()
    assert "triton" in entries and any(n.startswith("nvidia-") for n in entries)


def test_lock_has_no_absolute_paths_or_index_options():
    text = LOCK.read_text()
    assert "file://" not in text
    assert not re.search(r"(^|[\s=(\"'])/[A-Za-z]", text, re.MULTILINE), "absolute path in requirements.lock"
    assert not re.search(r"^\s*--(find-links|index-url|extra-index-url|trusted-host)", text, re.MULTILINE)


def test_lock_header_names_platform_and_command():
    lines = LOCK.read_text().splitlines()
    header = "\n".join(lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])
    assert "linux x86_64" in header and "CPython 3.11" in header
    assert COMPILE in header
    assert COMPILE in (ROOT / "pyproject.toml").read_text(), "pyproject.toml names the command that regenerates"


def test_local_torch_wheels_hashes_are_in_the_lock():
    # pip takes torch and torchvision from this machine's disk index; their hashes must be in the lock, or
    # pip install --require-hashes fails. Checked only where that index exists.
    entries = lock_entries()
    checked = 0
    for name in ("torch", "torchvision"):
        version, hashes = entries[name]
        for index in (Path("/opt/pypi-more/simple"), Path("/opt/pypi/simple")):
            page = index / name / "index.html"
            if not page.is_file():
                continue
            for fname, sha in re.findall(r"/([^/\"#]+\.whl)#sha256=([0-9a-f]{64})", page.read_text()):
                if fname.startswith(f"{name}-{version}-cp311-cp311-") and "x86_64" in fname:
                    assert sha in hashes, f"{fname}: its hash is not in requirements.lock"
                    checked += 1
    if not checked:
        pytest.skip("no local wheel index on this machine")


def test_environment_yml_installs_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert "-r requirements.lock" in pip
    # everything comes from the lock: no package pins of its own beside it
    assert all(p.startswith("-") for p in pip), pip


def test_reproduce_sh_installs_the_lock():
    text = (ROOT / "reproduce.sh").read_text()
    body = text[text.index("setup_venv() {") :]
    body = body[: body.index("\n}\n")]
    assert "pip install --quiet --require-hashes -r requirements.lock" in body
    assert "--no-deps --no-build-isolation -e ." in body
    assert "requirements.lock -nt .venv/.detrq-installed" in body
    assert "pyproject.toml -nt .venv/.detrq-installed" in body
