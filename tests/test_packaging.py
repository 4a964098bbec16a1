"""The pins that pyproject.toml and environment.yml give must agree, and torch/torchvision stay pinned."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_equal_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    norm = lambda xs: sorted(x.lower() for x in xs if not x.startswith("-e"))  # noqa: E731
    assert norm(deps) == norm(pip)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][^ ]*", d) for d in deps), "every dependency is pinned"
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
