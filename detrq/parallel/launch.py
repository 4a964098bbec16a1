"""How a pipeline step runs its heavy work: in this process, or as torchrun ranks of ``python -m detrq``.

A ``Launch`` names the model files (the ranks load the model themselves) and ``nproc``. With ``nproc`` > 1,
``run_ranks`` starts ``python -m torch.distributed.run --standalone --nproc_per_node N -m detrq <command>``, waits,
and turns a failed launch into one ``DetrqError`` line: the first rank's own ``error:`` line, not the lines of
the ranks that stopped because of it (``distributed.PEER_FAILED``) nor torchrun's report. The calling step reads
the result file that rank 0 wrote; the ranks never take the results folder's lock, which the launching command
holds (``locking.INHERITED_LOCK_ENV``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from detrq.io.errors import DetrqError
from detrq.io.locking import INHERITED_LOCK_ENV
from detrq.io.paths import PROJECT_ROOT
from detrq.parallel.distributed import PEER_FAILED

BUG_LINE = "this is a bug in detrq"  # cli.guarded's last line after a traceback


@dataclass(frozen=True)
class Launch:
    """Where a step runs: ``nproc`` 1 in the calling process; more: that many torchrun ranks of the CLI, each
    loading ``preset`` from ``checkpoint`` with the size policy ``min_size``/``max_size`` on ``device`` (``cuda``:
    one GPU per rank). ``workers`` > 1 instead runs a step's independent jobs (evaluations, trace estimates) side
    by side in that many processes of one thread each (``parallel.pool``), each loading the model the same way."""

    nproc: int = 1
    preset: str = "mini"
    checkpoint: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    device: str = "cpu"
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("nproc", "workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DetrqError(f"{name} must be a whole number >= 1, got {value!r}")
        if max(self.nproc, self.workers) > 1 and self.checkpoint is None:
            raise DetrqError("nproc > 1 and workers > 1 need the checkpoint file: the processes load the model "
                             "themselves")
        if self.nproc > 1 and self.workers > 1:
            raise DetrqError("choose nproc (ranks share each step) or workers (steps side by side), not both")

    @property
    def sharded(self) -> bool:
        return self.nproc > 1

    def model_args(self) -> list[str]:
        """The CLI options that load this model on this device."""
        args = ["--preset", self.preset, "--checkpoint", str(self.checkpoint), "--device", self.device]
        for flag, value in (("--min-size", self.min_size), ("--max-size", self.max_size)):
            if value is not None:
                args += [flag, str(value)]
        return args


def torchrun_command(launch: Launch, command: list[str]) -> list[str]:
    """The command line that runs ``python -m detrq <command>`` (plus the model options) as ``launch.nproc``
    ranks on this host."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={launch.nproc}",
            "-m", "detrq", *command, *launch.model_args(), "--quiet"]


def run_ranks(launch: Launch, command: list[str]) -> None:
    """Run ``command`` as ``launch.nproc`` torchrun ranks; a failure raises one ``DetrqError`` line."""
    env = {**os.environ, INHERITED_LOCK_ENV: "1",
           # The ranks import this checkout's detrq, whichever one the environment has installed.
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(torchrun_command(launch, command), cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise DetrqError(failure_line(proc.stderr, proc.returncode))


def failure_line(stderr: str, status: int) -> str:
    """What went wrong in a failed launch, in one line, from the ranks' stderr (see the module docstring)."""
    errors = [line[len("error: "):] for line in stderr.splitlines() if line.startswith("error: ")]
    own = [e for e in errors if PEER_FAILED not in e]
    if own and BUG_LINE not in own[0]:
        return own[0]
    # A bug, or torchrun itself failed: the traceback is the useful part, so the ranks' stderr is shown as is.
    print(stderr, file=sys.stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    what = own[0] if own else lines[-1] if lines else "no output"
    return f"the torchrun ranks failed (exit status {status}): {what}"
