"""Results I/O: atomic JSON writes, file hashes and the environment record stored beside every number."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from detrq.io.errors import DetrqError
from detrq.io.layout import results_file


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_output(p) as tmp:`` write ``tmp``; on success it is renamed to ``p`` (mode 0644).

    The temp file lives in ``p``'s directory, so the rename is atomic; a failure leaves an earlier ``p`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see ``atomic_output``)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    return Path(path)


def write_table_files(results_dir: str | os.PathLike, stem: str, table: Any, texts: dict[str, str]) -> None:
    """A table as ``stem.json`` plus one text rendering per suffix (``{"csv": ..., "md": ...}``), each atomic."""
    write_json_atomic(results_file(results_dir, f"{stem}.json"), table)
    for suffix, text in texts.items():
        with atomic_output(results_file(results_dir, f"{stem}.{suffix}")) as tmp:
            tmp.write_text(text)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing file or corrupt JSON into one clear ``DetrqError``."""
    path = Path(path)
    if not path.is_file():
        raise DetrqError(f"file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DetrqError(f"corrupt JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the working tree, or None outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# /proc/cpuinfo flags that decide which int8 kernels a CPU runs (oneDNN/fbgemm for PyTorch, MLAS for onnxruntime):
# x86 AVX2 (u8 x s8 multiply-adds that can saturate), AVX-512, VNNI (AVX512 or AVX) dot products, AMX tiles;
# ARM dot-product (asimddp) and int8 matrix multiply (i8mm).
INT8_ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimddp", "i8mm")


def cpu_int8_isa() -> list[str]:
    """The CPU's int8-relevant instruction sets (``INT8_ISA_FLAGS`` present in /proc/cpuinfo's flags or ARM
    features), in that order; empty where /proc/cpuinfo is missing."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    flags: set[str] = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in INT8_ISA_FLAGS if f in flags]


def cpu_label(model: str | None, isa: Sequence[str] | None) -> str:
    """A CPU as reports name it: its model and, where recorded, its vector instruction sets (``cpu_int8_isa``)."""
    if model is None:
        return "an unrecorded CPU"
    return f"{model} [{', '.join(isa) if isa else 'no AVX2, AVX-512, VNNI, AMX or ARM dot product'}]" if isa is not None else model


def cpu_record() -> dict[str, Any]:
    """The CPU facts that INT8 latency depends on: model name, int8 instruction sets, cores available."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"cpu": cpu_model(), "cpu_int8_isa": cpu_int8_isa(), "cpu_cores": cores}


def environment() -> dict[str, Any]:
    """Versions and host facts recorded with every result."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        # Two CPUs of one model name can differ in their vector units (float sums in another order): both recorded.
        "cpu": cpu_model(),
        "cpu_isa": cpu_int8_isa(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
