"""The ground truth every sensitivity metric is checked against: quantize one layer at a time and measure.

A Hessian-trace metric *predicts* ``omega_l(b)``, what quantizing layer l to b bits costs. This module
*measures* it, with nothing estimated:

* ``measure_layer_costs``: the rise of the Eq. (5) distillation loss (float teacher, every decoder output)
  on the Hessian images when only layer l is at b bits (Eq. (6)) and the rest of the model sits at the
  reference point (float, or uniform ``reference_bits`` as Out Sen Quant's expansion point), split into its KL
  and L1 terms;
* ``measure_ap_drops``: the val COCO AP with only layer l at b bits, against the float AP;
* ``spearman_ci``: Spearman's rho across layers between predicted and measured costs, with a bootstrap CI
  over layers;
* ``run_measured_costs``: the cached, file-producing step the sensitivity-check notebook calls.

A quantized layer outside ``backbone.`` leaves the backbone features unchanged, and a decoder or head layer
also leaves the encoder memory unchanged: both are computed once at the reference point (``DETR.features``,
``DETR.encode``), and per layer and bit width only what follows the quantized layer is rerun (``DETR.head`` or
``DETR.decode``).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr
from torch import Tensor

from detrq.data.coco import CocoDetection, collate
from detrq.evaluation.bootstrap import image_eval, weighted_ap
from detrq.evaluation.evaluate import evaluate, outputs_to_detections
from detrq.io.cache import cache_key, load_cached
from detrq.io.errors import DetrqError
from detrq.io.results import environment, write_json_atomic
from detrq.models.detr import DETR
from detrq.quant.bitmaps import quantizable_layers, quantized, uniform_bit_map
from detrq.quant.codes import MAX_BITS, MIN_BITS
from detrq.quant.quantizers import EQ6, WeightQuantizer
from detrq.sensitivity.distill import distillation_terms

# Where a quantized layer sits decides which cached stage its scan starts from. A layer under none of these
# prefixes (none today) reruns the whole model, so a new kind of layer is never scanned from a stale cache.
BACKBONE_PREFIX = "backbone."
ENCODER_PREFIXES = ("input_proj.", "transformer.encoder.")  # changes the memory, not the backbone features
DECODER_PREFIXES = ("transformer.decoder.", "query_embed.", "class_embed.", "bbox_embed.")  # after the memory
# Above this many val images the AP scan does not hold the images and features in memory: it reruns the model.
MAX_CACHED_IMAGES = 1000
# The keys of measure_layer_costs' per-(layer, bits) entries and of the AP section, for measured_table.
COST_KEYS = ("rise", "kl", "l1")
AP_KEYS = ("ap", "ap_drop")
# Seed of the val sample of an AP scan on a subset (``MeasureSettings.ap_images``).
AP_SUBSET_SEED = 0
# Where the pipeline keeps the measured costs at a float reference (Measured Sen, notebook 05) in a results dir.
MEASURED_FILE = "measured_costs.json"


def measured_file(quantizer: str) -> str:
    """The measured costs' file name for a quantizer: Eq. (6)'s is ``MEASURED_FILE`` (Table 1's Measured Sen)."""
    return MEASURED_FILE if quantizer == "eq6" else f"measured_costs_{quantizer}.json"

Batch = tuple[list[Tensor], list[dict[str, Any]]]
Stage = tuple[Tensor, Tensor, Tensor]  # (feat, mask, pos) from DETR.features or (memory, mask, pos) from encode


@dataclass
class _Cached:
    """One batch's images with its backbone features and encoder memory at the reference point."""

    images: list[Tensor]
    features: Stage
    memory: Stage

    @classmethod
    def of(cls, model: DETR, images: list[Tensor]) -> _Cached:
        features = model.features(images)
        return cls(images, features, model.encode(*features))

    def outputs(self, model: DETR, layer: str | None) -> dict[str, Any]:
        """The outputs of ``model`` as it is now, when only ``layer`` differs from the cached reference
        (None: nothing differs), recomputing no more than ``layer`` can change."""
        if layer is None or layer.startswith(DECODER_PREFIXES):
            return model.decode(*self.memory)
        if layer.startswith(ENCODER_PREFIXES):
            return model.head(*self.features)
        return model(self.images)


@dataclass(frozen=True)
class MeasureSettings:
    """What the measured per-layer costs are made of (all of it goes into the cache key)."""

    bits: tuple[int, ...] = (3, 4, 5, 6, 7)  # bit widths of the Eq. (5) loss-rise scan
    ap_bits: tuple[int, ...] = (3, 4)  # bit widths of the val AP scan; () skips it
    reference_bits: int | None = None  # None: the other layers in float; 8: at uniform 8 bits (Out Sen Quant)
    batch_size: int = 50  # Hessian images per forward pass
    ap_batch_size: int = 8  # val images per forward pass (padding depends on it, so it is part of the AP)
    ap_images: int | None = None  # val images of the AP scan: a seeded sample of this many (``ap_subset``); None: all
    # Smaller AP scans nested in it (how many images rho needs): the AP of a seeded sample of n of the scan's images
    # from the same detections (``measure_ap_drops``); sizes not below the scan's are left out.
    ap_subsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        widths = [*self.bits, *self.ap_bits, *([] if self.reference_bits is None else [self.reference_bits])]
        for b in widths:
            if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
                raise DetrqError(f"MeasureSettings: bit widths must be integers in {MIN_BITS}..{MAX_BITS}, "
                                 f"got {b!r}")
        if not self.bits:
            raise DetrqError("MeasureSettings: bits is empty; give at least one bit width to measure")
        if self.ap_images is not None and self.ap_images < 1:
            raise DetrqError(f"MeasureSettings: ap_images must be at least 1 or None (all), got {self.ap_images}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ap_subsets):
            raise DetrqError(f"MeasureSettings: ap_subsets must be image counts of at least 1, got {self.ap_subsets}")
        if self.batch_size < 1 or self.ap_batch_size < 1:
            raise DetrqError(f"MeasureSettings: batch sizes must be at least 1, got {self.batch_size} and "
                             f"{self.ap_batch_size}")


def _layer_names(model: DETR, layers: Iterable[str] | None) -> list[str]:
    names = list(quantizable_layers(model)) if layers is None else list(layers)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise DetrqError(f"layer {unknown[0]!r} is not a parameter of the model")
    return names


def _progress(items: Sequence[str], desc: str, enabled: bool) -> Iterable[str]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="layer")


def as_double(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """DETR outputs with logits and boxes in float64 (aux outputs too), for evaluating Eq. (5) on them.

    The network runs in float32; the loss of its outputs is taken in float64 because a one-layer KL rise at
    7 bits is ~1e-9, below float32's rounding of ``sum p (log p - log q)`` (which can then come out negative).
    """
    out: dict[str, Any] = {k: outputs[k].double() for k in ("pred_logits", "pred_boxes")}
    if "aux_outputs" in outputs:
        out["aux_outputs"] = [as_double(a) for a in outputs["aux_outputs"]]
    return out


def _weighted_terms(model: DETR, cached: Sequence[_Cached], teacher: Sequence[Mapping[str, Any]],
                    weights: Sequence[int], layer: str | None) -> dict[str, float]:
    """Eq. (5)'s terms of the model's outputs (float64) against ``teacher``: the image-weighted batch mean.
    ``layer`` is the one layer that differs from the point ``cached`` was taken at (see ``_Cached.outputs``)."""
    kl, l1 = [], []
    for c, t, w in zip(cached, teacher, weights):
        terms = distillation_terms(as_double(c.outputs(model, layer)), t)
        kl.append(w * terms["kl"].item())
        l1.append(w * terms["l1"].item())
    total = sum(weights)
    out = {"kl": math.fsum(kl) / total, "l1": math.fsum(l1) / total}
    return {"loss": out["kl"] + out["l1"], **out}


@torch.no_grad()
def measure_layer_costs(model: DETR, batches: Sequence[Batch], settings: MeasureSettings = MeasureSettings(), *,
                        layers: Iterable[str] | None = None, quantizer: WeightQuantizer = EQ6,
                        progress: bool = False) -> dict[str, Any]:
    """The measured Eq. (5) cost of quantizing each layer alone, at each of ``settings.bits``.

    ``batches`` are ``(images, targets)`` as ``pipeline.hessian_batches`` gives (the targets are not used).
    The teacher is the float model (eval mode, no grad), run once. For layer l and width b the student has l at
    ``Q_b`` (``quantizer``'s, Eq. (6) by default, from its float weights) and every other quantizable layer at the
    reference point: float (``settings.reference_bits`` None) or ``Q_reference_bits``. The loss is Eq. (5)
    (``distillation_terms``: T = 6, lambda_kl = 0.05, summed over the decoder outputs), averaged over batches with
    weight = images per batch, as detrq's Hessian objective weighs them. The network runs in float32 and the loss
    of its outputs is taken in float64 (``as_double``).

    Returns ``{"reference_loss": float, "reference_terms": {"kl", "l1"}, "layers": {name: {b: {"rise", "kl",
    "l1"}}}}``, where ``rise`` is the loss minus the reference point's loss and ``kl``/``l1`` are the rises of
    each term (``rise == kl + l1`` up to rounding); at a float reference the reference loss is exactly 0. The
    model's weights are restored bit for bit and its train/eval mode is restored.
    """
    batches = list(batches)
    if not batches:
        raise DetrqError("measure_layer_costs: batches is empty")
    names = _layer_names(model, layers)
    weights = [len(images) for images, _ in batches]
    reference = {} if settings.reference_bits is None else uniform_bit_map(model, settings.reference_bits)
    was_training = model.training
    model.eval()
    try:
        float_cache = [_Cached.of(model, images) for images, _ in batches]
        teacher = [as_double(c.outputs(model, None)) for c in float_cache]
        if reference:
            with quantized(model, reference, quantizer):
                cache = [_Cached.of(model, images) for images, _ in batches]
                ref = _weighted_terms(model, cache, teacher, weights, None)
        else:
            # At float weights the student is the teacher: same features and memory, the loss is exactly 0.
            cache = float_cache
            ref = _weighted_terms(model, cache, teacher, weights, None)
        costs: dict[str, dict[int, dict[str, float]]] = {}
        for name in _progress(names, "measured costs", progress):
            costs[name] = {}
            for b in settings.bits:
                # Q_b of the float weights on top of the reference map; quantized() restores every tensor.
                with quantized(model, {**reference, name: b}, quantizer):
                    got = _weighted_terms(model, cache, teacher, weights, name)
                costs[name][b] = {"rise": got["loss"] - ref["loss"], "kl": got["kl"] - ref["kl"],
                                  "l1": got["l1"] - ref["l1"]}
    finally:
        model.train(was_training)
    return {"reference_loss": ref["loss"], "reference_terms": {"kl": ref["kl"], "l1": ref["l1"]}, "layers": costs}


def ap_subset(ids: Sequence[int], n: int | None, seed: int = AP_SUBSET_SEED) -> list[int]:
    """The val images of an AP scan on ``n`` of ``ids``: a uniform sample drawn with ``seed``, in id order (all of
    them when ``n`` is None or not smaller)."""
    ids = sorted(int(i) for i in ids)
    if n is None or n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))


@torch.no_grad()
def measure_ap_drops(model: DETR, dataset: CocoDetection, settings: MeasureSettings = MeasureSettings(), *,
                     layers: Iterable[str] | None = None, batch_size: int = 8, progress: bool = False
                     ) -> dict[str, Any]:
    """Val COCO AP with one layer at b bits (Eq. (6)), the rest float, for each b in ``settings.ap_bits``.

    Returns ``{"float": AP, "layers": {name: {b: AP}}, "drop": {name: {b: float AP - AP}}, "subsets": {n:
    {"images": ids, "float", "layers", "drop"}}}`` (a positive drop means quantizing the layer hurts; one subset
    per ``settings.ap_subsets`` size below the set's, ``ap_subset(dataset.ids, n)``). Detections are
    ``detrq.evaluation.evaluate``'s (``outputs_to_detections``), with ``batch_size`` images per pass as ``evaluate``
    pads them. Each detection set is matched once (``bootstrap.image_eval``) and scored on the whole set and on
    each subset by ``bootstrap.weighted_ap`` with 0/1 weights: the same numbers as pycocotools on those images
    (``coco_metrics``' AP), without running the model or the matching again per subset. Up to
    ``MAX_CACHED_IMAGES`` images the images, their float backbone features and encoder memory are held in memory
    and only what follows the quantized layer is rerun; a larger set is streamed through ``evaluate`` for every
    layer and width.
    """
    names = _layer_names(model, layers)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stream = len(dataset) > MAX_CACHED_IMAGES
    sizes = sorted({n for n in settings.ap_subsets if n < len(dataset)})
    subsets = {n: ap_subset(dataset.ids, n) for n in sizes}
    # 0/1 weights of each subset over image_eval's images (the ids ascending), made once for every run.
    ascending = np.array(sorted(int(i) for i in dataset.ids))
    weights = {n: np.isin(ascending, ids).astype(np.float64) for n, ids in subsets.items()}
    try:
        cache: list[tuple[_Cached, list[dict[str, Any]]]] = []
        if not stream:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                                                 collate_fn=collate)
            for images, targets in loader:
                cache.append((_Cached.of(model, [im.to(device) for im in images]), targets))

        def run(name: str | None) -> dict[int | None, float]:
            """The AP of the model as it is now on the whole set (key None) and on each subset (key n); ``name``
            is the one quantized layer (None: float)."""
            if stream:
                detections = evaluate(model, dataset, batch_size=batch_size, device=device,
                                      progress=False)["detections"]
            else:
                detections = []
                for c, targets in cache:
                    detections.extend(outputs_to_detections(c.outputs(model, name), targets))
            ev = image_eval(dataset.coco, detections, dataset.ids)
            aps = {None: weighted_ap(ev)}
            for n, w in weights.items():
                aps[n] = weighted_ap(ev, w)
            return aps

        float_ap = run(None)
        aps: dict[str, dict[int, dict[int | None, float]]] = {}
        for name in _progress(names, "AP scan", progress):
            aps[name] = {}
            for b in settings.ap_bits:
                with quantized(model, {name: b}):
                    aps[name][b] = run(name)
    finally:
        model.train(was_training)

    def scan(n: int | None) -> dict[str, Any]:
        layers_ap = {name: {b: per[n] for b, per in by_bits.items()} for name, by_bits in aps.items()}
        return {"float": float_ap[n], "layers": layers_ap,
                "drop": {name: {b: float_ap[n] - ap for b, ap in per.items()} for name, per in layers_ap.items()}}

    return {**scan(None), "subsets": {n: {"images": ids, **scan(n)} for n, ids in subsets.items()}}


def _rho_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair (average ranks for ties, as scipy); NaN where a row is constant."""
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    num = (rx * ry).sum(axis=1)
    den = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(rho, -1.0, 1.0)


def spearman_ci(predicted: Mapping[str, Mapping[int, float]], measured: Mapping[str, Mapping[int, float]],
                bits: int | None, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Spearman's rho across layers of ``predicted`` omega_l(b) against ``measured`` cost, with a bootstrap CI.

    With ``bits`` an integer, one pair per layer (the layers that have that width in both); with ``bits`` None,
    every (layer, b) pair present in both, pooled. The CI is the percentile bootstrap over LAYERS: ``n_boot``
    resamples of the layers with replacement (``numpy.random.default_rng(seed)``); pooled, a layer's pairs
    move together. Resamples whose ranks are constant (rho undefined) are left out of the percentiles.
    Returns ``{"rho", "low", "high", "n_layers", "bits", "n_boot", "seed", "level"}``.
    """
    if not 0 < level < 1 or n_boot < 1:
        raise DetrqError(f"spearman_ci: need 0 < level < 1 and n_boot >= 1, got {level} and {n_boot}")
    per_layer: list[list[tuple[float, float]]] = []
    for name in sorted(set(predicted) & set(measured)):
        widths = [bits] if bits is not None else sorted(set(predicted[name]) & set(measured[name]))
        pairs = [(float(predicted[name][b]), float(measured[name][b])) for b in widths
                 if b in predicted[name] and b in measured[name]]
        if pairs:
            per_layer.append(pairs)
    if len(per_layer) < 3:
        raise DetrqError(f"spearman_ci: {len(per_layer)} layers have both a predicted and a measured cost at "
                         f"bits={bits}; need at least 3")
    x = np.array([p for pairs in per_layer for p, _ in pairs])
    y = np.array([m for pairs in per_layer for _, m in pairs])
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    n = len(per_layer)
    draws = rng.integers(0, n, size=(n_boot, n))
    if len({len(pairs) for pairs in per_layer}) == 1:
        # Every layer has k pairs: resample rows of the [layers, k] arrays, then flatten each resample.
        k = len(per_layer[0])
        xs, ys = x.reshape(n, k)[draws].reshape(n_boot, -1), y.reshape(n, k)[draws].reshape(n_boot, -1)
        boot = _rho_rows(xs, ys)
    else:
        starts = np.cumsum([0] + [len(p) for p in per_layer])
        boot = np.empty(n_boot)
        for i, d in enumerate(draws):
            idx = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in d])
            boot[i] = _rho_rows(x[idx][None], y[idx][None])[0]
    valid = boot[~np.isnan(boot)]
    if valid.size == 0:
        low = high = math.nan
    else:
        low, high = (float(v) for v in np.percentile(valid, [50 * (1 - level), 50 * (1 + level)]))
    return {"rho": rho, "low": low, "high": high, "n_layers": n, "bits": bits, "n_boot": n_boot, "seed": seed,
            "level": level}


def _str_keys(table: Mapping[str, Mapping[int, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {str(b): v for b, v in per.items()} for name, per in table.items()}


def run_measured_costs(model: DETR, checkpoint_sha: str, root: str | Path, split: str, out: str | Path, *,
                       image_ids: Sequence[int], settings: MeasureSettings = MeasureSettings(),
                       eval_split: str = "val", quantizer: WeightQuantizer = EQ6, device: str = "cpu",
                       progress: bool = True) -> dict[str, Any]:
    """Measured per-layer costs on the Hessian images ``image_ids`` of ``split`` (and, when
    ``settings.ap_bits`` is non-empty, the val AP scan on all of ``eval_split``); writes and returns the JSON.
    Layers are quantized with ``quantizer``: a quantizer other than Eq. (6) is named in the file's settings
    (``costs.cost_table`` checks it) and its key enters the cache key. The AP scan is Eq. (6)'s.

    Cached like ``pipeline.run_traces``: the file at ``out`` is returned as is when its ``cache_key`` (checkpoint,
    split, image ids, settings, transform, layers, and the eval split's annotations for the AP scan) matches.
    The JSON: ``cache_key``, ``checkpoint_sha256``, ``split``, ``image_ids``, ``settings``, ``reference_bits``,
    ``reference_loss``, ``reference_terms``, ``layers`` ``{name: {str(b): {"rise", "kl", "l1"}}}``, ``ap``
    ``{"float", "layers": {name: {str(b): AP}}, "drop": ...}`` (None without ``ap_bits``), ``seconds`` and
    ``environment``. ``measured_table`` reads the tables back with integer bit widths.
    """
    # Imported here: pipeline is the top of the package's import graph and may come to call this module.
    from detrq.data.loading import eval_dataset, hessian_batches

    image_ids = [int(i) for i in image_ids]
    subset = eval_dataset(model, root, split, image_ids=image_ids)
    eval_set = None
    if settings.ap_bits:
        eval_set = eval_dataset(model, root, eval_split)
        if settings.ap_images is not None:
            eval_set = eval_dataset(model, root, eval_split, image_ids=ap_subset(eval_set.ids, settings.ap_images))
    layer_names = list(quantizable_layers(model))
    eval_part = None if eval_set is None else {
        "split": eval_split, "images": eval_set.ids,
        "annotations": eval_set.annotations_sha256}
    # As JSON holds them (tuples become lists), so that a fresh result equals the file a cache hit returns.
    settings_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    # Left out of the key at their defaults, so that the files made before these settings existed keep their keys.
    if settings.ap_images is None:
        del settings_dict["ap_images"]
    if not settings.ap_subsets:
        del settings_dict["ap_subsets"]
    # Eq. (6) stays out of the key and the file, so that the measured costs made before quantizers existed
    # keep their keys.
    extra = {} if quantizer.name == "eq6" else {"quantizer": quantizer.key}
    if extra:
        settings_dict["quantizer"] = quantizer.name
    key = cache_key(kind="measured_costs", checkpoint=checkpoint_sha, split=split, image_ids=image_ids,
                    settings=settings_dict, transform=subset.transform.describe(), layers=layer_names,
                    eval=eval_part, **extra)
    cached = load_cached(out, key)
    if cached is not None:
        return cached
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    batches = hessian_batches(subset, settings.batch_size, device)
    seconds["load_images"] = time.perf_counter() - start
    t = time.perf_counter()
    costs = measure_layer_costs(model, batches, settings, quantizer=quantizer, progress=progress)
    seconds["layer_costs"] = time.perf_counter() - t
    ap = None
    if eval_set is not None:
        t = time.perf_counter()
        drops = measure_ap_drops(model, eval_set, settings, batch_size=settings.ap_batch_size, progress=progress)
        seconds["ap_drops"] = time.perf_counter() - t
        ap = {"float": drops["float"], "layers": _str_keys(drops["layers"]), "drop": _str_keys(drops["drop"]),
              "split": eval_split, "num_images": len(eval_set), "batch_size": settings.ap_batch_size,
              "subsets": {str(n): {"images": sub["images"], "float": sub["float"], "layers": _str_keys(sub["layers"]),
                                   "drop": _str_keys(sub["drop"])} for n, sub in drops["subsets"].items()}}
    seconds["total"] = time.perf_counter() - start
    result = {
        "cache_key": key, "checkpoint_sha256": checkpoint_sha, "split": split, "image_ids": image_ids,
        "settings": settings_dict, "transform": subset.transform.describe(),
        "reference_bits": settings.reference_bits, "reference_loss": costs["reference_loss"],
        "reference_terms": costs["reference_terms"], "layers": _str_keys(costs["layers"]), "ap": ap,
        "seconds": seconds, "environment": environment(),
    }
    write_json_atomic(out, result)
    return result


def measured_table(result: Mapping[str, Any], key: str = "rise", subset: int | None = None
                   ) -> dict[str, dict[int, float]]:
    """``{layer: {bits: value}}`` with integer bit widths, from a ``run_measured_costs`` result (or file contents).

    ``key``: ``"rise"``, ``"kl"`` or ``"l1"`` (the Eq. (5) scan), ``"ap"`` (the AP with the layer quantized) or
    ``"ap_drop"`` (float AP minus it); ``subset``: for the AP keys, the scan on that many of its images
    (``MeasureSettings.ap_subsets``) instead of all.
    """
    if key in COST_KEYS:
        return {name: {int(b): float(v[key]) for b, v in per.items()} for name, per in result["layers"].items()}
    if key in AP_KEYS:
        if not result.get("ap"):
            raise DetrqError("this measured-costs result has no AP scan: run it with non-empty ap_bits")
        scan = result["ap"]
        if subset is not None:
            held = scan.get("subsets") or {}
            if str(subset) not in held:
                raise DetrqError(f"this AP scan has no subset of {subset} images (it has: "
                                 f"{', '.join(sorted(held, key=int)) or 'none'}); add it to ap_subsets")
            scan = held[str(subset)]
        table = scan["layers" if key == "ap" else "drop"]
        return {name: {int(b): float(v) for b, v in per.items()} for name, per in table.items()}
    raise DetrqError(f"measured_table: key must be one of {COST_KEYS + AP_KEYS}, got {key!r}")
