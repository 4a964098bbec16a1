"""Training loop that makes the embedded default's checkpoint (a mini DETR on the synthetic dataset).

Two phases, both seeded and resumable from ``<out>.state.pt``:
1. backbone pre-training as a crop classifier that also regresses the object's box inside the crop (it teaches
   the trunk shapes, colours and position quickly; a DETR from scratch on 2 cores converges slowly);
2. DETR training with the official recipe scaled down: AdamW, backbone lr x0.1, gradient clipping 0.1, a linear
   warm-up and a x0.1 lr drop, the Hungarian set loss with aux losses.
The final checkpoint is written in the official format (``{"model": state_dict}``) with a JSON sidecar holding
the provenance: config, data spec and seed, iterations, wall time, git commit, val metrics and SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from tqdm import tqdm

from detrq.data.coco import CocoDetection, EvalTransform, TrainTransform
from detrq.data.loading import shuffled_batches
from detrq.evaluation.evaluate import evaluate
from detrq.io.errors import DetrqError
from detrq.io.paths import repo_relative
from detrq.io.results import environment, sha256_file, write_json_atomic
from detrq.models.criterion import build_criterion, weighted_loss
from detrq.models.detr import DETR, build_detr, build_trunk


@dataclass
class TrainConfig:
    """Every knob of a training run; stored in the state file and the sidecar."""

    data: str
    out: str
    preset: str = "mini"
    iters: int = 20000  # DETR iterations
    batch_size: int = 32
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    warmup_iters: int = 500
    lr_drop_at: float = 0.8  # fraction of ``iters`` after which the lr is multiplied by 0.1
    pretrain_iters: int = 2000  # backbone crop-classifier iterations (0 to skip)
    pretrain_batch_size: int = 64
    pretrain_lr: float = 1e-3
    crop_size: int = 64
    seed: int = 0
    eval_every: int = 2000
    save_every: int = 250
    max_eval_images: int | None = None
    threads: int = 1
    progress: bool = True


def _state_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out + ".state.pt")


def _save_state(cfg: TrainConfig, state: dict) -> None:
    path = _state_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _random_crops(images: list[Tensor], targets: list[dict], crop: int, g: torch.Generator
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One square crop around a random object per image: crops [B,3,crop,crop], labels [B], boxes [B,4] cxcywh
    relative to the crop. The crop is 1.2-2.5x the object's longer side, shifted so the object stays inside."""
    rois, labels, boxes = [], [], []
    for i, (im, t) in enumerate(zip(images, targets)):
        h, w = im.shape[-2:]
        k = int(torch.randint(len(t["labels"]), (1,), generator=g))
        cx, cy, bw, bh = (t["boxes"][k] * torch.tensor([w, h, w, h])).tolist()
        side = max(bw, bh, 8.0) * (1.2 + 1.3 * float(torch.rand((), generator=g)))
        slack_x, slack_y = (side - bw) / 2, (side - bh) / 2
        x0 = cx - side / 2 + slack_x * (2 * float(torch.rand((), generator=g)) - 1)
        y0 = cy - side / 2 + slack_y * (2 * float(torch.rand((), generator=g)) - 1)
        rois.append(torch.tensor([[i, x0, y0, x0 + side, y0 + side]]))
        labels.append(t["labels"][k])
        boxes.append(torch.tensor([(cx - x0) / side, (cy - y0) / side, bw / side, bh / side]))
    batch = torch.stack(images)
    crops = roi_align(batch, torch.cat(rois).float(), output_size=crop, spatial_scale=1.0, sampling_ratio=2,
                      aligned=True)
    return crops, torch.stack(labels), torch.stack(boxes)


def pretrain_backbone(model: DETR, train_set: CocoDetection, cfg: TrainConfig, start: int = 0,
                      trunk_state: dict | None = None, save=None) -> dict:
    """Phase 1: train a BatchNorm copy of the trunk as a crop classifier + box regressor, then fold it into
    the model's FrozenBatchNorm trunk. Returns the trunk's state dict."""
    mcfg = model.cfg
    trunk, channels = build_trunk(mcfg, norm_layer=nn.BatchNorm2d)
    cells = (cfg.crop_size // 16) ** 2
    head = nn.Linear(channels * cells, mcfg.num_classes + 1 + 4)
    net = nn.ModuleDict({"trunk": trunk, "head": head})
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.pretrain_lr, weight_decay=1e-4)
    if trunk_state is not None:
        net.load_state_dict(trunk_state["net"])
        opt.load_state_dict(trunk_state["opt"])
    net.train()
    g = torch.Generator().manual_seed(cfg.seed + 7)
    bar = tqdm(total=cfg.pretrain_iters, initial=start, desc="backbone pre-training", disable=not cfg.progress)
    for it, (images, targets) in shuffled_batches(train_set, cfg.pretrain_batch_size, cfg.seed + 1, start):
        if it >= cfg.pretrain_iters:
            break
        g.manual_seed(cfg.seed * 7919 + it)
        crops, labels, boxes = _random_crops(images, targets, cfg.crop_size, g)
        out = head(trunk(crops).flatten(1))
        loss_cls = F.cross_entropy(out[:, : mcfg.num_classes + 1], labels)
        loss_box = F.l1_loss(out[:, mcfg.num_classes + 1:].sigmoid(), boxes)
        loss = loss_cls + 5 * loss_box
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(cls=f"{loss_cls.item():.3f}", box=f"{loss_box.item():.3f}")
        if save is not None and (it + 1) % cfg.save_every == 0:
            save({"phase": "pretrain", "iteration": it + 1, "net": net.state_dict(), "opt": opt.state_dict()})
    bar.close()
    body_state = trunk.state_dict()
    model.backbone[0].body.load_state_dict(body_state, strict=True)
    return body_state


def _lr_factor(it: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (it + 1) / max(cfg.warmup_iters, 1))
    return warm * (0.1 if it >= cfg.lr_drop_at * cfg.iters else 1.0)


def _datasets(cfg: TrainConfig, model: DETR) -> tuple[CocoDetection, CocoDetection]:
    mc = model.cfg
    train_set = CocoDetection(cfg.data, "train", TrainTransform(mc.min_size, mc.max_size))
    val_set = CocoDetection(cfg.data, "val", EvalTransform(mc.min_size, mc.max_size), max_images=cfg.max_eval_images)
    return train_set, val_set


# Fields a resumed run may change: they do not alter the iterations already done.
_FREE_ON_RESUME = ("progress", "threads", "eval_every", "save_every", "max_eval_images")


def _check_resumable(cfg: TrainConfig, state: dict) -> None:
    """A run resumes only with the config it started with, except ``_FREE_ON_RESUME`` and ``iters``.

    ``iters`` may change (to shorten or extend a run) while the DETR phase has not reached the new lr drop, so
    that the schedule the finished run followed is exactly the one its config states.
    """
    old, new = state["config"], dataclasses.asdict(cfg)
    changed = [k for k in new if k not in _FREE_ON_RESUME and old.get(k) != new[k]]
    # Iterations 0..iteration-1 are done; the first one at the dropped lr is ceil(lr_drop_at * iters).
    first_dropped = cfg.lr_drop_at * min(old["iters"], new["iters"])
    past_drop = state["phase"] == "detr" and state["iteration"] > first_dropped
    if changed and (changed != ["iters"] or past_drop):
        raise DetrqError(f"{_state_path(cfg)} was written with a different config ({', '.join(changed)}); "
                         "resume with the original settings or delete it to start over")


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) both phases and write the checkpoint and its sidecar. Returns the sidecar dict."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = build_detr(cfg.preset)
    train_set, val_set = _datasets(cfg, model)
    criterion = build_criterion(model.cfg.num_classes, model.cfg.dec_layers)
    backbone_params = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    other_params = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    opt = torch.optim.AdamW([{"params": other_params, "lr": cfg.lr},
                             {"params": backbone_params, "lr": cfg.lr_backbone}], weight_decay=cfg.weight_decay)
    base_lrs = [cfg.lr, cfg.lr_backbone]
    history: list[dict] = []
    start, wall = 0, 0.0
    state = None
    if _state_path(cfg).is_file():
        state = torch.load(_state_path(cfg), map_location="cpu", weights_only=True)
        _check_resumable(cfg, state)
        wall = state["wall"]
    t0 = time.time() - wall

    def save(extra: dict) -> None:
        _save_state(cfg, {"config": dataclasses.asdict(cfg), "wall": time.time() - t0, "history": history, **extra})

    if cfg.pretrain_iters > 0 and (state is None or state["phase"] == "pretrain"):
        resume_at = state["iteration"] if state is not None else 0
        body = pretrain_backbone(model, train_set, cfg, resume_at, state, save)
        save({"phase": "detr", "iteration": 0, "model": model.state_dict(), "opt": opt.state_dict(),
              "pretrained_body": body})
        state = None
    elif state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        history = state["history"]
        start = state["iteration"]

    model.train()
    bar = tqdm(total=cfg.iters, initial=start, desc="DETR training", disable=not cfg.progress)
    for it, (images, targets) in shuffled_batches(train_set, cfg.batch_size, cfg.seed, start):
        if it >= cfg.iters:
            break
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * _lr_factor(it, cfg)
        loss_dict = criterion(model(images), targets)
        loss = weighted_loss(loss_dict, criterion.weight_dict)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{loss_dict['loss_ce'].item():.3f}")
        done = it + 1
        if done % cfg.eval_every == 0 or done == cfg.iters:
            metrics = evaluate(model, val_set, batch_size=32, progress=False)
            model.train()
            history.append({"iteration": done, "loss": loss.item(), "wall_s": round(time.time() - t0, 1),
                            **{k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}})
            tqdm.write(json.dumps(history[-1]))
        if done % cfg.save_every == 0 or done == cfg.iters:
            save({"phase": "detr", "iteration": done, "model": model.state_dict(), "opt": opt.state_dict()})
    bar.close()
    return finalize(cfg, model, val_set, history, time.time() - t0)


def finalize(cfg: TrainConfig, model: DETR, val_set: CocoDetection, history: list[dict], wall: float) -> dict:
    """Write the official-format checkpoint and its provenance sidecar, both atomically."""
    metrics = evaluate(model, val_set, batch_size=32, progress=False)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": model.state_dict()}, tmp)
    os.replace(tmp, out)
    info = json.loads((Path(cfg.data) / "annotations" / "instances_train.json").read_text()).get("info", {})
    sidecar = {
        "checkpoint": out.name,
        "sha256": sha256_file(out),
        "preset": cfg.preset,
        "model_config": dataclasses.asdict(model.cfg),
        "train_config": {**dataclasses.asdict(cfg), "data": repo_relative(cfg.data), "out": repo_relative(cfg.out)},
        "data": info,
        "iterations": cfg.iters,
        "wall_time_s": round(wall, 1),
        "val_metrics": {k: v for k, v in metrics.items() if k not in ("per_class", "detections")},
        "val_protocol": metrics.get("protocol"),
        "history": history,
        "environment": environment(),
    }
    write_json_atomic(out.with_suffix(".json"), sidecar)
    return sidecar
