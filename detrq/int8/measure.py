"""Size, latency and peak-memory measurements of a float model and its int8 twin.

- size: bytes of ``torch.save(model.state_dict())`` (int8 weights serialize as int8; an ``OrtModule`` as its ONNX).
- latency: float and int8 alternate in one process, so drifts in machine load hit both alike; the ratio is
  the median over runs of int8 time / float time of the same pair.
- peak memory: each (model, batch size) runs in a fresh subprocess (``python -m detrq.int8.measure``), so no
  earlier model or batch has raised its high-water mark. The child builds the model with a factory function
  (quantized modules do not survive pickling: FX's fused int8 modules fail to unpickle), then resets the
  kernel's RSS high-water mark (``/proc/self/clear_refs``) after one warm-up run, so building, calibrating and
  compiling do not count, runs the batch again and reports the peak RSS (VmHWM) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import io
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from detrq.io.errors import DetrqError


def phase_printer(label: str, enabled: bool) -> Callable[[str], None]:
    """``say(what)``: one stderr line as each phase of a run starts, with the seconds so far (``enabled`` only), so
    that the console is never silent for long: the calibration, the latency runs and each peak-memory process of the
    R50-FPN take minutes."""
    start = time.perf_counter()

    def say(what: str) -> None:
        if enabled:
            print(f"{label}: {what} [{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)

    return say


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's state dict as ``torch.save`` writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def paired_latency(float_fn: Callable[[], Any], int8_fn: Callable[[], Any], *, repeats: int = 7,
                   warmup: int = 1) -> dict[str, float]:
    """Median seconds of each callable and the median and interquartile range of the paired int8/float ratios,
    alternating the two."""
    if repeats < 5:
        raise DetrqError(f"paired_latency needs at least 5 repeats for a median, got {repeats}")
    times: dict[str, list[float]] = {"float": [], "int8": []}
    with torch.no_grad():
        for i in range(warmup + repeats):
            for name, fn in (("float", float_fn), ("int8", int8_fn)):
                t0 = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    ratios = [q / f for f, q in zip(times["float"], times["int8"])]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"float_s": statistics.median(times["float"]), "int8_s": statistics.median(times["int8"]),
            "ratio": statistics.median(ratios), "ratio_iqr": [q1, q3], "repeats": repeats}


def _make_inputs(kind: str, batch: int, size: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *size, generator=g)
    return list(images) if kind == "detector" else images


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (Linux) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise DetrqError(f"/proc/self/status has no {key}; peak-memory measurement needs Linux")


def peak_memory(factory: str, factory_kwargs: dict[str, Any], kind: str, batch_sizes: Sequence[int],
                image_size: int | tuple[int, int], *, device: str = "cpu", threads: int = 1
                ) -> dict[str, dict[str, float]]:
    """{batch: {"peak_rss_mb", "baseline_rss_mb", "inference_increment_mb"[, "cuda_max_allocated_mb"]}}, one fresh
    subprocess per batch.

    ``factory`` is "package.module:function"; the child calls it with ``factory_kwargs`` (JSON) to build the
    model. ``baseline_rss_mb`` is the child's RSS after building, when the high-water mark is reset; inputs are
    random [0, 1] images of ``image_size`` px, square or (height, width) (a list for a detector, a batch tensor
    for a classifier).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    out: dict[str, dict[str, float]] = {}
    for batch in batch_sizes:
        cmd = [sys.executable, "-m", "detrq.int8.measure", factory, json.dumps(factory_kwargs), "--kind", kind,
               "--batch", str(batch), "--size", f"{h}x{w}", "--device", device, "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DetrqError(f"peak-memory child failed at batch {batch}: {last}")
        out[str(batch)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _child(argv: list[str]) -> None:
    """Subprocess body of ``peak_memory``: build, reset the high-water mark, run one batch, print one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("factory")
    p.add_argument("kwargs")
    p.add_argument("--kind", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--size", required=True, help="HxW")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    module, _, fn = a.factory.partition(":")
    model = getattr(importlib.import_module(module), fn)(**json.loads(a.kwargs)).to(a.device)
    model.eval()  # not chained: an exported pt2e module's eval() returns None
    inputs = _make_inputs(a.kind, a.batch, tuple(int(v) for v in a.size.split("x")), seed=0)
    inputs = [x.to(a.device) for x in inputs] if a.kind == "detector" else inputs.to(a.device)
    with torch.no_grad():
        model(inputs)  # warm-up: lazy initialisation and torch.compile's compilation are not inference memory
    gc.collect()
    # Hand the heap that building and calibrating freed back to the OS, so that it is not in the baseline.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    baseline = _status_mb("VmRSS")
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(inputs)
    peak = _status_mb("VmHWM")
    result = {"peak_rss_mb": peak, "baseline_rss_mb": baseline, "inference_increment_mb": peak - baseline}
    if a.device.startswith("cuda"):
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1:])
