"""Where the repository's own files live: the root that relative paths in params files and defaults resolve to."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str | Path) -> Path:
    """``path`` as given if absolute, else relative to the repository root, so that a notebook finds the same
    files whether papermill or nbval starts it in the repository root or in ``notebooks/``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def repo_relative(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it, else as given: what a committed file
    stores, so that it holds no absolute path of the machine that made it."""
    p = Path(path)
    if p.is_absolute() and p.resolve().is_relative_to(PROJECT_ROOT):
        return str(p.resolve().relative_to(PROJECT_ROOT))
    return str(path)
