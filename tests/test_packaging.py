"""Every dependency pyproject.toml declares is pinned, torch/torchvision at the versions on this disk (the lock's
agreement with them and environment.yml's use of the lock are tests/test_lock.py's)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_dependency_is_pinned_and_torch_stays_at_the_local_build():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][^ ]*", d) for d in deps), "every dependency is pinned"
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
