"""On-disk caching of expensive results (evaluations, Hessian traces), keyed by everything that determines them.

A result file stores its ``cache_key``; a later run with the same key reuses the file instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from detrq.errors import DetrqError
from detrq.results import read_json


def cache_key(**parts: Any) -> str:
    """SHA-256 of the JSON of ``parts`` (sorted keys), e.g. checkpoint hash, data hash, protocol, seed."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def load_cached(path: str | Path, key: str) -> dict | None:
    """The result at ``path`` if it exists, parses and carries ``key``; otherwise None (never raises)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = read_json(path)
    except DetrqError:
        return None
    return obj if isinstance(obj, dict) and obj.get("cache_key") == key else None
