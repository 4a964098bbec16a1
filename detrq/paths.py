"""Where the repository's own files live: the root that relative paths in params files and defaults resolve to."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
