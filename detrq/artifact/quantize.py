"""``detrq quantize``: from a checkpoint and COCO-format data to a packed mixed-precision DETR and its report.

One call runs the paper's steps with the recipe that measured best (``recipe.DEFAULT_RECIPE``), each timed:

1. validate the data (``data.validate``: both splits, category ids against the model's classes, names against the
   checkpoint's ``id2label`` when it has one);
2. the quantizer (GPTQ collects its input Hessians on calibration images of the calibration split, never the eval
   split; ModelOpt's score needs the quantizer, so it comes first);
3. per-layer sensitivities of the chosen scheme on the class-balanced Hessian images of the calibration split
   (``pipeline.run_traces``, cached by key);
4. the ILP bit map at ``avg_bits`` over the bit range, with the quantizer's own errors (``pipeline.run_allocation``);
5. float and quantized COCO AP on the eval split (``pipeline.run_evaluation``, cached) and the paired bootstrap CI of
   their difference (``evaluation.bootstrap``);
6. the bit-packed checkpoint (``quant.packing``), read back and checked bit for bit;
7. the report, JSON and Markdown (``quantize_report``).

Caches live in ``DIR/cache/`` (the results layout), so a rerun with other settings reuses whatever still applies. The
packed checkpoint and the reports are written to a staging folder in ``DIR`` and moved into place only when all of
them are complete, the JSON report last: a failed run leaves the earlier results as they were.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from detrq.artifact.pipeline import (Scheme, build_quantizer, detections_path, run_allocation,
                                     run_evaluation, run_traces)
from detrq.artifact.quantize_report import report_json, report_markdown
from detrq.artifact.recipe import DEFAULT_RECIPE, RECIPE_WHY, SCHEME_SPECS
from detrq.data.loading import eval_dataset
from detrq.evaluation.bootstrap import load_detections, paired_bootstrap
from detrq.io.errors import DetrqError
from detrq.io.layout import results_file
from detrq.io.results import write_json_atomic
from detrq.models.detr import PRESETS, guess_preset
from detrq.models.hf import check_labels
from detrq.models.loading import Checkpoint, build_model, open_checkpoint
from detrq.quant.codes import QUANTIZERS, QuantizerSettings, dequantize
from detrq.quant.packing import load_packed, save_packed
from detrq.sensitivity import TraceSettings

# What DIR holds beside cache/.
PACKED_FILE = "detr_packed.pth"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

SCHEMES: dict[str, Scheme] = {name: Scheme(*spec) for name, spec in SCHEME_SPECS.items()}
# The trace settings of params/default.yaml that the schemes do not set themselves.
BASE_TRACES = TraceSettings(batch_size=10, probes_per_pass=20, rel_tol=0.05, seed=0, jacobian="cauchy-schwarz",
                            jacobian_probes=48)


@dataclass(frozen=True)
class QuantizeSettings:
    """Everything ``quantize`` does differently from one call to the next (all of it goes into the report)."""

    avg_bits: float = 4.0  # average bits over the quantized weights
    metric: str = DEFAULT_RECIPE["metric"]  # a key of SCHEMES
    quantizer: str = DEFAULT_RECIPE["quantizer"]
    bits: tuple[int, int] = DEFAULT_RECIPE["bits"]  # every layer's choices, inclusive
    negative_traces: str = DEFAULT_RECIPE["negative_traces"]  # chosen by the sensitivity check (notebook 05)
    num_images: int = 100  # class-balanced Hessian images of the calibration split (the paper's 100)
    image_seed: int = 0
    calib_images: int = 128  # GPTQ: class-balanced calibration images of the calibration split
    max_eval_images: int | None = None  # None: every image of the eval split
    eval_batch_size: int = 8
    n_boot: int = 1000  # paired bootstrap resamples of the eval images
    boot_seed: int = 0
    time_limit: float = 60.0  # ILP seconds

    def __post_init__(self) -> None:
        if self.metric not in SCHEMES:
            raise DetrqError(f"unknown metric {self.metric!r}; choose one of {', '.join(SCHEMES)}")
        if self.quantizer not in QUANTIZERS:
            raise DetrqError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        lo, hi = self.bits
        if not lo <= self.avg_bits <= hi:
            raise DetrqError(f"--avg-bits {self.avg_bits:g} lies outside the bit range {lo}-{hi}")

    @property
    def scheme(self) -> Scheme:
        return SCHEMES[self.metric]

    @property
    def bits_range(self) -> range:
        return range(self.bits[0], self.bits[1] + 1)

    @property
    def name(self) -> str:
        """The stem of this recipe's cached bit map and evaluation."""
        return f"{self.quantizer}_{self.metric}_{self.avg_bits:g}bit"


@dataclass
class Source:
    """What ``quantize`` starts from: a checkpoint (file or Hugging Face directory) and COCO-layout data."""

    checkpoint: str | Path
    coco: str | Path
    eval_split: str
    calib_split: str
    preset: str | None = None  # for a plain checkpoint file that does not carry its architecture
    device: str = "cpu"
    min_size: int | None = None
    max_size: int | None = None


@dataclass
class Steps:
    """Wall seconds of each step, and which steps found their result cached."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    progress: bool = True

    @contextmanager
    def step(self, name: str, what: str, cache: Path | None = None) -> Iterator[None]:
        before = _stamp(cache)
        if self.progress:
            print(f"[{len(self.seconds) + 1}] {what} ...", file=sys.stderr)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if cache is not None:
            self.cached[name] = before is not None and before == _stamp(cache)


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None or not path.is_file():
        return None
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _preset_for(ckpt: Checkpoint, preset: str | None) -> str | None:
    """The preset of a plain checkpoint file: the one named, else the one its state dict fits."""
    if ckpt.config is not None or preset is not None:
        return preset
    fit = guess_preset(ckpt.state_dict)
    if fit is None:
        raise DetrqError(f"{ckpt.source} fits no preset ({', '.join(PRESETS)}) and does not carry its architecture: "
                         "pass --preset, or convert a Hugging Face directory with `detrq convert --from-hf`")
    return fit


def _check_names(ckpt: Checkpoint, dataset: Any) -> None:
    if ckpt.id2label is not None:
        check_labels(ckpt.id2label, dataset.coco.dataset.get("categories", []),
                     f"instances_{dataset.split}.json")


def quantize(source: Source, out: str | Path, settings: QuantizeSettings = QuantizeSettings(), *,
             progress: bool = True) -> dict[str, Any]:
    """Run every step (module docstring) into ``out``; returns the report (also ``out/report.json``)."""
    out = Path(out)
    if source.calib_split == source.eval_split:
        raise DetrqError(f"the calibration split must not be the evaluation split ({source.eval_split}): "
                         "sensitivities and GPTQ calibrated on the evaluated images would flatter the AP")
    cache = out / "cache"
    steps = Steps(progress=progress)
    start = time.perf_counter()
    with steps.step("load", "loading the checkpoint"):
        ckpt = open_checkpoint(source.checkpoint)
        model = build_model(ckpt, _preset_for(ckpt, source.preset), source.device, min_size=source.min_size,
                            max_size=source.max_size)
    with steps.step("validate", f"validating {source.coco} ({source.eval_split}, {source.calib_split})"):
        eval_set = eval_dataset(model, source.coco, source.eval_split, max_images=settings.max_eval_images)
        calib_set = eval_dataset(model, source.coco, source.calib_split)
        for dataset in (eval_set, calib_set):
            _check_names(ckpt, dataset)
    scheme = settings.scheme
    quantizer_settings = QuantizerSettings(name=settings.quantizer, calib_images=settings.calib_images)
    with steps.step("quantizer", f"preparing the {settings.quantizer} quantizer"):
        quantizer = build_quantizer(model, ckpt.sha256, source.coco, source.calib_split, quantizer_settings,
                                    device=source.device)
    traces_file = results_file(cache, f"traces_{scheme.name}.json")
    with steps.step("sensitivities", f"{scheme.label} sensitivities", traces_file):
        trace_settings = scheme.settings(replace(BASE_TRACES, num_images=settings.num_images,
                                                 image_seed=settings.image_seed))
        traces = run_traces(model, ckpt.sha256, source.coco, source.calib_split, scheme.metric, traces_file,
                            trace_settings, device=source.device, progress=progress, bits_range=settings.bits_range,
                            quantizer=quantizer)
    bitmap_file = results_file(cache, f"bitmap_{settings.name}.json")
    with steps.step("allocation", f"ILP at {settings.avg_bits:g} average bits", bitmap_file):
        allocation = run_allocation(model, traces, settings.avg_bits, settings.bits_range, bitmap_file,
                                    negative_traces=settings.negative_traces, time_limit=settings.time_limit,
                                    quantizer=quantizer)
    evaluations, files = {}, {}
    for label, bit_map, name in (("float", {}, "eval_float.json"),
                                 ("quantized", allocation["bit_map"], f"eval_{settings.name}.json")):
        files[label] = results_file(cache, name)
        with steps.step(f"evaluate_{label}", f"{label} AP on {len(eval_set)} {source.eval_split} images",
                        files[label]):
            evaluations[label] = run_evaluation(model, ckpt.sha256, eval_set, bit_map, files[label],
                                                batch_size=settings.eval_batch_size, device=source.device,
                                                progress=progress, label=label, keep_detections=True,
                                                quantizer=quantizer)
    with steps.step("bootstrap", f"paired bootstrap of the AP difference ({settings.n_boot} resamples)"):
        detections = {k: load_detections(detections_path(path)) for k, path in files.items()}
        boot = paired_bootstrap(eval_set.coco, eval_set.ids, detections, [("quantized", "float")],
                                n_boot=settings.n_boot, seed=settings.boot_seed, progress=progress)
    staging = Path(tempfile.mkdtemp(prefix=".quantize.", dir=_made(out)))
    try:
        with steps.step("pack", "writing the bit-packed checkpoint"):
            packed = _pack(model, ckpt, allocation["bit_map"], quantizer, staging / PACKED_FILE,
                           {"quantizer": quantizer.key, "recipe": settings.name})
        steps.seconds["total"] = time.perf_counter() - start
        report = report_json(model=model, ckpt=ckpt, source=source, settings=settings, recipe_why=RECIPE_WHY,
                             allocation=allocation, quantizer=quantizer, evaluations=evaluations, bootstrap=boot,
                             packed=packed, steps=steps, traces=traces)
        write_json_atomic(staging / REPORT_JSON, report)
        (staging / REPORT_MD).write_text(report_markdown(report))
        for name in (PACKED_FILE, REPORT_MD, REPORT_JSON):  # the JSON report last: it names what is beside it
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pack(model: torch.nn.Module, ckpt: Checkpoint, bit_map: dict[str, int], quantizer: Any, path: Path,
          meta: dict[str, Any]) -> dict[str, Any]:
    """Write the packed checkpoint and check that it restores the evaluated weights bit for bit."""
    params = dict(model.named_parameters())
    codes = {n: quantizer.codes(n, params[n], b) for n, b in bit_map.items()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    size = save_packed(path, state, codes, {**meta, "checkpoint_sha256": ckpt.sha256,
                                            "architecture": asdict(model.cfg)})
    loaded, _ = load_packed(path)
    bad = [n for n, c in codes.items() if not torch.equal(loaded[n], dequantize(c).cpu())]
    if bad:
        raise RuntimeError(f"packed weight {bad[0]} does not round-trip bit for bit")
    return size


def default_splits(coco: Path) -> tuple[str, str]:
    """(eval split, calibration split) of a COCO root: val2017/train2017 when present, else val/train."""
    ann = coco / "annotations"
    val = "val2017" if (ann / "instances_val2017.json").is_file() else "val"
    train = "train2017" if (ann / "instances_train2017.json").is_file() else "train"
    return val, train
