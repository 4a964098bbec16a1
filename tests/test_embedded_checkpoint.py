"""The committed embedded checkpoint: it loads strictly, its sidecar describes it, and its val AP re-measures."""

import json

import pytest
import torch

from detrq.cli import EMBEDDED, ensure_embedded_data
from detrq.data.loading import eval_dataset
from detrq.evaluation.evaluate import evaluate
from detrq.io.results import sha256_file
from detrq.models.detr import build_detr, load_checkpoint

CKPT = EMBEDDED["checkpoint"]


@pytest.fixture(scope="module")
def sidecar() -> dict:
    return json.loads(CKPT.with_suffix(".json").read_text())


def test_committed_checkpoint_loads_and_matches_its_sidecar(sidecar):
    assert sidecar["sha256"] == sha256_file(CKPT)
    assert CKPT.stat().st_size < 10 * 2**20
    model = load_checkpoint(build_detr(sidecar["preset"]), CKPT)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert sidecar["data"]["seed"] == EMBEDDED["seed"] and sidecar["iterations"] == sidecar["train_config"]["iters"]


def test_sidecar_val_ap_is_reproduced(sidecar):
    torch.set_num_threads(1)
    ensure_embedded_data(EMBEDDED["data"])
    model = load_checkpoint(build_detr(sidecar["preset"]), CKPT).eval()
    metrics = evaluate(model, eval_dataset(model, EMBEDDED["data"], "val"), batch_size=32, progress=False)
    assert metrics["AP"] == pytest.approx(sidecar["val_metrics"]["AP"], abs=1e-4)
    assert metrics["AP50"] == pytest.approx(sidecar["val_metrics"]["AP50"], abs=1e-4)
