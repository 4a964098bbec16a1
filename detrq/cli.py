"""``python -m detrq <command>``: thin command-line wrappers over the package's functions.

Commands: make-data, check-data, train, evaluate, traces, allocate, curve, pack, pareto, notebooks, int8, readme,
convert (Hugging Face checkpoints to and from the official layout), quantize (checkpoint and data to a packed
mixed-precision model with its report, in one command), and the run-directory steps of ``./reproduce.sh``:
run-start, report, accept. Bad input gives one ``error: ...`` line and exit status 2; results are written
atomically and reused when their inputs are unchanged.

``evaluate`` and ``traces`` also run under torchrun (``python -m torch.distributed.run --nproc_per_node N -m detrq
...``): the ranks share the work (``detrq.parallel.distributed``), rank 0 takes the folder's lock, prints and writes the
result after every rank has finished its part, and each rank's error line names the rank.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.parallel import distributed
from detrq.parallel.pool import available_cores
from detrq.quant.codes import QUANTIZERS
from detrq.sensitivity import ALL_METRICS, BLOCKS, ESTIMATORS, JACOBIAN_ESTIMATORS
from detrq.sensitivity.costs import NEGATIVE_POLICIES

EMBEDDED = {  # the embedded default: where its data and checkpoint live and how the data is made
    "data": PROJECT_ROOT / "data" / "synthetic",
    "checkpoint": PROJECT_ROOT / "checkpoints" / "detr_mini.pth",
    "n_train": 8000,
    "n_val": 500,
    "seed": 0,
}


def _print_metrics(metrics: dict) -> None:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    print("  ".join(f"{k} {metrics[k]:.4f}" if metrics.get(k) is not None else f"{k} n/a" for k in keys))


def ensure_embedded_data(root: Path) -> Path:
    """Generate the embedded default's synthetic dataset at ``root`` unless it is already there."""
    if (root / "annotations" / "instances_val.json").is_file() and (root / "annotations" /
                                                                       "instances_train.json").is_file():
        return root
    from detrq.data.synthetic import make_dataset

    print(f"generating the synthetic dataset in {root} (seed {EMBEDDED['seed']}) ...", file=sys.stderr)
    make_dataset(root, EMBEDDED["n_train"], EMBEDDED["n_val"], seed=EMBEDDED["seed"], workers=available_cores())
    return root


def cmd_make_data(args: argparse.Namespace) -> None:
    from detrq.data.synthetic import make_dataset

    summary = make_dataset(args.out, args.train, args.val, seed=args.seed, progress=not args.quiet,
                           workers=available_cores())
    print(json.dumps(summary, indent=1))


def cmd_train(args: argparse.Namespace) -> None:
    from detrq.training.train import TrainConfig, train

    data = Path(args.data) if args.data else ensure_embedded_data(EMBEDDED["data"])
    cfg = TrainConfig(data=str(data), out=args.out, preset=args.preset, iters=args.iters,
                      pretrain_iters=args.pretrain_iters, batch_size=args.batch_size, seed=args.seed,
                      eval_every=args.eval_every, threads=args.threads, max_eval_images=args.max_eval_images,
                      progress=not args.quiet)
    sidecar = train(cfg)
    print(f"wrote {cfg.out} (sha256 {sidecar['sha256'][:12]}) and its sidecar")
    _print_metrics(sidecar["val_metrics"])


def _resolve(args: argparse.Namespace, default_split: str) -> tuple[str, str, str]:
    """Checkpoint, data root and split, with the embedded default's filled in for the mini preset."""
    if args.preset == "mini":
        checkpoint = args.checkpoint or str(EMBEDDED["checkpoint"])
        coco = args.coco or str(ensure_embedded_data(EMBEDDED["data"]))
        return checkpoint, coco, args.split or default_split
    if args.checkpoint is None or args.coco is None:
        raise DetrqError(f"preset {args.preset!r} needs --checkpoint FILE and --coco DIR (only 'mini' has defaults)")
    return args.checkpoint, args.coco, args.split or f"{default_split}2017"


def _load_model(args: argparse.Namespace, checkpoint: str, device: str) -> tuple[Any, str]:
    from detrq.models.loading import load_model

    return load_model(args.preset, checkpoint, device, min_size=args.min_size, max_size=args.max_size)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from detrq.artifact.pipeline import run_evaluation
    from detrq.data.loading import eval_dataset
    from detrq.quant.bitmaps import load_bit_map, uniform_bit_map

    if args.bits is not None and args.bit_map is not None:
        raise DetrqError("give --bits or --bit-map, not both")
    checkpoint, coco, split = _resolve(args, "val")
    with distributed.process_group(args.device) as device:
        model, sha = _load_model(args, checkpoint, device)
        dataset = eval_dataset(model, coco, split, max_images=args.max_images)
        if args.bit_map:
            bit_map = load_bit_map(args.bit_map, model)
        else:
            bit_map = uniform_bit_map(model, args.bits) if args.bits is not None else {}
        result = run_evaluation(model, sha, dataset, bit_map, args.out, batch_size=args.batch_size, device=device,
                                progress=not args.quiet and distributed.is_main(), label=args.label,
                                keep_detections=args.keep_detections)
    if result is None:  # a rank other than 0: rank 0 reports
        return
    _print_metrics(result["metrics"])
    if args.out:
        print(f"results in {args.out}", file=sys.stderr)


def cmd_traces(args: argparse.Namespace) -> None:
    from detrq.artifact.pipeline import run_traces, traces_path
    from detrq.sensitivity import FIRST_ORDER, TraceSettings, rel_stderr

    settings = TraceSettings(num_images=args.num_images, image_seed=args.image_seed, batch_size=args.batch_size,
                             estimator=args.estimator, blocks=args.blocks, max_probes=args.max_probes,
                             min_probes=args.min_probes, rel_tol=args.rel_tol, probes_per_pass=args.probes_per_pass,
                             seed=args.seed, jacobian=args.jacobian, jacobian_probes=args.jacobian_probes)
    checkpoint, coco, split = _resolve(args, "train")
    out = args.out or traces_path("results", args.metric)
    with distributed.process_group(args.device) as device:
        model, sha = _load_model(args, checkpoint, device)
        result = run_traces(model, sha, coco, split, args.metric, out, settings, device=device,
                            progress=not args.quiet and distributed.is_main())
        if not distributed.is_main():
            return
    entries = [v["kl"] if args.metric == FIRST_ORDER else v for v in result["layers"].values()]
    worst = max(rel_stderr(e) for e in entries)
    probes = max(e["n_probes"] for e in entries)
    print(f"{len(result['layers'])} layers, {args.estimator}, {probes} probes, worst relative stderr {worst:.3f}; "
          f"wrote {out}")


def cmd_allocate(args: argparse.Namespace) -> None:
    from detrq.artifact.pipeline import bitmap_path, run_allocation
    from detrq.io.results import read_json
    from detrq.models.loading import load_model
    from detrq.quant.allocate import paper_bits_range, parse_bits_range

    traces = read_json(args.traces)
    checkpoint = args.checkpoint or (str(EMBEDDED["checkpoint"]) if args.preset == "mini" else None)
    if checkpoint is None:
        raise DetrqError(f"preset {args.preset!r} needs --checkpoint FILE")
    model, sha = load_model(args.preset, checkpoint)
    from detrq.quant.bitmaps import quantizable_layers
    from detrq.sensitivity.trace_checks import check_traces

    check_traces(traces, args.traces, quantizable_layers(model))
    if traces.get("checkpoint_sha256") not in (None, sha):
        raise DetrqError(f"{args.traces} was computed for another checkpoint (sha256 "
                         f"{traces['checkpoint_sha256'][:12]}, this one {sha[:12]})")
    bits = parse_bits_range(args.bits) if args.bits else paper_bits_range(args.avg_bits)
    out = args.out or bitmap_path("results", traces.get("metric", "measured"), args.avg_bits)
    result = run_allocation(model, traces, args.avg_bits, bits, out, negative_traces=args.negative_traces,
                            time_limit=args.time_limit)
    print(f"{result['metric']}: average {result['avg_bits']:.3f} bits (target {args.avg_bits:g}, range "
          f"{bits.start}-{bits.stop - 1}), objective {result['objective']:.4g}; wrote {out}")


def cmd_notebooks(args: argparse.Namespace) -> None:
    from detrq.artifact.notebooks import (ALL_NOTEBOOKS, load_parameters, parse_override, profile_notebooks,
                                          run_notebooks)

    names = tuple(args.only) if args.only else profile_notebooks(args.params, args.profile)
    unknown = [n for n in names if n not in ALL_NOTEBOOKS]
    if unknown:
        raise DetrqError(f"unknown notebook {unknown[0]!r}; choose from {', '.join(ALL_NOTEBOOKS)}")
    from detrq.io.locking import folder_lock
    from detrq.io.paths import resolve_path

    params = load_parameters(args.params, dict(parse_override(o) for o in args.set), names=ALL_NOTEBOOKS,
                             profile=args.profile)
    # The kernels write into results_dir: this process holds its lock for them.
    start = time.perf_counter()
    with folder_lock(resolve_path(params.get("results_dir", "results")), wait=args.wait):
        run_notebooks(params, args.out_dir or PROJECT_ROOT / "notebooks", names=names, together=args.together)
    print(f"notebooks: {time.perf_counter() - start:.0f} s in all; results in {params.get('results_dir')}/, figures "
          f"in {params.get('figures_dir')}/")


def cmd_pack(args: argparse.Namespace) -> None:
    import torch

    from detrq.artifact.pipeline import build_quantizer
    from detrq.quant.bitmaps import load_bit_map
    from detrq.quant.codes import QuantizerSettings, dequantize
    from detrq.quant.packing import load_packed, save_packed

    checkpoint, coco, split = _resolve(args, "train")
    settings = QuantizerSettings(name=args.quantizer, act_order=args.act_order, calib_images=args.calib_images)
    model, sha = _load_model(args, checkpoint, args.device)
    bit_map = load_bit_map(args.bit_map, model)
    quantizer = build_quantizer(model, sha, coco, split, settings, device=args.device)
    params = dict(model.named_parameters())
    codes = {n: quantizer.codes(n, params[n], b) for n, b in bit_map.items()}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {"preset": args.preset, "checkpoint_sha256": sha, "quantizer": quantizer.key,
            "bit_map_file": Path(args.bit_map).name}
    report = save_packed(args.out, state, codes, meta)
    # Read back what was written: the file must restore exactly the weights an evaluation of this bit map uses.
    loaded, _ = load_packed(args.out)
    # the file holds CPU tensors; the codes live on the device the quantizer ran on
    bad = [n for n, c in codes.items() if not torch.equal(loaded[n], dequantize(c).cpu())]
    if bad:
        raise RuntimeError(f"packed weight {bad[0]} does not round-trip bit for bit")
    mb = 1e6
    print(f"wrote {args.out}: {report['file_bytes'] / mb:.3f} MB (ideal {report['ideal_bytes'] / mb:.3f} MB, "
          f"overhead {100 * report['overhead']:.2f}%; float32 {report['float_bytes'] / mb:.3f} MB); "
          f"{len(codes)} layers at {report['average_bits']:.2f} average bits, {args.quantizer}; "
          "every packed weight verified bit-identical")


def cmd_pareto(args: argparse.Namespace) -> None:
    args.only = ["07_pareto"]
    cmd_notebooks(args)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from detrq.io.results import atomic_output, sha256_file
    from detrq.models.hf import write_hf
    from detrq.models.loading import build_model, checkpoint_payload, open_checkpoint

    if bool(args.from_hf) == bool(args.to_hf):
        raise DetrqError("give --from-hf DIR (with --out FILE) or --to-hf DIR (with --checkpoint), one of them")
    if args.from_hf:
        if not args.out:
            raise DetrqError("--from-hf needs --out FILE, the official-layout checkpoint to write")
        if not Path(args.from_hf).is_dir():
            raise DetrqError(f"--from-hf takes a Hugging Face checkpoint directory; {args.from_hf} is not a directory")
        ckpt = open_checkpoint(args.from_hf)
        build_model(ckpt, None)  # loads strictly: the converted state dict is exactly the model's
        # Saved through a file object: torch.save names the archive's records after a path's file name (here a
        # random temp name), and "archive" for a file object, so the same checkpoint gives the same bytes.
        with atomic_output(args.out) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint_payload(ckpt), f)
        cfg = ckpt.config
        print(f"wrote {args.out} (sha256 {sha256_file(args.out)[:12]}): DETR {cfg.backbone} ({ckpt.variant} "
              f"backbone), {cfg.enc_layers}+{cfg.dec_layers} layers, {cfg.num_classes} classes, "
              f"{sum(t.numel() for t in ckpt.state_dict.values()):,} elements in the official layout")
        return
    if not args.checkpoint:
        raise DetrqError("--to-hf needs --checkpoint FILE (and --preset when the file does not carry its "
                         "architecture, e.g. --preset r50 for the official DETR-R50)")
    ckpt = open_checkpoint(args.checkpoint)
    model = build_model(ckpt, args.preset)
    variant = args.backbone or ckpt.variant or "timm"
    labels = ckpt.id2label or {i: f"LABEL_{i}" for i in range(model.cfg.num_classes)}
    write_hf(args.to_hf, model.state_dict(), model.cfg, variant, labels)
    print(f"wrote {args.to_hf}: config.json, model.safetensors ({variant} backbone names) and "
          "preprocessor_config.json, for DetrForObjectDetection.from_pretrained")


QUANTIZE_HELP = """From a checkpoint and COCO-format data to a mixed-precision DETR, in one command: validate the data,
compute (or reuse) the per-layer sensitivities, allocate bits with the ILP at --avg-bits, quantize, evaluate float
and quantized AP with the paired bootstrap CI of their difference, and write into --out DIR the bit-packed
checkpoint (detr_packed.pth) and a report (report.json, report.md: bits per layer and per region, ideal and packed
size, AP, the time of each step). Caches go to DIR/cache/; the outputs replace earlier ones only once all are
complete. Without --checkpoint it runs the embedded default (the mini DETR on the synthetic set, on the CPU); for
DETR-R50 on COCO pass --checkpoint, --coco and --device cuda. The default recipe (--metric, --quantizer, --bits) is the
one that measured best on the embedded default: """


def cmd_quantize(args: argparse.Namespace) -> None:
    from detrq.artifact.quantize import QuantizeSettings, Source, default_splits, quantize
    from detrq.quant.allocate import parse_bits_range

    if args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)
    if args.checkpoint is None:
        checkpoint = EMBEDDED["checkpoint"]
        coco = Path(args.coco) if args.coco else ensure_embedded_data(EMBEDDED["data"])
    elif args.coco is None:
        raise DetrqError("--checkpoint needs --coco DIR, the COCO-layout data to calibrate and evaluate on")
    else:
        checkpoint, coco = args.checkpoint, Path(args.coco)
    eval_split, calib_split = default_splits(coco)
    bits = parse_bits_range(args.bits)
    settings = QuantizeSettings(avg_bits=args.avg_bits, metric=args.metric, quantizer=args.quantizer,
                                bits=(bits.start, bits.stop - 1), num_images=args.num_images,
                                calib_images=args.calib_images, max_eval_images=args.max_eval_images,
                                eval_batch_size=args.batch_size, n_boot=args.n_boot)
    source = Source(checkpoint, coco, args.split or eval_split, args.calib_split or calib_split, preset=args.preset,
                    device=args.device, min_size=args.min_size, max_size=args.max_size)
    r = quantize(source, args.out, settings, progress=not args.quiet)
    ap, d, size = r["ap"], r["ap"]["delta"], r["size"]
    print(f"AP {100 * ap['float']['AP']:.1f} -> {100 * ap['quantized']['AP']:.1f} (delta {100 * d['delta']:+.1f}, "
          f"95% CI [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]) at {r['allocation']['avg_bits']:.2f} average bits; "
          f"{size['packed_file_bytes'] / 1e6:.3f} MB packed (float {size['float_bytes'] / 1e6:.3f} MB); "
          f"wrote {Path(args.out) / 'detr_packed.pth'} and report.md/report.json in {r['seconds']['total']:.0f} s")


def _add_model_args(s: argparse.ArgumentParser, split_help: str) -> None:
    s.add_argument("--preset", default="mini", help="model preset: mini (embedded default) or r50 (default: "
                                                    "%(default)s)")
    s.add_argument("--checkpoint", help="checkpoint file or Hugging Face checkpoint directory (config.json + "
                                        "model.safetensors; its own architecture wins over --preset; default for "
                                        "mini: the committed one)")
    s.add_argument("--coco", help="COCO-layout root (default for mini: the synthetic set, generated if missing)")
    s.add_argument("--split", help=split_help)
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s; under torchrun cuda is "
                                                    "each rank's local GPU)")
    s.add_argument("--min-size", type=int, help="shorter image side after resizing (default: the preset's)")
    s.add_argument("--max-size", type=int, help="cap on the longer image side (default: the preset's)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detrq", description=__doc__.splitlines()[0])
    p.add_argument("--wait", action="store_true",
                   help="when another process is writing the same results folder, wait for it instead of stopping")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-data", help="write the synthetic COCO-layout dataset")
    s.add_argument("--out", default=str(EMBEDDED["data"]), help="output directory (default: %(default)s)")
    s.add_argument("--train", type=int, default=EMBEDDED["n_train"], help="training images (default: %(default)s)")
    s.add_argument("--val", type=int, default=EMBEDDED["n_val"], help="validation images (default: %(default)s)")
    s.add_argument("--seed", type=int, default=EMBEDDED["seed"], help="generator seed (default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_make_data)

    s = sub.add_parser("train", help="train a DETR preset on a COCO-layout dataset (the embedded checkpoint)")
    s.add_argument("--preset", default="mini", help="model preset (default: %(default)s)")
    s.add_argument("--data", help="dataset root with train/ and val/ (default: the synthetic set, made if missing)")
    s.add_argument("--out", default=str(EMBEDDED["checkpoint"]), help="checkpoint path (default: %(default)s)")
    s.add_argument("--iters", type=int, default=20000, help="DETR iterations (default: %(default)s)")
    s.add_argument("--pretrain-iters", type=int, default=2000,
                   help="backbone crop-classifier iterations before DETR training (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    s.add_argument("--eval-every", type=int, default=2000, help="val mAP every N iterations (default: %(default)s)")
    s.add_argument("--max-eval-images", type=int, help="evaluate on the first N val images only")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="COCO mAP of a checkpoint, optionally with quantized weights")
    _add_model_args(s, "split name (default: val for mini, val2017 otherwise)")
    s.add_argument("--max-images", type=int, help="evaluate the first N images only")
    s.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    s.add_argument("--bits", type=int, help="quantize every quantizable layer to N bits with Eq. (6)")
    s.add_argument("--bit-map", help="bit-map JSON {layer: bits} to apply before evaluating")
    s.add_argument("--out", help="write the metrics and protocol as JSON here (reused if inputs are unchanged)")
    s.add_argument("--label", help="a label stored in the result file")
    s.add_argument("--keep-detections", action="store_true",
                   help="also keep the raw detections beside --out (what the paired bootstrap resamples)")
    s.set_defaults(func=cmd_evaluate, writes=lambda a: a.out and Path(a.out).parent, ranks=True)

    s = sub.add_parser("traces", help="per-layer Hutchinson Hessian traces for one sensitivity metric")
    _add_model_args(s, "split the Hessian images come from (default: train for mini, train2017 otherwise)")
    s.add_argument("--metric", required=True, choices=list(ALL_METRICS),
                   help="loss: training loss (Loss Sen); out-float / out-quant: Eq. (5) at float / 8-bit weights; "
                        "out-first-order: KL trace + box Jacobian row-norm sums (beyond the paper)")
    s.add_argument("--estimator", default="hutchinson", choices=list(ESTIMATORS),
                   help="trace estimator (default: %(default)s); ggn is exact for out-float only")
    s.add_argument("--blocks", default="layer", choices=list(BLOCKS), help="blockwise: probe blocks (default: "
                                                                           "%(default)s)")
    s.add_argument("--jacobian", default="rows", choices=list(JACOBIAN_ESTIMATORS),
                   help="out-first-order: Jacobian row-norm sum estimator (default: %(default)s)")
    s.add_argument("--jacobian-probes", type=int, default=64, help="out-first-order: its probes (default: "
                                                                   "%(default)s)")
    s.add_argument("--probes-per-pass", type=int, default=10, help="probes per graph (default: %(default)s)")
    s.add_argument("--num-images", type=int, default=100, help="class-balanced Hessian images (default: %(default)s)")
    s.add_argument("--image-seed", type=int, default=0, help="seed of the image sample (default: %(default)s)")
    s.add_argument("--batch-size", type=int, default=10, help="images per HVP batch (default: %(default)s)")
    s.add_argument("--max-probes", type=int, default=100, help="default: %(default)s")
    s.add_argument("--min-probes", type=int, default=20, help="default: %(default)s")
    s.add_argument("--rel-tol", type=float, default=0.05,
                   help="stop when every layer's relative stderr is below this (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="probe seed (default: %(default)s)")
    s.add_argument("--out", help="default: results/traces/traces_<metric>.json")
    s.set_defaults(func=cmd_traces, writes=lambda a: Path(a.out).parent if a.out else Path("results"), ranks=True)

    s = sub.add_parser("allocate", help="ILP bit allocation from a traces or measured-costs file (Eq. (2) / (4))")
    s.add_argument("--traces", required=True, help="a results/traces_<metric>.json file")
    s.add_argument("--avg-bits", type=float, required=True, help="average bits over the quantized weights")
    s.add_argument("--bits", help="per-layer range LO-HI (default: the paper's, 3-6 up to 5 bits, else 4-7)")
    s.add_argument("--preset", default="mini", help="model preset (default: %(default)s)")
    s.add_argument("--checkpoint", help="the checkpoint (file or Hugging Face directory) the traces were taken on "
                                        "(default for mini: committed)")
    s.add_argument("--negative-traces", default="keep", choices=list(NEGATIVE_POLICIES),
                   help="what the ILP does with a negative trace estimate (default: %(default)s)")
    s.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit in s (default: %(default)s)")
    s.add_argument("--out", help="default: results/bitmaps/bitmap_<metric>_<avg>bit.json")
    s.set_defaults(func=cmd_allocate, writes=lambda a: Path(a.out).parent if a.out else Path("results"))

    s = sub.add_parser("curve", help="AP under uniform Eq. (6) weight quantization at 8..3 bits")
    _add_model_args(s, "split name (default: val for mini, val2017 otherwise)")
    s.add_argument("--max-images", type=int, help="evaluate the first N images only")
    s.add_argument("--results-dir", default="results", help="default: %(default)s")
    s.set_defaults(func=cmd_curve, writes=lambda a: Path(a.results_dir))

    s = sub.add_parser("check-data", help="check a COCO-format data set (annotations and images) before use",
                       description=CHECK_DATA_HELP)
    s.add_argument("--coco", help="COCO-layout root with annotations/ and the split folders (default: the synthetic "
                                  "set)")
    s.add_argument("--split", help="split to check, e.g. val2017 (default: every annotations/instances_*.json)")
    s.add_argument("--preset", help="also check the category ids against this model preset's classes (mini, r50)")
    s.set_defaults(func=cmd_check_data)

    s = sub.add_parser("pack", help="write a bit-packed checkpoint: n-bit integer codes, scales, the float rest",
                       description="Packs each layer of a bit map at exactly its bits per weight (plus its scales) "
                       "and stores the rest in float; `detrq.quant.packing.load_packed` restores exactly the "
                       "fake-quantized weights that an evaluation of the bit map uses.")
    _add_model_args(s, "gptq only: calibration split (default: train for mini, train2017 otherwise; never val)")
    s.add_argument("--bit-map", required=True, help="a bit-map file (results/bitmap_*.json)")
    s.add_argument("--quantizer", default="eq6", choices=QUANTIZERS, help="default: %(default)s")
    s.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    s.add_argument("--calib-images", type=int, default=128, help="gptq: calibration images (default: %(default)s)")
    s.add_argument("--out", required=True, help="the packed file to write (atomically)")
    s.set_defaults(func=cmd_pack, writes=lambda a: Path(a.out).parent)

    s = sub.add_parser("convert", help="Hugging Face DETR checkpoints to and from the official layout",
                       description="--from-hf DIR --out FILE: a Hugging Face checkpoint directory (config.json + "
                       "model.safetensors or pytorch_model.bin, timm or no_timm ResNet backbone, the hub's on-disk "
                       "names) to an official-layout checkpoint that also carries its architecture and id2label. "
                       "--checkpoint FILE --to-hf DIR: the other way, to a directory that "
                       "DetrForObjectDetection.from_pretrained loads. Class i of the model is id2label[i] (the "
                       "official DETR's class index is the COCO category id); the last logit is no-object. "
                       "Every --checkpoint also takes such a directory directly.")
    s.add_argument("--from-hf", metavar="DIR", help="Hugging Face checkpoint directory to convert")
    s.add_argument("--out", metavar="FILE", help="with --from-hf: the official-layout .pth to write (atomically)")
    s.add_argument("--to-hf", metavar="DIR", help="the Hugging Face directory to write (swapped in whole)")
    s.add_argument("--checkpoint", help="with --to-hf: the checkpoint file (or directory) to convert")
    s.add_argument("--preset", help="with --to-hf: the architecture of a checkpoint that does not carry its own "
                                    "(r50 for the official DETR-R50)")
    s.add_argument("--backbone", choices=["timm", "no_timm"],
                   help="with --to-hf: backbone names (default: the variant the checkpoint came from, else timm, "
                        "the hub's main revision)")
    s.set_defaults(func=cmd_convert, writes=lambda a: Path(a.out or a.to_hf or ".").resolve().parent)

    from detrq.artifact.recipe import DEFAULT_RECIPE, RECIPE_WHY, SCHEME_SPECS

    s = sub.add_parser("quantize", help="checkpoint + COCO data -> packed mixed-precision DETR and its report",
                       description=QUANTIZE_HELP + RECIPE_WHY)
    s.add_argument("--checkpoint", help="checkpoint file or Hugging Face directory (default: the embedded mini DETR)")
    s.add_argument("--coco", help="COCO-layout root (default without --checkpoint: the synthetic set)")
    s.add_argument("--split", help="evaluation split (default: val2017 if the root has it, else val)")
    s.add_argument("--calib-split", help="split of the sensitivity and GPTQ calibration images, never the evaluation "
                                         "one (default: train2017 if the root has it, else train)")
    s.add_argument("--avg-bits", type=float, default=4.0, help="average bits over the quantized weights (default: "
                                                               "%(default)s)")
    s.add_argument("--metric", default=DEFAULT_RECIPE["metric"], choices=list(SCHEME_SPECS),
                   help="sensitivity scheme of the ILP's costs (default: %(default)s)")
    s.add_argument("--quantizer", default=DEFAULT_RECIPE["quantizer"], choices=QUANTIZERS,
                   help="default: %(default)s")
    s.add_argument("--bits", default="{}-{}".format(*DEFAULT_RECIPE["bits"]),
                   help="every layer's choices LO-HI (default: %(default)s)")
    s.add_argument("--preset", help="architecture of a plain checkpoint file (default: the one its tensors fit)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    s.add_argument("--min-size", type=int, help="shorter image side after resizing (default: the model's)")
    s.add_argument("--max-size", type=int, help="cap on the longer image side (default: the model's)")
    s.add_argument("--num-images", type=int, default=100, help="class-balanced sensitivity images (default: "
                                                               "%(default)s)")
    s.add_argument("--calib-images", type=int, default=128, help="gptq: calibration images (default: %(default)s)")
    s.add_argument("--max-eval-images", type=int, help="evaluate on the first N images only (default: all)")
    s.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default: %(default)s)")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s, as train: the embedded default's small tensors gain "
                        "1.4x from 2 threads on an idle 2-core machine and lose 3x on a busy one)")
    s.add_argument("--out", required=True, metavar="DIR", help="where the packed checkpoint and report go")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_quantize, writes=lambda a: Path(a.out))

    s = sub.add_parser("pareto", help="notebook 07: mAP-vs-bits Pareto fronts, three quantizers, Table 2",
                       description="Runs notebook 07 (papermill) with a parameter file: every sensitivity scheme "
                       "and Measured Sen allocated at 3.5..8 average bits and evaluated, per quantizer; writes "
                       "results/pareto/, results/tables/table2.*, figures/fig3_pareto.* and figures/fig4_per_class.*. "
                       "Needs notebook 01's traces and notebook 02's measured costs in the results folder.")
    s.add_argument("--params", default="params/default.yaml", help="YAML parameter file (default: %(default)s)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (repeatable), e.g. --set quantizers=[eq6]")
    s.add_argument("--out-dir", help="where the executed notebook goes (default: over notebooks/07_pareto.ipynb)")
    s.set_defaults(func=cmd_pareto)

    s = sub.add_parser("readme", help="regenerate the result sections of README.md and docs/*.md from results/")
    s.add_argument("--readme", default=str(PROJECT_ROOT),
                   help="a page to regenerate, or a directory: its README.md and docs/*.md (default: the repository)")
    s.add_argument("--results-dir", default=str(PROJECT_ROOT / "results"), help="default: %(default)s")
    s.set_defaults(func=cmd_readme)

    run_names = list(_run_dirs())
    s = sub.add_parser("run-start", help="prepare runs/<run>/ for a run (reproduce.sh): emptied, or kept with --reuse")
    s.add_argument("--run", required=True, choices=run_names, help="which part of the artifact")
    s.add_argument("--reuse", action="store_true",
                   help="keep the run directory's cached results (seeded from results/ when it has none)")
    s.set_defaults(func=cmd_run_start, writes=lambda a: _run_dirs()[a.run] / "results")

    s = sub.add_parser("report", help="compare runs/ with the committed results: results/reproduction.json")
    s.add_argument("--run", choices=run_names, help="the run whose step times --runtime gives")
    s.add_argument("--runtime", nargs="*", metavar="NAME=SECONDS", help="the run's measured step times")
    s.add_argument("--profile", default="complete", help="the profile the run computed (recorded with its times; "
                   "default: %(default)s)")
    s.set_defaults(func=cmd_report, writes=lambda a: PROJECT_ROOT / "results")

    s = sub.add_parser("accept", help="replace the committed results/ and figures/ with the runs/ that were compared")
    s.set_defaults(func=cmd_accept, writes=lambda a: PROJECT_ROOT / "results")

    s = sub.add_parser("notebooks", help="run notebooks/01..05 with papermill on a parameter file (reproduce.sh)")
    s.add_argument("--params", required=True, help="YAML parameter file, e.g. params/default.yaml")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (repeatable), e.g. --set device=cuda")
    s.add_argument("--out-dir", help="where the executed notebooks go (default: over the ones in notebooks/)")
    s.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks, e.g. 04_figures (default: "
                   "the profile's)")
    s.add_argument("--profile", help="the parameter file's profile: its notebooks and its values (default: the one "
                   "the file names, e.g. complete; paper: what reproducing the paper needs)")
    s.add_argument("--together", action="store_true", help="run the notebooks at the same time, each kernel on "
                   "threads/N torch threads (for notebooks that write different files, e.g. 05 and 07)")
    s.set_defaults(func=cmd_notebooks)

    s = sub.add_parser("int8", help="INT8 PTQ of a CNN detector (Faster R-CNN, or any ONNX detector with --onnx): "
                       "size, latency, memory, mAP")
    s.add_argument("--backend", default="fx", choices=["fx", "pt2e", "onnxruntime"], help="default: %(default)s")
    s.add_argument("--model", default="narrow", help="narrow (the trained checkpoint; default) or a torchvision "
                   "architecture with random weights: fasterrcnn_resnet50_fpn, fasterrcnn_mobilenet_v3_large_fpn")
    s.add_argument("--checkpoint", help="Faster R-CNN checkpoint (default: checkpoints/frcnn_narrow.pth)")
    s.add_argument("--parts", help="comma-separated detector parts to quantize (default: all of backbone, rpn_head, "
                   "box_head, box_predictor that the model has)")
    s.add_argument("--image-size", type=int, help="default: the checkpoint's, or 800 for a torchvision model")
    s.add_argument("--calib-images", type=int, default=32, help="train images to calibrate on (default: %(default)s)")
    s.add_argument("--eval-images", type=int, help="evaluate on the first N val images only (--onnx: default 50)")
    s.add_argument("--agreement-score-thr", type=float,
                   help="detections compared float vs int8 score at least this (default: 0.5; --onnx: 0.25)")
    s.add_argument("--latency-images", type=int, default=4, help="val images per timed run (default: %(default)s)")
    s.add_argument("--batch-sizes", default="1,2,4,32,64", help="peak-memory batch sizes (default: %(default)s)")
    s.add_argument("--large-batch-image-size", type=int, help="image size of the peak-memory batches >= 32")
    s.add_argument("--compile", action="store_true", help="pt2e: torch.compile the int8 parts (int8 kernels)")
    s.add_argument("--figures", help="write the activation figures (fx backend, or --onnx) to this directory")
    s.add_argument("--out", help="default: results/int8/int8_<model>_<backend>.json (--onnx: int8_<stem>_onnx.json)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    o = s.add_argument_group("ONNX models (--onnx): static int8 of your ONNX file with onnxruntime (QDQ, per-channel)")
    o.add_argument("--onnx", help="the float ONNX detector to quantize (one image input [N,3,H,W] or [N,H,W,3])")
    o.add_argument("--coco", help="COCO-format root: calibration on --split, agreement and AP on --eval-split")
    o.add_argument("--split", default="train", help="calibration split of --coco (default: %(default)s)")
    o.add_argument("--eval-split", default="val", help="evaluation split of --coco (default: %(default)s)")
    o.add_argument("--images", help="or a folder of images: calibration and agreement (no AP) on its images")
    o.add_argument("--input-size", help="H or HxW (default: the declared size, else 640)")
    o.add_argument("--resize", default="letterbox", choices=["letterbox", "stretch", "none"],
                   help="letterbox (keep aspect, pad 114), stretch, or none (images must be the input size)")
    o.add_argument("--channels", default="RGB", choices=["RGB", "BGR"], help="default: %(default)s")
    o.add_argument("--layout", choices=["NCHW", "NHWC"], help="default: from the input's shape")
    o.add_argument("--scale", type=float, default=1 / 255, help="pixels 0..255 times this (default: 1/255)")
    o.add_argument("--mean", help="3 comma-separated values subtracted after --scale (default: 0,0,0)")
    o.add_argument("--std", help="3 comma-separated values divided by after --mean (default: 1,1,1)")
    o.add_argument("--int8-out", help="the int8 ONNX file (default: <model>_int8.onnx beside the model)")
    s.set_defaults(func=cmd_int8, writes=lambda a: Path(a.out).parent if a.out else PROJECT_ROOT / "results")
    return p


def _numbers(flag: str, text: str, kind: type, count: int | None = None) -> tuple:
    """A comma- (or x-) separated option value as a tuple of ``kind``, one error line if it is not one."""
    try:
        values = tuple(kind(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        raise DetrqError(f"{flag} takes {count or 'some'} comma-separated numbers, got {text!r}")
    return values


def cmd_int8_onnx(args: argparse.Namespace, batch_sizes: tuple[int, ...]) -> None:
    from detrq.int8.onnx_workflow import OnnxRunConfig, run_onnx_int8

    size = _numbers("--input-size", args.input_size, int) if args.input_size else None
    if size is not None and len(size) not in (1, 2):
        raise DetrqError(f"--input-size takes H or HxW, got {args.input_size!r}")
    def here(path: str | None) -> str | None:  # a user's relative paths are from the working directory
        return None if path is None else str(Path(path).resolve())

    cfg = OnnxRunConfig(onnx=here(args.onnx), coco=here(args.coco), split=args.split, eval_split=args.eval_split,
                        images=here(args.images), calib_images=args.calib_images, eval_images=args.eval_images or 50,
                        input_size=None if size is None else (size[0], size[-1]), resize=args.resize,
                        channels=args.channels, layout=args.layout, scale=args.scale,
                        mean=_numbers("--mean", args.mean, float, 3) if args.mean else (0.0, 0.0, 0.0),
                        std=_numbers("--std", args.std, float, 3) if args.std else (1.0, 1.0, 1.0),
                        agreement_score_thr=args.agreement_score_thr or 0.25, latency_images=args.latency_images,
                        batch_sizes=batch_sizes, figures=here(args.figures), out=here(args.out),
                        int8_out=here(args.int8_out))
    r = run_onnx_int8(cfg, progress=not args.quiet)
    mem, split = r["peak_memory_mb"], r["profile"]["int8_split"]
    ap = (f", AP {r['AP_float']:.4f} -> {r['AP_int8']:.4f}" if r["AP_float"] is not None else
          f"; {r['AP_note']}")
    iqr = r["latency"]["ratio_iqr"]
    print(f"{r['model']} (ONNX): size {r['size_bytes']['float'] / 1e6:.2f} -> {r['size_bytes']['int8'] / 1e6:.2f} MB "
          f"({r['size_reduction']:.1%} smaller), latency x{r['latency_ratio']:.2f} [IQR {iqr[0]:.2f}-{iqr[1]:.2f}] "
          f"at {r['image_size']} px, float operators "
          f"{split['float_ops_share']:.0%} of int8 time{ap}; peak RSS MB float/int8 "
          + " ".join(f"b{b}:{mem['float'][b]:.0f}/{mem['int8'][b]:.0f}" for b in mem["float"])
          + (f" ({r['peak_memory_note']})" if r["peak_memory_note"] else ""))


def cmd_int8(args: argparse.Namespace) -> None:
    from detrq.int8.workflow import Int8RunConfig, run_int8

    batch_sizes = _numbers("--batch-sizes", args.batch_sizes, int)
    if args.onnx:
        cmd_int8_onnx(args, batch_sizes)
        return
    onnx_only = [f for f in ("coco", "images", "input_size", "mean", "std", "int8_out") if getattr(args, f)]
    if onnx_only:
        raise DetrqError(f"--{onnx_only[0].replace('_', '-')} is for --onnx models; pass --onnx FILE")
    cfg = Int8RunConfig(backend=args.backend, model=args.model, calib_images=args.calib_images, compile=args.compile,
                        parts=tuple(args.parts.split(",")) if args.parts else None, image_size=args.image_size,
                        eval_images=args.eval_images, agreement_score_thr=args.agreement_score_thr or 0.5,
                        latency_images=args.latency_images, batch_sizes=batch_sizes,
                        large_batch_image_size=args.large_batch_image_size, figures=args.figures, out=args.out)
    if args.checkpoint:
        cfg.checkpoint = args.checkpoint
    r = run_int8(cfg, progress=not args.quiet)
    mem, bd = r["peak_memory_mb"], r["breakdown"]
    ap = "" if r["AP_float"] is None else f", AP {r['AP_float']:.4f} -> {r['AP_int8']:.4f}"
    print(f"{r['model']} {r['backend']}: size {r['size_reduction']:.1%} smaller, latency x{r['latency_ratio']:.2f} "
          f"[IQR {r['latency']['ratio_iqr'][0]:.2f}-{r['latency']['ratio_iqr'][1]:.2f}] at {r['image_size']} px, "
          f"{r['rois']['float_per_image']:.0f} RoIs/img{ap}; float stages floor x{bd['ratio_floor']:.2f}; "
          "peak RSS MB float/int8 " + " ".join(f"b{b}:{mem['float'][b]:.0f}/{mem['int8'][b]:.0f}" for b in mem["float"]))


def cmd_curve(args: argparse.Namespace) -> None:
    from detrq.artifact.pipeline import run_quant_curve
    from detrq.data.loading import eval_dataset

    checkpoint, coco, split = _resolve(args, "val")
    model, sha = _load_model(args, checkpoint, args.device)
    dataset = eval_dataset(model, coco, split, max_images=args.max_images)
    curve = run_quant_curve(model, sha, dataset, args.results_dir, device=args.device, progress=not args.quiet)
    print("  ".join(f"{r['label']} {100 * r['AP']:.1f}" for r in curve["rows"]))


def cmd_readme(args: argparse.Namespace) -> None:
    from detrq.artifact.readme import update_readme

    for page, found in update_readme(args.readme, args.results_dir).items():
        shown = page.resolve().relative_to(PROJECT_ROOT) if page.resolve().is_relative_to(PROJECT_ROOT) else page
        print(f"updated {shown}: {', '.join(found) or 'no generated sections'}")


def _run_dirs() -> dict[str, Path]:
    from detrq.artifact.reproduction import RUN_NAMES, RUNS_DIR

    return {name: RUNS_DIR / name for name in RUN_NAMES}


def cmd_run_start(args: argparse.Namespace) -> None:
    from detrq.artifact.reproduction import start_run

    run_dir = _run_dirs()[args.run]
    start = start_run(run_dir, args.reuse, PROJECT_ROOT / "results" if args.reuse else None)
    where = run_dir.relative_to(PROJECT_ROOT)
    if start.mode == "fresh":
        print(f"== fresh run in {where}/: every result is computed again")
    elif start.mode == "resumed":
        print(f"== resuming the interrupted run in {where}/: the steps it finished are kept (rm -rf {where} to "
              "start over)")
    elif start.seeded:
        print(f"== REUSING: {len(start.seeded)} committed result files copied into {where}/results as caches; "
              "this run re-renders them and is not a reproduction")
    else:
        print(f"== REUSING the cached results already in {where}/results; not a reproduction")


def _parse_runtime(items: list[str]) -> list[tuple[str, int]]:
    steps = []
    for item in items:
        name, _, secs = item.rpartition("=")
        if not name or not secs.isdigit():
            raise DetrqError(f"--runtime takes NAME=SECONDS, got {item!r}")
        steps.append((name, int(secs)))
    return steps


def cmd_report(args: argparse.Namespace) -> None:
    from detrq.artifact.reproduction import (PROFILE_RUNS, REPORT_NAME, compare_runs, report_text, write_report,
                                             write_runtime)

    runs = _run_dirs()
    if args.runtime and not args.run:
        raise DetrqError("--runtime needs --run NAME: the run whose step times they are")
    if args.runtime:
        write_runtime(runs[args.run], _parse_runtime(args.runtime), args.profile)
    # A smaller profile's run is reported on its own; the full runs together.
    runs = ({args.run: runs[args.run]} if args.run in PROFILE_RUNS
            else {k: d for k, d in runs.items() if k not in PROFILE_RUNS})
    report = compare_runs(PROJECT_ROOT / "results", runs)
    write_report(report, [PROJECT_ROOT / "results" / REPORT_NAME]
                 + [d / REPORT_NAME for d in runs.values() if (d / "results").is_dir()])
    print(report_text(report))
    print(f"== report: results/{REPORT_NAME} (per line: identical / within tolerance / differs / not run)")


def cmd_accept(args: argparse.Namespace) -> None:
    import shutil

    from detrq.io.layout import results_file
    from detrq.artifact.readme import update_readme
    from detrq.artifact.reproduction import (ACCEPTED_NAME, PARTS, PROFILE_RUNS, REPORT_NAME, RUNTIME_NAME,
                                             accept_runs, accepted_report)
    from detrq.io.results import read_json

    every = _run_dirs()
    runs = {k: d for k, d in every.items() if k in PARTS}  # a smaller profile's results are never accepted ...
    results, figures = PROJECT_ROOT / "results", PROJECT_ROOT / "figures"
    copied = accept_runs(runs, results, figures, PARTS)
    if not copied:
        raise DetrqError("nothing to accept: runs/ holds no finished run (./reproduce.sh, ./reproduce.sh int8)")
    accepted = accepted_report(runs, results)
    for name in PROFILE_RUNS:  # ... only its from-scratch time, when its report found every number it ran
        run_dir = every[name]
        report = run_dir / REPORT_NAME
        if (run_dir / RUNTIME_NAME).is_file() and report.is_file() and not read_json(report)["counts"]["differs"]:
            runs[name] = run_dir
    for name, run_dir in runs.items():
        runtime = run_dir / RUNTIME_NAME
        if runtime.is_file() and read_json(runtime)["from_scratch"]:
            shutil.copy2(runtime, results_file(results, f"runtime_{name}.json"))
        elif runtime.is_file():
            print(f"runtime of runs/{name} not taken: that run reused cached results")
    shutil.copy2(accepted, results / ACCEPTED_NAME)
    print(f"accepted {len(copied)} files from runs/ into results/ and figures/; report kept as results/{ACCEPTED_NAME}")
    for page, found in update_readme(PROJECT_ROOT, results).items():
        print(f"updated {page.relative_to(PROJECT_ROOT)}: {', '.join(found) or 'no generated sections'}")


CHECK_DATA_HELP = """Check a COCO-format data set before use, as every loader does: the JSON's structure and types;
image entries (unique ids, file present and decodable, size as recorded); annotations (unique ids, an existing
image, a known category, a finite bbox with width and height >= 0 that overlaps its image, area and iscrowd of
the right type); categories (unique ids; inside the preset's classes with --preset). Every problem is listed with
its count and first examples. Exit 0 when the data is usable (soft problems are printed as warnings: a box
crossing the image border is clipped, a zero-size box, an image without annotations, one file under two ids),
2 with one error line otherwise."""


def cmd_check_data(args: argparse.Namespace) -> None:
    from detrq.data.validate import check_coco
    from detrq.models.detr import PRESETS

    root = Path(args.coco) if args.coco else EMBEDDED["data"]
    if not root.is_dir():
        raise DetrqError(f"COCO root not found: {root}; pass the directory holding annotations/ and the split folders")
    if args.preset is not None and args.preset not in PRESETS:
        raise DetrqError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    num_classes = PRESETS[args.preset].num_classes if args.preset else None
    if args.split:
        splits = [args.split]
    else:
        found = (root / "annotations").glob("instances_*.json")
        splits = sorted(f.name[len("instances_"):-len(".json")] for f in found)
        if not splits:
            raise DetrqError(f"no annotations/instances_<split>.json under {root}; pass the COCO root")
    failed = []
    for split in splits:
        image_dir = root / split
        _, report = check_coco(root / "annotations" / f"instances_{split}.json",
                               image_dir if image_dir.is_dir() else None, num_classes=num_classes,
                               raise_errors=False, quiet=True)
        print(report.summary())
        for line in report.warning_lines():
            print(f"warning: {line}", file=sys.stderr)
        if not image_dir.is_dir():
            failed.append(f"image directory not found: {image_dir}; put the {split} images there")
        if report.errors:
            failed.append(report.error_line())
    if failed:
        more = f" (and {len(failed) - 1} more, listed above)" if len(failed) > 1 else ""
        raise DetrqError(failed[0] + more)


def main(argv: list[str] | None = None) -> int:
    from contextlib import nullcontext

    from detrq.io.locking import folder_lock

    args = build_parser().parse_args(argv)

    def run() -> None:
        if distributed.launched() and not getattr(args, "ranks", False):
            raise DetrqError(f"{args.command} does not run under torchrun; only evaluate and traces do")
        # Under torchrun the ranks write through rank 0, which alone holds the folder.
        folder = args.writes(args) if getattr(args, "writes", None) and distributed.launch_rank() == 0 else None
        with folder_lock(folder, wait=args.wait) if folder else nullcontext():
            args.func(args)

    return guarded(run)


def guarded(fn: Callable[..., Any], *args: Any) -> int:
    """Run ``fn(*args)`` as a command: its exit status, with one ``error:`` line for bad input (2), ``interrupted``
    for Ctrl-C (130), and a traceback plus a bug-report line only for a bug in detrq (1). ``reproduce.sh``'s
    Python one-liners go through it too, so that no traceback reaches a user from there either."""
    try:
        fn(*args)
    except DetrqError as e:
        print(f"error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno is None:  # not the system's answer to a file operation: treat as a bug below
            return _bug()
        # The system refused a file operation (permissions, a full disk, a path that went away): the user's to fix.
        where = f" {e.filename}" if e.filename else ""
        print(f"error: {_rank_prefix()}{e.strerror or e}:{where}; check the path, its permissions and the free disk "
              "space", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: {_rank_prefix()}out of memory; use fewer images or a smaller batch size", file=sys.stderr)
        return 2
    except Exception:  # anything else is a bug in detrq: show where, and ask for a report
        return _bug()
    return 0


def _rank_prefix() -> str:
    return f"rank {distributed.launch_rank()}: " if distributed.launched() else ""


def _bug() -> int:
    traceback.print_exc()
    print(f"error: {_rank_prefix()}this is a bug in detrq, not in your input; please report it with the traceback "
          "above", file=sys.stderr)
    return 1
