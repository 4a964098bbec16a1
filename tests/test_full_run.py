"""The full run's path end to end, small: params/full.yaml with an R50 checkpoint in the official format and a
COCO 2017-layout directory, through papermill on the notebooks of the default run (01-05 and 07), into a
temporary directory.

The checkpoint has random values shaped from the official state-dict manifest (small std, unit frozen-BN
statistics, so the outputs are finite); the images are small and few, so that the whole path (every scheme's
estimates with two probe seeds, the stability and curvature checks, the measured per-layer costs, the ILPs,
Table 1 with its bootstrap, the sensitivity check, the Pareto sweep with its three quantizers, all figures) runs on
a CPU in a few minutes. What the committed notebooks compare under nbval is checked here too: the table's structure
and the data behind the figures.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from detrq.artifact.notebooks import NOTEBOOKS, load_parameters, run_notebooks
from detrq.artifact.table1 import MIXED_TARGETS, VERDICTS, table_rows
from detrq.io.layout import results_file, results_name
from detrq.sensitivity import FIRST_ORDER, METRICS

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "detr_r50_state_dict_manifest.json"
COCO_CATEGORIES = [1, 3, 18, 44, 62, 90]  # COCO ids, up to the largest (90); DETR-R50 has 91 + 1 classes

# The full run, shrunk: tiny images and image counts, two probes, one thread.
OVERRIDES = {
    "device": "cpu", "threads": 1, "min_size": 64, "max_size": 96, "num_hessian_images": 2, "hessian_batch_size": 2,
    "min_probes": 2, "max_probes": 2, "stability_sets": 2, "stability_set_size": 2, "curvature_images": 2,
    "curvature_probes": 2, "max_eval_images": 2, "eval_batch_size": 2, "stability_seeds": 2, "jacobian_probes": 2,
    "measure_ap_bits": [3], "measure_batch_size": 2, "n_boot": 20, "rho_boot": 20,
    "probes": {"loss": [1, 1], "out-quant": [1, 1]},
    "gptq_calib_images": 2, "pareto_targets": [4.0, 6.0],
}


def official_r50_checkpoint(path: Path, seed: int = 0) -> None:
    """``{"model": state_dict}`` with the manifest's names and shapes; frozen BN at unit scale and variance."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for e in json.loads(MANIFEST.read_text())["entries"]:
        name, shape = e["name"], e["shape"]
        if e["kind"] == "buffer":  # FrozenBatchNorm2d: weight/bias/running_mean/running_var
            ones = name.endswith(("running_var", ".weight"))
            sd[name] = torch.ones(shape) if ones else torch.zeros(shape)
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.02
    torch.save({"model": sd}, path)


def coco_layout(root: Path, split: str, n: int, first_id: int, seed: int) -> None:
    """``root/<split>/000000xxxxxx.jpg`` and ``root/annotations/instances_<split>.json`` with COCO ids."""
    g = torch.Generator().manual_seed(seed)
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for k in range(n):
        image_id = first_id + k
        w, h = 120 + 8 * k, 90
        im = Image.new("RGB", (w, h), (120, 120, 120))
        draw = ImageDraw.Draw(im)
        for j in range(2):
            x, y = int(torch.randint(0, w - 40, (), generator=g)), int(torch.randint(0, h - 40, (), generator=g))
            cat = COCO_CATEGORIES[(k + j) % len(COCO_CATEGORIES)]
            draw.rectangle([x, y, x + 30, y + 30], fill=(40 * j, 200, 250 - 3 * cat))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, 30, 30], "area": 900, "iscrowd": 0})
        name = f"{image_id:012d}.jpg"
        im.save(root / split / name)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_CATEGORIES]
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.mark.skipif(not MANIFEST.is_file(), reason="needs ../shared/detr_r50_state_dict_manifest.json")
def test_full_run_path_on_r50_and_coco_layout(tmp_path):
    coco = tmp_path / "coco"
    coco_layout(coco, "train2017", 4, 9, seed=0)
    coco_layout(coco, "val2017", 2, 139, seed=1)
    official_r50_checkpoint(tmp_path / "detr-r50.pth")
    results, figures, executed = tmp_path / "results", tmp_path / "figures", tmp_path / "notebooks"
    params = load_parameters("params/full.yaml", {**OVERRIDES, "checkpoint": str(tmp_path / "detr-r50.pth"),
                                                  "coco_root": str(coco), "results_dir": str(results),
                                                  "figures_dir": str(figures)})
    assert params["preset"] == "r50" and params["hessian_split"] == "train2017"
    seconds = run_notebooks(params, executed, log=lambda _: None)
    assert list(seconds) == list(NOTEBOOKS)
    assert sorted(p.name for p in executed.iterdir()) == [f"{n}.ipynb" for n in NOTEBOOKS]

    stochastic = [*METRICS, FIRST_ORDER, "out-quant-ggn"]  # the schemes with probes get a second probe seed
    schemes = [*stochastic, "modelopt", "loss-fisher", "out-quant-fisher"]
    expected = {"table1.json", "table1.csv", "table1.md", "claims.json", "stability.json", "curvature_check.json",
                "table1_bootstrap.json", "measured_costs.json", "measured_costs_8bit.json", "seed_stability.json",
                "sensitivity_check.json", "traces_out-first-order-rows.json", "measured_ap_drops.json"}
    expected |= {f"traces_{m}.json" for m in schemes} | {f"traces_{m}_seed1.json" for m in stochastic}
    expected |= {f"bitmap_{m}_{t}bit.json" for m in schemes for t in MIXED_TARGETS}
    expected |= {f"bitmap_{m}_{t}bit_seed1.json" for m in stochastic for t in MIXED_TARGETS}
    expected |= {f"bitmap_measured_{t}bit.json" for t in MIXED_TARGETS}
    rows = table_rows([FIRST_ORDER, "modelopt", "out-quant-ggn", "loss-fisher", "out-quant-fisher", "measured"])
    expected |= {f"eval_{p}_{s}{ext}" for p, s in rows for ext in (".json", ".detections.npz")}
    expected |= {f"eval_{t}_{m}_seed1.json" for m in stochastic for t in MIXED_TARGETS}
    # Notebook 07: the sweep's folder, its summary, Table 2, Measured Sen and ModelOpt's score per quantizer.
    expected |= {"pareto.json", "table2.json", "table2.csv", "table2.md", "measured_costs_per-channel.json",
                 "measured_costs_gptq.json", "traces_modelopt_per-channel.json", "traces_modelopt_gptq.json"}
    found = {str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()}
    outside_sweep = {f for f in found if not f.startswith("pareto/")} | {"pareto/pareto.json"}
    assert outside_sweep == {results_name(n) for n in expected}
    assert any(f.startswith("pareto/eval_") for f in found) and any(f.startswith("pareto/bitmap_") for f in found)
    assert {p.name for p in figures.iterdir()} == {f"{stem}.{ext}" for stem in (
        "fig1_hessian_traces", "fig2_bit_allocation", "sensitivity_check", "eq5_decomposition", "fig3_pareto",
        "fig4_per_class") for ext in ("png", "pdf")}
    table2 = json.loads(results_file(results, "table2.json").read_text())
    mixed = [r for r in table2["rows"] if r["source"] != "uniform"]
    assert {(r["precision"], r["quantizer"]) for r in mixed} == {
        (f"{t}-bit", q) for t in (4, 6) for q in ("eq6", "per-channel", "gptq")}
    assert {r["source"] for r in table2["rows"]} == {*schemes, "measured", "uniform"}

    table = json.loads(results_file(results, "table1.json").read_text())
    assert [(r["precision"], r["scheme"]) for r in table["rows"]] == rows
    mixed_rows = [r for r in table["rows"] if r["scheme"] in schemes and r["precision"] != "8"]
    assert all(r["delta_ci"] is not None for r in mixed_rows)
    # A seed range needs a second probe seed; the deterministic schemes have none, so theirs stays empty.
    assert all((r["delta_seed_range"] is not None) == (r["scheme"] in stochastic) for r in mixed_rows)
    assert table["protocol"]["transform"]["min_size"] == 64 and table["protocol"]["num_images"] == 2
    assert table["protocol"]["hessian"]["num_images"] == 2 and table["protocol"]["hessian"]["split"] == "train2017"
    traces = json.loads(results_file(results, "traces_out-quant.json").read_text())
    assert traces["estimator"] == "blockwise" and traces["settings"]["max_probes"] == 1  # OVERRIDES' probes
    assert len(traces["layers"]) > 100 and traces["layers"]["backbone.0.body.layer4.2.conv3.weight"]["n_probes"] == 1
    assert "backbone.0.body.layer1.0.conv1.weight" not in traces["layers"]  # frozen in DETR-R50: stays float
    claims = json.loads(results_file(results, "claims.json").read_text())["claims"]
    assert len(claims) == 21 and all(c["verdict"] in VERDICTS for c in claims)
    assert sum(c["beyond_paper"] for c in claims) == 3
    check = json.loads(results_file(results, "sensitivity_check.json").read_text())
    assert {r["scheme"] for r in check["rows"]} == {*schemes, "out-first-order-rows"}
