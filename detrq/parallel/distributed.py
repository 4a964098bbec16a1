"""The ranks of a torchrun launch, as the rest of detrq sees them: a process group, shards, sums and gathers.

Under ``torchrun`` (environment ``WORLD_SIZE`` > 1) ``process_group(device)`` joins the ranks (gloo on CPU,
NCCL on CUDA with the local rank's GPU). Inside it, ``shard`` gives each rank a contiguous block of the items,
``all_reduce_sum`` sums a tensor over the ranks and ``gather_to_main`` collects one object per rank on rank 0,
in rank order, so that concatenated shards are in the single process's order. Outside a process group every
function is the identity of one process, so the code that calls them runs unchanged without torchrun.

A collective that fails because another rank died raises ``RankFailed``: that rank's own error line is the one
to read. ``DETRQ_FAIL_RANK=r`` makes rank r fail at its first collective, so that tests can check how a run
ends when one rank fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from detrq.io.errors import DetrqError

# The phrase that marks an error line as a consequence of another rank's failure (see ``RankFailed``).
PEER_FAILED = "another rank failed"
FAIL_RANK_ENV = "DETRQ_FAIL_RANK"


class RankFailed(DetrqError):
    """A collective could not complete because another rank stopped; its error says why."""


def launched() -> bool:
    """True in a process that torchrun started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes results and prints (and in a single process)."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join torchrun's ranks for the block and yield the device this rank computes on (``device`` itself
    without torchrun). ``cuda`` becomes the local rank's GPU with NCCL; ``cpu`` uses gloo."""
    if not launched():
        yield device
        return
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise DetrqError(f"device {device!r} requested but CUDA is not available on this host")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    # A rank that dies leaves the others waiting in a collective until torchrun stops them; the timeout only
    # bounds a hang that torchrun cannot see.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def shard(n: int) -> range:
    """This rank's contiguous block of ``range(n)``; the blocks of ranks 0, 1, ... cover it in order."""
    size, r = world_size(), rank()
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def _check_injected_failure() -> None:
    if os.environ.get(FAIL_RANK_ENV) == str(rank()):
        raise DetrqError(f"rank {rank()} failed on purpose ({FAIL_RANK_ENV}={rank()})")


def _collective(fn: Any, *args: Any) -> Any:
    _check_injected_failure()
    try:
        return fn(*args)
    except (RuntimeError, dist.DistError) as e:
        raise RankFailed(f"{PEER_FAILED}; its error line says why ({type(e).__name__})") from None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (a new tensor on ``t``'s device); ``t`` itself in one process."""
    if not active():
        return t
    # NCCL reduces GPU tensors only; gloo takes CPU ones.
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = t.detach().to(on, copy=True)
    _collective(dist.all_reduce, total)
    return total.to(t.device)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (``[obj]`` in one process); None on the other ranks."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    _collective(dist.gather_object, obj, out, 0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank, in rank order (``[obj]`` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _collective(dist.all_gather_object, out, obj)
    return out
