"""Training: a smoke run lowers the loss, an interrupted run resumes to the same weights, the sidecar is right."""

import json

import pytest
import torch

import detrq.training.train as train_mod
from detrq.data.coco import CocoDetection, EvalTransform, collate
from detrq.data.synthetic import make_dataset
from detrq.io.results import sha256_file
from detrq.models.criterion import build_criterion, weighted_loss
from detrq.models.detr import build_detr, load_checkpoint
from detrq.training.train import TrainConfig, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    make_dataset(root, 16, 4, seed=5, progress=False)
    return root


def config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), preset="tiny", iters=8, batch_size=4, lr=1e-3, lr_backbone=1e-4,
                warmup_iters=2, pretrain_iters=4, pretrain_batch_size=8, save_every=2, eval_every=100,
                progress=False)
    return TrainConfig(**{**base, **kw})


def mean_loss(model, data) -> float:
    ds = CocoDetection(data, "train", EvalTransform(64, 64))
    crit = build_criterion(model.cfg.num_classes, model.cfg.dec_layers)
    images, targets = collate([ds[i] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        return weighted_loss(crit(model(images), targets), crit.weight_dict).item()


def test_smoke_run_lowers_the_loss_and_writes_a_sidecar(data, tmp_path):
    torch.manual_seed(0)
    before = mean_loss(build_detr("tiny"), data)  # train() builds its model after the same seed
    cfg = config(data, tmp_path / "m.pth", iters=30, pretrain_iters=0)
    sidecar = train(cfg)
    model = load_checkpoint(build_detr("tiny"), tmp_path / "m.pth")
    assert mean_loss(model, data) < before
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk == json.loads(json.dumps(sidecar))
    assert on_disk["sha256"] == sha256_file(tmp_path / "m.pth")
    assert on_disk["iterations"] == 30 and on_disk["data"]["seed"] == 5
    assert {"AP", "AP50"} <= set(on_disk["val_metrics"])


def test_interrupted_run_resumes_to_identical_weights(data, tmp_path, monkeypatch):
    train(config(data, tmp_path / "straight.pth"))
    straight = torch.load(tmp_path / "straight.pth", weights_only=True)["model"]

    calls = {"n": 0}
    real_clip = torch.nn.utils.clip_grad_norm_

    def interrupt_at_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupt_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, tmp_path / "resumed.pth"))
    assert not (tmp_path / "resumed.pth").exists()
    state = torch.load(tmp_path / "resumed.pth.state.pt", weights_only=True)
    assert state["phase"] == "detr" and state["iteration"] == 4
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    train(config(data, tmp_path / "resumed.pth"))
    resumed = torch.load(tmp_path / "resumed.pth", weights_only=True)["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_refuses_a_changed_config_but_may_change_iters_before_the_lr_drop(data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "finalize", lambda *a, **k: None)
    train(config(data, tmp_path / "a.pth", iters=4, pretrain_iters=0))  # state at 4, lr dropped from 3.2 on
    with pytest.raises(train_mod.DetrqError, match=r"different config \(lr\)"):
        train(config(data, tmp_path / "a.pth", iters=4, pretrain_iters=0, lr=5e-4))
    with pytest.raises(train_mod.DetrqError, match=r"different config \(iters\)"):
        train(config(data, tmp_path / "a.pth", iters=6, pretrain_iters=0))
    train(config(data, tmp_path / "b.pth", iters=4, pretrain_iters=0, lr_drop_at=1.0))  # no drop yet
    train(config(data, tmp_path / "b.pth", iters=6, pretrain_iters=0, lr_drop_at=1.0, eval_every=3))
    assert torch.load(tmp_path / "b.pth.state.pt", weights_only=True)["iteration"] == 6
