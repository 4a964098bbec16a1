"""``python -m detrq <command>``: thin command-line wrappers over the package's functions.

Commands: make-data, train, evaluate, traces, allocate. Bad input gives one ``error: ...`` line and exit
status 2; results are written atomically and reused when their inputs are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detrq.errors import DetrqError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
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
    make_dataset(root, EMBEDDED["n_train"], EMBEDDED["n_val"], seed=EMBEDDED["seed"])
    return root


def cmd_make_data(args: argparse.Namespace) -> None:
    from detrq.data.synthetic import make_dataset

    summary = make_dataset(args.out, args.train, args.val, seed=args.seed, progress=not args.quiet)
    print(json.dumps(summary, indent=1))


def cmd_train(args: argparse.Namespace) -> None:
    from detrq.train import TrainConfig, train

    data = Path(args.data) if args.data else ensure_embedded_data(EMBEDDED["data"])
    cfg = TrainConfig(data=str(data), out=args.out, preset=args.preset, iters=args.iters,
                      pretrain_iters=args.pretrain_iters, batch_size=args.batch_size, seed=args.seed,
                      eval_every=args.eval_every, threads=args.threads, max_eval_images=args.max_eval_images,
                      progress=not args.quiet)
    sidecar = train(cfg)
    print(f"wrote {cfg.out} (sha256 {sidecar['sha256'][:12]}) and its sidecar")
    _print_metrics(sidecar["val_metrics"])


def load_model_and_data(preset: str, checkpoint: str | None, coco: str | None, split: str | None,
                        max_images: int | None, device: str = "cpu"):
    """The model with its checkpoint loaded and the evaluation dataset, with the embedded defaults filled in."""
    from detrq.data.coco import CocoDetection, EvalTransform
    from detrq.models.detr import build_detr, load_checkpoint

    if preset == "mini":
        checkpoint = checkpoint or str(EMBEDDED["checkpoint"])
        coco = coco or str(ensure_embedded_data(EMBEDDED["data"]))
        split = split or "val"
    elif checkpoint is None or coco is None:
        raise DetrqError(f"preset {preset!r} needs --checkpoint FILE and --coco DIR (only 'mini' has defaults)")
    split = split or "val2017"
    model = build_detr(preset)
    load_checkpoint(model, checkpoint)
    model.to(device).eval()
    cfg = model.cfg
    dataset = CocoDetection(coco, split, EvalTransform(cfg.min_size, cfg.max_size), max_images=max_images)
    return model, dataset, checkpoint


def cmd_evaluate(args: argparse.Namespace) -> None:
    from detrq.cache import cache_key, load_cached
    from detrq.evaluate import evaluate
    from detrq.quant import load_bit_map, quantized, uniform_bit_map
    from detrq.results import environment, sha256_file, write_json_atomic

    if args.bits is not None and args.bit_map is not None:
        raise DetrqError("give --bits or --bit-map, not both")
    model, dataset, checkpoint = load_model_and_data(args.preset, args.checkpoint, args.coco, args.split,
                                                     args.max_images, args.device)
    if args.bit_map:
        bit_map = load_bit_map(args.bit_map, model)
    elif args.bits is not None:
        bit_map = uniform_bit_map(model, args.bits)
    else:
        bit_map = {}
    ckpt_sha = sha256_file(checkpoint)
    key = cache_key(kind="evaluate", checkpoint=ckpt_sha, preset=args.preset,
                    annotations=sha256_file(dataset.root / "annotations" / f"instances_{dataset.split}.json"),
                    split=dataset.split, images=dataset.ids, batch_size=args.batch_size,
                    transform=dataset.transform.describe(), bit_map=bit_map)
    cached = load_cached(args.out, key) if args.out else None
    if cached is not None:
        print(f"(cached: {args.out})", file=sys.stderr)
        _print_metrics(cached["metrics"])
        return
    with quantized(model, bit_map):
        metrics = evaluate(model, dataset, batch_size=args.batch_size, device=args.device,
                           progress=not args.quiet)
    _print_metrics(metrics)
    if args.out:
        write_json_atomic(args.out, {
            "cache_key": key, "metrics": {k: v for k, v in metrics.items() if k != "protocol"},
            "protocol": metrics["protocol"], "preset": args.preset, "checkpoint": str(checkpoint),
            "checkpoint_sha256": ckpt_sha, "bit_map": bit_map, "environment": environment(),
        })
        print(f"wrote {args.out}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detrq", description=__doc__.splitlines()[0])
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
    s.add_argument("--preset", default="mini", help="model preset: mini (embedded default) or r50 (default: "
                                                    "%(default)s)")
    s.add_argument("--checkpoint", help="checkpoint file (default for mini: the committed one)")
    s.add_argument("--coco", help="COCO-layout root (default for mini: the synthetic set, generated if missing)")
    s.add_argument("--split", help="split name (default: val for mini, val2017 otherwise)")
    s.add_argument("--max-images", type=int, help="evaluate the first N images only")
    s.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    s.add_argument("--bits", type=int, help="quantize every quantizable layer to N bits with Eq. (6)")
    s.add_argument("--bit-map", help="bit-map JSON {layer: bits} to apply before evaluating")
    s.add_argument("--out", help="write the metrics and protocol as JSON here (reused if inputs are unchanged)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DetrqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
