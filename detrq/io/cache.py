"""On-disk caching of expensive results (evaluations, Hessian traces), keyed by everything that determines them.

A result file stores its ``cache_key``; a later run with the same key reuses the file instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detrq.io.errors import DetrqError
from detrq.io.results import read_json


def cache_key(**parts: Any) -> str:
    """SHA-256 of the JSON of ``parts`` (sorted keys), e.g. checkpoint hash, data hash, protocol, seed."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def load_cached(path: str | Path, key: str, check: Callable[[Any, str], Any] | None = None) -> dict | None:
    """The result at ``path`` if it exists, parses and carries ``key`` (and passes ``check(obj, name)`` when
    given, e.g. ``file_checks.check_traces``); otherwise None (never raises). A file that exists but is corrupt
    is recomputed, and a ``warning:`` line on stderr says so."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise DetrqError(f"{path} is not a JSON object")
        if obj.get("cache_key") == key and check is not None:
            check(obj, str(path))
    except DetrqError as e:
        print(f"warning: cached result is corrupt, recomputing it: {e}", file=sys.stderr)
        return None
    return obj if obj.get("cache_key") == key else None
