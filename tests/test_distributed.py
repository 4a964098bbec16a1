"""Sharded over torchrun (gloo on CPU, 2 ranks, tiny preset): traces and an evaluation equal one process's, with
the same cache keys; a failing rank ends the run with one error line and no result file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from detrq.artifact.pipeline import run_evaluation, run_traces
from detrq.data.loading import eval_dataset
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.models.criterion import build_criterion
from detrq.models.detr import build_detr
from detrq.models.loading import load_model
from detrq.parallel import distributed
from detrq.parallel.launch import Launch, failure_line
from detrq.quant.bitmaps import uniform_bit_map
from detrq.sensitivity import TraceSettings
from worlds import tiny_world

torch.set_num_threads(1)

# 6 images in batches of 2: ranks 0 and 1 get 2 and 1 batches, so a rank also skips another's probe draws.
SETTINGS = TraceSettings(num_images=6, batch_size=2, max_probes=4, min_probes=4, probes_per_pass=2,
                         jacobian="rows", jacobian_probes=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    tiny_world(root, 12, 7, data_seed=1)
    model, sha = load_model("tiny", root / "tiny.pth")
    return root, model, sha, Launch(nproc=2, preset="tiny", checkpoint=str(root / "tiny.pth"))


def layer_values(result: dict) -> dict[str, float]:
    values = {}
    for name, entry in result["layers"].items():
        for part, estimate in (entry.items() if "kl" in entry else [("", entry)]):
            values[f"{name}:{part}:trace"] = estimate["trace" if "trace" in estimate else "sum"]
            values[f"{name}:{part}:stderr"] = estimate["stderr"]
    return values


@pytest.mark.parametrize("metric, estimator", [("out-first-order", "ggn"), ("loss", "hutchinson"),
                                               ("out-quant", "fisher")])
def test_sharded_traces_equal_one_process(world, metric, estimator):
    root, model, sha, launch = world
    settings = TraceSettings(**{**SETTINGS.to_dict(), "estimator": estimator})
    one = run_traces(model, sha, root / "data", "train", metric, root / f"one_{metric}.json", settings,
                     progress=False)
    two = run_traces(model, sha, root / "data", "train", metric, root / f"two_{metric}.json", settings,
                     progress=False, launch=launch)
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert two["cache_key"] == one["cache_key"]  # the world size is in no key
    a, b = layer_values(one), layer_values(two)
    assert a.keys() == b.keys()
    assert all(b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-12) for k in a), metric
    assert {n: e.get("n_probes") for n, e in one["layers"].items()} == \
           {n: e.get("n_probes") for n, e in two["layers"].items()}


def test_sharded_evaluation_equals_one_process(world):
    root, model, sha, launch = world
    dataset = eval_dataset(model, root / "data", "val")  # 7 images in batches of 2: ranks get 2 and 2 batches
    bit_map = uniform_bit_map(model, 4)
    # Two folders: in one, the second evaluation would be the first's twin (same key) and not run at all.
    one = run_evaluation(model, sha, dataset, bit_map, root / "one" / "eval_one.json", batch_size=2, progress=False,
                         label="4 uniform", keep_detections=True)
    two = run_evaluation(model, sha, dataset, bit_map, root / "two" / "eval_two.json", batch_size=2, progress=False,
                         label="4 uniform", keep_detections=True, launch=launch)
    assert two["cache_key"] == one["cache_key"] and two["label"] == "4 uniform"
    assert two["metrics"] == one["metrics"]  # identical, per-class AP included
    assert two["protocol"]["num_images"] == 7
    for name in ("one/eval_one", "two/eval_two"):
        assert (root / f"{name}.detections.npz").is_file()
    one_dets, two_dets = (np.load(root / f"{n}.detections.npz") for n in ("one/eval_one", "two/eval_two"))
    assert all(np.array_equal(one_dets[k], two_dets[k]) for k in one_dets.files)


def test_a_failing_rank_ends_the_run_with_one_error_and_no_file(world, monkeypatch):
    root, model, sha, launch = world
    monkeypatch.setenv(distributed.FAIL_RANK_ENV, "1")
    out = root / "failed" / "traces.json"
    with pytest.raises(DetrqError) as failure:
        run_traces(model, sha, root / "data", "train", "out-float", out,
                   TraceSettings(**{**SETTINGS.to_dict(), "estimator": "ggn"}), progress=False, launch=launch)
    message = str(failure.value)
    assert message == f"rank 1: rank 1 failed on purpose ({distributed.FAIL_RANK_ENV}=1)", message
    assert not out.exists() and not list(out.parent.glob("*.json*"))


def test_the_cli_under_torchrun_prints_once_and_names_the_failing_rank(world):
    root, _, _, _ = world
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "detrq",
               "evaluate", "--preset", "tiny", "--checkpoint", "tiny.pth", "--coco", "data", "--split", "val",
               "--batch-size", "2", "--bits", "6", "--quiet", "--out", "cli/eval.json"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)}
    ok = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("AP ") == 1  # rank 0 alone reports
    assert json.loads((root / "cli/eval.json").read_text())["protocol"]["num_images"] == 7

    # Another folder: beside cli/eval.json the same evaluation is its twin, copied without running the ranks.
    failed = subprocess.run([*command[:-1], "cli_failed/failed.json"], cwd=root, capture_output=True, text=True,
                            timeout=300, env={**env, distributed.FAIL_RANK_ENV: "0"})
    assert failed.returncode != 0
    assert failure_line(failed.stderr, failed.returncode).startswith("rank 0: rank 0 failed on purpose")
    assert not (root / "cli_failed" / "failed.json").exists()


def test_failure_line_prefers_the_rank_that_failed_first():
    stderr = "\n".join(["error: rank 0: another rank failed; its error line says why (DistBackendError)",
                        "error: rank 1: image directory not found: /x/val", "torch.distributed...ChildFailedError"])
    assert failure_line(stderr, 1) == "rank 1: image directory not found: /x/val"


def test_shards_cover_the_items_in_order_and_one_process_is_unchanged():
    assert distributed.shard(5) == range(5) and distributed.gather_to_main("x") == ["x"]
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t


def _box_losses(rank: int, port: int, out: Path) -> None:
    """One rank of a 2-rank gloo group: rank r's batch has 2 + 2r boxes; its L1 loss with and without
    ``batch_over_ranks``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.manual_seed(0)
    model = build_detr("tiny").eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 64, 64)])
    n = 2 + 2 * rank
    targets = [{"labels": torch.ones(n, dtype=torch.int64), "boxes": torch.rand(n, 4) * 0.2 + 0.4}]
    with distributed.process_group("cpu"):
        losses = {flag: build_criterion(model.cfg.num_classes, model.cfg.dec_layers, batch_over_ranks=flag)(
            outputs, targets)["loss_bbox"] for flag in (False, True)}
    torch.save({**losses, "n": n}, out / f"rank{rank}.pt")


def test_num_boxes_over_ranks_is_all_reduced_and_divided_by_the_world_size(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_box_losses, args=(port, tmp_path), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        # Official DETR: num_boxes = all_reduce(2 + 4) / world size 2 = 3 on both ranks, not the rank's own count.
        assert r[True].item() == pytest.approx(r[False].item() * r["n"] / 3, rel=1e-6)
