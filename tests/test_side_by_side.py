"""Jobs side by side in worker processes (``parallel.pool``, ``artifact.workers``): the same results, files and cache
keys as one process, each key computed once, and a failing job ends in one error line."""

import json

import pytest
import torch

from detrq.artifact.pipeline import Scheme, run_all_traces, run_curvature_check, traces_path
from detrq.artifact.workers import EvaluationJob, ModelCheck, run_evaluations, run_scheme_traces
from detrq.data.loading import eval_dataset
from detrq.evaluation.evaluate import TRUNK_PREFIX, TrunkCache, evaluate
from detrq.io.errors import DetrqError
from detrq.models.loading import load_model
from detrq.parallel.launch import Launch
from detrq.parallel.pool import WorkerError, run_jobs
from detrq.quant.bitmaps import quantized, uniform_bit_map
from detrq.sensitivity import TraceSettings
from detrq.sensitivity.stability import loss_stability
from worlds import tiny_world

torch.set_num_threads(1)


def _offset(context, item):
    return context + item


def _context(value):
    return value


def _fail(context, item):
    if item == 2:
        raise DetrqError("job 2: the input file is corrupt")
    if item == 3:
        raise KeyError("boom")
    return item


def test_run_jobs_returns_in_order_and_builds_each_context_once():
    assert run_jobs(2, _context, (100,), _offset, [5, 1, 3, 0, 2], progress=False) == [105, 101, 103, 100, 102]
    assert run_jobs(3, _context, (0,), _offset, [], progress=False) == []
    with pytest.raises(DetrqError, match="workers must be"):
        run_jobs(0, _context, (0,), _offset, [1], progress=False)


def test_a_failing_job_ends_in_its_own_error():
    with pytest.raises(DetrqError, match=r"^job 2: the input file is corrupt$"):
        run_jobs(2, _context, (0,), _fail, [0, 1, 2], progress=False)
    with pytest.raises(WorkerError, match="KeyError: 'boom'"):
        run_jobs(2, _context, (0,), _fail, [3], progress=False)


def test_launch_takes_workers_or_ranks_not_both():
    with pytest.raises(DetrqError, match="workers must be a whole number"):
        Launch(workers=0)
    with pytest.raises(DetrqError, match="need the checkpoint"):
        Launch(workers=2)
    with pytest.raises(DetrqError, match="not both"):
        Launch(nproc=2, workers=2, checkpoint="c.pth")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("side")
    tiny_world(root, 12, 10, data_seed=2)
    model, sha = load_model("tiny", root / "tiny.pth")
    return root, model, sha, Launch(preset="tiny", checkpoint=str(root / "tiny.pth"), workers=2)


def test_evaluations_side_by_side_equal_one_process_and_run_each_key_once(world, tmp_path):
    root, model, sha, launch = world
    dataset = eval_dataset(model, root / "data", "val")

    def jobs(folder):
        folder.mkdir(parents=True)
        return [EvaluationJob(uniform_bit_map(model, 8), folder / "eval_8.json", "8"),
                EvaluationJob(uniform_bit_map(model, 4), folder / "eval_4.json", "4"),
                EvaluationJob(uniform_bit_map(model, 3), folder / "eval_3.json", "3"),
                # the same key as eval_4 under another name, and the one that needs the detections
                EvaluationJob(uniform_bit_map(model, 4), folder / "eval_4_again.json", "again", keep_detections=True)]

    side = run_evaluations(model, sha, dataset, jobs(tmp_path / "side" / "evaluations"), batch_size=2,
                           launch=launch)
    one = run_evaluations(model, sha, dataset, jobs(tmp_path / "one" / "evaluations"), batch_size=2)
    assert [r["cache_key"] for r in side] == [r["cache_key"] for r in one]
    assert [r["label"] for r in side] == ["8", "4", "3", "again"]
    for a, b in zip(side, one):
        assert a["metrics"]["AP"] == pytest.approx(b["metrics"]["AP"], abs=1e-6)
    folder = tmp_path / "side" / "evaluations"
    assert (folder / "eval_4_again.detections.npz").is_file()
    # One of the two files of the shared key is a copy of the other: same modification time.
    assert (folder / "eval_4.json").stat().st_mtime_ns == (folder / "eval_4_again.json").stat().st_mtime_ns
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    run_evaluations(model, sha, dataset, jobs(tmp_path / "again" / "evaluations"), batch_size=2, launch=launch)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # another folder: nothing rewritten


def test_evaluations_that_quantize_the_backbone_alike_run_it_once(world, monkeypatch):
    root, model, sha, _ = world
    dataset = eval_dataset(model, root / "data", "val")
    four = uniform_bit_map(model, 4)
    head_layer = next(n for n in four if not n.startswith(TRUNK_PREFIX))
    trunk_layer = next(n for n in four if n.startswith(TRUNK_PREFIX))
    trunk, features, runs = TrunkCache(), model.features, []

    def counted(images):
        runs.append(len(images))
        return features(images)

    monkeypatch.setattr(model, "features", counted)
    backbone_runs = []
    for bit_map in (four, {**four, head_layer: 8}, {**four, trunk_layer: 8}, four):
        with quantized(model, bit_map):
            plain = evaluate(model, dataset, batch_size=4, progress=False)
            runs.clear()
            shared = evaluate(model, dataset, batch_size=4, progress=False, trunk=trunk)
        backbone_runs.append(len(runs))
        assert shared["detections"] == plain["detections"]
        assert {k: v for k, v in shared.items() if k != "detections"} == {k: v for k, v in plain.items()
                                                                           if k != "detections"}
    batches = -(-len(dataset) // 4)
    # Another head layer: the features kept; another backbone layer: computed; the first again: still kept (keep=2).
    assert backbone_runs == [batches, 0, batches, 0]


def test_traces_side_by_side_equal_one_process(world, tmp_path):
    root, model, sha, launch = world
    settings = TraceSettings(num_images=6, batch_size=3, max_probes=4, min_probes=4, probes_per_pass=2)
    schemes = [Scheme("out-float", "ggn"), Scheme("loss", "fisher", variant=True)]
    side = run_scheme_traces(model, sha, root / "data", "train", tmp_path / "side", settings, schemes, seeds=2,
                             launch=launch)
    one = [run_all_traces(model, sha, root / "data", "train", tmp_path / "one", settings, schemes, replica=k)
           for k in range(2)]
    assert [sorted(r) for r in side] == [["loss-fisher", "out-float"], ["out-float"]]  # fisher: no replica
    for k in range(2):
        for name in side[k]:
            a, b = side[k][name], one[k][name]
            assert a["cache_key"] == b["cache_key"]
            for layer, est in a["layers"].items():
                assert est["trace"] == pytest.approx(b["layers"][layer]["trace"], rel=1e-4, abs=1e-9)
    written = json.loads(traces_path(tmp_path / "side", "out-float", 1).read_text())
    assert written["settings"]["seed"] == settings.seed + 1


def test_checks_beside_the_trace_estimates_equal_their_own_run(world, tmp_path):
    """The stability and curvature checks handed to ``run_scheme_traces`` are computed in its workers, and their
    ``run`` then reads the files; a check already cached is not handed to a worker again."""
    root, model, sha, launch = world
    data = root / "data"
    settings = TraceSettings(num_images=4, batch_size=2, max_probes=2, min_probes=2, probes_per_pass=2)
    schemes = [Scheme("loss", "fisher", variant=True)]

    def checks(folder):
        return [ModelCheck(loss_stability, folder / "stability.json", {"num_sets": 3, "set_size": 4}),
                ModelCheck(run_curvature_check, folder / "curvature.json", {"num_images": 4, "probes": 2,
                                                                             "batch_size": 2})]

    side = checks(tmp_path / "side")
    assert [c.run(model, sha, data, "train", cached_only=True) for c in side] == [None, None]
    run_scheme_traces(model, sha, data, "train", tmp_path / "side", settings, schemes, launch=launch, checks=side)
    assert all(c.out.is_file() for c in side)
    one = checks(tmp_path / "one")
    got = [c.run(model, sha, data, "train", cached_only=True) for c in side]
    alone = [c.run(model, sha, data, "train") for c in one]
    assert [r["cache_key"] for r in got] == [r["cache_key"] for r in alone]
    assert got[0]["set_losses"] == pytest.approx(alone[0]["set_losses"], rel=1e-5)
    for point, terms in alone[1]["points"].items():
        for term, est in terms.items():
            assert got[1]["points"][point][term]["trace"] == pytest.approx(est["trace"], rel=1e-4, abs=1e-9)
    written = {c.out: c.out.stat().st_mtime_ns for c in side}
    (tmp_path / "side" / "stability.json").unlink()
    # One job left (the stability check; the traces and the curvature check are cached): no workers, nothing
    # computed; the caller's ``run`` computes it.
    run_scheme_traces(model, sha, data, "train", tmp_path / "side", settings, schemes, launch=launch, checks=side)
    assert not side[0].out.exists()
    assert side[1].out.stat().st_mtime_ns == written[side[1].out]



def test_the_first_order_kl_term_is_out_sen_float_estimated_once(world, tmp_path, monkeypatch):
    """The first-order metric's KL term and Out Sen Float are the same estimate (same settings, same probes): it is
    computed once, by the first-order job side by side, and by whichever comes first in one process; the numbers
    are those of a first-order estimate made on its own."""
    from detrq.artifact import pipeline
    from detrq.sensitivity import metrics

    root, model, sha, launch = world
    settings = TraceSettings(num_images=4, batch_size=2, max_probes=3, min_probes=3, probes_per_pass=3,
                             jacobian_probes=3)
    schemes = [Scheme("out-first-order", "ggn"), Scheme("out-float", "ggn")]
    alone = run_all_traces(model, sha, root / "data", "train", tmp_path / "alone", settings, schemes[:1])
    calls = []
    for module in (pipeline, metrics):  # Out Sen Float's own estimate, and the one first_order_sensitivity makes
        real = getattr(module, "sensitivity")
        monkeypatch.setattr(module, "sensitivity", lambda *a, real=real, **k: calls.append(a[2]) or real(*a, **k))
    one = run_all_traces(model, sha, root / "data", "train", tmp_path / "one", settings, schemes)
    assert calls == ["out-float"]
    # Two seeds: two first-order jobs side by side, each making its Out Sen Float file.
    side, side_seed1 = run_scheme_traces(model, sha, root / "data", "train", tmp_path / "side", settings, schemes,
                                         seeds=2, launch=launch)
    assert side_seed1["out-first-order"]["layers"]["input_proj.weight"]["kl"] == \
        side_seed1["out-float"]["layers"]["input_proj.weight"]
    for got in (one, side):
        first, float_ = got["out-first-order"], got["out-float"]
        assert first["cache_key"] == alone["out-first-order"]["cache_key"]
        for layer, entry in first["layers"].items():
            assert entry["kl"] == float_["layers"][layer] == alone["out-first-order"]["layers"][layer]["kl"]
            assert entry["jacobian"]["sum"] == pytest.approx(
                alone["out-first-order"]["layers"][layer]["jacobian"]["sum"], rel=1e-5)
        assert first["seconds"] >= float_["seconds"]
