"""Train the embedded Faster R-CNN on the synthetic set: seeded, with a progress bar, resumable.

``python -m detrq.int8.train`` writes ``checkpoints/frcnn_narrow.pth`` and a JSON sidecar with the provenance
(config, data seed, iterations, wall time, git commit, val metrics, SHA-256). A state file beside the
checkpoint (``.state.pt``) is saved every ``save_every`` iterations; rerunning the same command resumes from it.
Batches come from ``detrq.training.train``'s replayable sampler, so a resumed run sees the same images as an unbroken one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from detrq.data.loading import shuffled_batches
from detrq.int8.data import detection_dataset
from detrq.int8.detect import evaluate_detector
from detrq.int8.detector import FrcnnConfig, build_frcnn, save_frcnn
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT, repo_relative
from detrq.io.results import environment, sha256_file, write_json_atomic


@dataclass
class FrcnnTrainConfig:
    """Every knob of a training run; stored in the state file and the sidecar."""

    data: str = str(PROJECT_ROOT / "data" / "synthetic")
    out: str = str(PROJECT_ROOT / "checkpoints" / "frcnn_narrow.pth")
    iters: int = 2500
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    lr_drop_at: float = 0.8  # fraction of ``iters`` after which the lr is multiplied by 0.1
    clip_max_norm: float = 10.0
    seed: int = 0
    eval_every: int = 500
    eval_images: int = 200  # val images for the intermediate evaluations (the final one uses all)
    save_every: int = 100
    threads: int = 1


def _lr_factor(it: int, cfg: FrcnnTrainConfig) -> float:
    warm = min(1.0, (it + 1) / max(cfg.warmup_iters, 1))
    return warm * (0.1 if it >= cfg.lr_drop_at * cfg.iters else 1.0)


def train_frcnn(cfg: FrcnnTrainConfig, model_cfg: FrcnnConfig = FrcnnConfig(), progress: bool = True) -> dict:
    """Run (or resume) training and write the checkpoint and its sidecar; returns the sidecar dict."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_frcnn(model_cfg)
    train_set = detection_dataset(cfg.data, "train", model_cfg.image_size, train=True)
    val_set = detection_dataset(cfg.data, "val", model_cfg.image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state_path = Path(cfg.out + ".state.pt")
    # JSON-normalised (tuples become lists) so that it compares equal after a torch.save round trip.
    run_key = json.loads(json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_cfg)}))
    start, wall, history = 0, 0.0, []
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["key"] != run_key:
            raise DetrqError(f"{state_path} was written with a different config; delete it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, wall, history = state["iteration"], state["wall"], state["history"]
    t0 = time.time() - wall

    model.train()
    bar = tqdm(total=cfg.iters, initial=start, desc="Faster R-CNN training", disable=not progress)
    for it, (images, targets) in shuffled_batches(train_set, cfg.batch_size, cfg.seed, start):
        if it >= cfg.iters:
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(it, cfg)
        losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", cls=f"{losses['loss_classifier'].item():.3f}")
        done = it + 1
        if done % cfg.eval_every == 0 and done < cfg.iters:
            metrics = evaluate_detector(model, val_set, max_images=cfg.eval_images)["metrics"]
            model.train()
            history.append({"iteration": done, "loss": round(loss.item(), 4), "wall_s": round(time.time() - t0, 1),
                            "AP": metrics["AP"], "AP50": metrics["AP50"]})
            tqdm.write(json.dumps(history[-1]))
        if done % cfg.save_every == 0:
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({"key": run_key, "iteration": done, "wall": time.time() - t0, "history": history,
                        "model": model.state_dict(), "opt": opt.state_dict()}, tmp)
            os.replace(tmp, state_path)
    bar.close()
    wall = time.time() - t0
    metrics = evaluate_detector(model, val_set)["metrics"]
    save_frcnn(model, model_cfg, cfg.out)
    info = json.loads((Path(cfg.data) / "annotations" / "instances_train.json").read_text()).get("info", {})
    sidecar = {
        "checkpoint": Path(cfg.out).name,
        "sha256": sha256_file(cfg.out),
        "model_config": dataclasses.asdict(model_cfg),
        "train_config": {**dataclasses.asdict(cfg), "data": repo_relative(cfg.data), "out": repo_relative(cfg.out)},
        "data": info,
        "iterations": cfg.iters,
        "wall_time_s": round(wall, 1),
        "val_metrics": {k: v for k, v in metrics.items() if k not in ("per_class", "protocol")},
        "val_protocol": metrics["protocol"],
        "history": history,
        "environment": environment(),
    }
    write_json_atomic(Path(cfg.out).with_suffix(".json"), sidecar)
    return sidecar


def main(argv: list[str] | None = None) -> None:
    defaults = FrcnnTrainConfig()
    p = argparse.ArgumentParser(prog="python -m detrq.int8.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=defaults.data, help="COCO-layout root (default: %(default)s)")
    p.add_argument("--out", default=defaults.out, help="checkpoint path (default: %(default)s)")
    p.add_argument("--iters", type=int, default=defaults.iters, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    sidecar = train_frcnn(FrcnnTrainConfig(data=a.data, out=a.out, iters=a.iters, seed=a.seed), progress=not a.quiet)
    print(json.dumps(sidecar["val_metrics"]))


if __name__ == "__main__":
    main()
