"""On-disk caching of expensive results (evaluations, Hessian traces), keyed by everything that determines them.

A result file stores its ``cache_key``; a later run with the same key reuses the file instead of recomputing.
``find_twin`` finds a file with the same key under another name (the same evaluation asked for by two notebooks),
so that each key is computed once.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterable
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


# A results file written by ``write_json_atomic`` starts with its key when the result dict does ("cache_key" first).
_HEAD_BYTES = 256
_KEY_FIELD = re.compile(r'"cache_key":\s*"([0-9a-f]{64})"')


def _head_key(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    m = _KEY_FIELD.search(head)
    return m.group(1) if m else None


def _result_files(folders: Iterable[str | Path]) -> Iterable[Path]:
    for folder in folders:
        yield from sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []


def find_twin(folders: Iterable[str | Path], key: str, *, exclude: str | Path | None = None) -> Path | None:
    """A ``*.json`` file in ``folders`` (not recursive) whose ``cache_key`` is ``key``, other than ``exclude``; None
    if there is none. Only each file's head is read, so a search over a few hundred result files is quick."""
    skip = Path(exclude).resolve() if exclude is not None else None
    for path in _result_files(folders):
        if _head_key(path) == key and path.resolve() != skip and load_cached(path, key) is not None:
            return path
    return None


def keys_in(folders: Iterable[str | Path]) -> dict[str, Path]:
    """``{cache_key: file}`` of the ``*.json`` files in ``folders`` (the first file of each key), read from each
    file's head as ``find_twin`` does: what many ``find_twin`` calls would find, in one pass."""
    found: dict[str, Path] = {}
    for path in _result_files(folders):
        key = _head_key(path)
        if key is not None and key not in found and load_cached(path, key) is not None:
            found[key] = path
    return found
