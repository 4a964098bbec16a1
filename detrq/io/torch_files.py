"""Reading the torch.save files a user names (.pth, .pt, .bin): weights_only, and every failure as one line.

``torch.load(weights_only=True)`` refuses a pickle that needs code, but it reports a refusal in paragraphs of
generic advice (among them a retry with ``weights_only=False``, the wrong advice for an untrusted file) and a foreign
file as assorted exceptions. Checkpoints, Hugging Face ``pytorch_model.bin`` files and packed checkpoints are all
read through ``load_weights_only``, so a wrong file gets the same kind of line wherever it is passed.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

from detrq.io.errors import DetrqError

# The first bytes of what torch.save writes: a zip archive, or (its legacy format) a pickle of protocol 2 or later.
TORCH_ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = b"\x80"


def unpickling_reason(e: Exception) -> str:
    """What a weights_only unpickler refused (a blocked GLOBAL, an unknown opcode), without torch's advice."""
    generic = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(e).replace("WeightsUnpickler error:", "\n").splitlines()]
    reasons = [line for line in lines if line and not line.startswith(generic)]
    return (reasons[0] if reasons else type(e).__name__)[:200]


def load_weights_only(path: str | Path, what: str) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; ``what`` names the file in the one-line
    ``DetrqError`` that every failure becomes (missing, empty, not a torch file, code refused, unreadable)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DetrqError(f"{what} not found: {path}")
    with path.open("rb") as f:
        magic = f.read(len(TORCH_ZIP_MAGIC))
    if not magic:
        raise DetrqError(f"cannot read {what} {path}: the file is empty")
    if not (magic.startswith(TORCH_ZIP_MAGIC) or magic.startswith(PICKLE_PROTO)):
        raise DetrqError(f"refusing {path}: not a {what} (neither a zip archive nor a pickle, which torch.save "
                         "writes)")
    try:
        with warnings.catch_warnings():
            # A pickle of another protocol than torch's is refused below in one line; torch's warning about the
            # protocol would only precede it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DetrqError(f"refusing {path}: not a plain-tensor {what} (a weights_only load refused it: "
                         f"{unpickling_reason(e)}); never load it with weights_only=False unless you trust its "
                         "source") from None
    except Exception as e:  # noqa: BLE001 - torch.load's failures on arbitrary bytes are not a documented set
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "truncated file"
        raise DetrqError(f"cannot read {what} {path}: {type(e).__name__}: {first}") from None
