"""Each piece of work is done once: an evaluation whose cache key another file of the results directory already
holds is taken from it (not recomputed, and still seen as reused when that file was), an evaluation set is decoded
once per process, and a scheme without probes gets no probe-seed replicas."""

import os

import pytest
import torch

from detrq.artifact import pipeline
from detrq.artifact.pipeline import detections_path, run_all_traces, run_evaluation, schemes_from_params
from detrq.data.loading import eval_dataset
from detrq.io.cache import find_twin
from detrq.io.layout import kind_dir, results_file
from detrq.models.loading import load_model
from detrq.quant.bitmaps import uniform_bit_map
from detrq.sensitivity import TraceSettings
from worlds import tiny_world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("once")
    tiny_world(root, 12, 6, data_seed=2)
    model, sha = load_model("tiny", root / "tiny.pth")
    return root, model, sha


def _no_evaluation(*args, **kwargs):
    raise AssertionError("evaluated although a file with the same cache key was there")


def test_an_evaluation_is_taken_from_its_twin_under_another_name(world, monkeypatch):
    root, model, sha = world
    results = root / "results"
    dataset = eval_dataset(model, root / "data", "val")
    bit_map = uniform_bit_map(model, 4)
    first = run_evaluation(model, sha, dataset, bit_map, results_file(results, "eval_4_uniform.json"),
                           batch_size=2, progress=False, label="4 uniform", keep_detections=True)
    twin = results_file(results, "eval_4_uniform.json")
    old = twin.stat().st_mtime_ns - 10**9  # as if the twin had come from a cache
    os.utime(twin, ns=(old, old))
    monkeypatch.setattr(pipeline, "evaluate", _no_evaluation)
    out = kind_dir(results, "pareto") / "eval_eq6_uniform_4bit.json"
    second = run_evaluation(model, sha, dataset, bit_map, out, batch_size=2, progress=False,
                            label="eq6 uniform 4", keep_detections=True)
    assert second["cache_key"] == first["cache_key"] and second["metrics"] == first["metrics"]
    assert second["label"] == "eq6 uniform 4" and pipeline.read_json(out)["label"] == "eq6 uniform 4"
    assert detections_path(out).read_bytes() == detections_path(twin).read_bytes()
    assert out.stat().st_mtime_ns == old  # a reused twin's copy is reused too
    # Another bit map has no twin: it is evaluated.
    with pytest.raises(AssertionError, match="same cache key"):
        run_evaluation(model, sha, dataset, uniform_bit_map(model, 5), results_file(results, "eval_5_uniform.json"),
                       batch_size=2, progress=False)


def test_find_twin_skips_the_file_itself_and_corrupt_files(tmp_path):
    key = "ab" * 32
    (tmp_path / "a.json").write_text('{\n "cache_key": "%s",\n "x": 1\n}\n' % key)
    (tmp_path / "b.json").write_text('{\n "cache_key": "%s",\n "x": ' % key)  # cut short
    assert find_twin([tmp_path], key) == tmp_path / "a.json"
    assert find_twin([tmp_path], key, exclude=tmp_path / "a.json") is None
    assert find_twin([tmp_path / "missing"], key) is None


def test_a_small_evaluation_set_is_decoded_once(world):
    root, model, _ = world
    dataset = eval_dataset(model, root / "data", "val")
    image, target = dataset[0]
    again, target_again = dataset[0]
    assert again is image and target_again == target and target_again is not target


def test_a_scheme_without_probes_gets_no_replicas(world):
    root, model, sha = world
    schemes = schemes_from_params({"out-float": "ggn"}, ["loss:fisher"], {"out-float": [2, 2]})
    settings = TraceSettings(num_images=4, batch_size=2, probes_per_pass=2)
    base = run_all_traces(model, sha, root / "data", "train", root / "traces", settings, schemes)
    replica = run_all_traces(model, sha, root / "data", "train", root / "traces", settings, schemes, replica=1)
    assert list(base) == ["out-float", "loss-fisher"] and list(replica) == ["out-float"]
