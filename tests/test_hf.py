"""Hugging Face DETR checkpoints: names, the round trip official -> HF -> official, one-line errors, and agreement with
transformers' own DetrForObjectDetection (a second implementation that no one here wrote), both backbone variants."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from detrq.cli import main
from detrq.io.errors import DetrqError
from detrq.io.paths import PROJECT_ROOT
from detrq.models.detr import DETR, DetrConfig, pad_images
from detrq.models.hf import check_labels, config_from_hf, from_hf, read_hf, to_hf, write_hf
from detrq.models.loading import load_model, open_checkpoint

MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "detr_r50_state_dict_manifest.json"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
torch.set_num_threads(1)

# A small DETR with an official trunk (ResNet-18: transformers builds it as timm's or as its own ResNet).
SMALL = DetrConfig(backbone="resnet18", num_classes=5, hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2,
                   dim_feedforward=64, num_queries=6, min_size=96, max_size=128)
IMAGES = [(96, 128), (80, 112)]  # two sizes: the batch pads the second


def randomize(state: dict[str, torch.Tensor], seed: int) -> None:
    """Weights of O(1) effect in place (the libraries' inits are tiny: attention would be uniform, and a swapped
    q/k projection invisible): fan-in scaled weights, frozen BN with spread statistics, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in state.items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim >= 2:
                t.copy_(torch.randn(t.shape, generator=g) / (t[0].numel() ** 0.5))
            elif name.endswith("weight"):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def images(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in IMAGES]


def small_model(seed: int = 0) -> DETR:
    model = DETR(SMALL).eval()
    randomize(model.state_dict(), seed)
    return model


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


# --- without transformers -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not MANIFEST.is_file(), reason="needs ../shared/detr_r50_state_dict_manifest.json")
@pytest.mark.parametrize("variant", ["timm", "no_timm"])
def test_r50_names_map_one_to_one_and_back(variant):
    entries = json.loads(MANIFEST.read_text())["entries"]
    g = torch.Generator().manual_seed(0)
    sd = {e["name"]: torch.randn(e["shape"], generator=g) for e in entries}
    hf = to_hf(sd, variant)
    assert len(hf) == 530  # the hub's R50 checkpoints hold 530 tensors (FIELD_NOTES)
    back = from_hf(hf, DetrConfig(backbone="resnet50", num_classes=91), variant, "test")
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("variant", ["timm", "no_timm"])
def test_official_to_hf_to_official_is_bit_identical(tmp_path, capsys, variant):
    model = small_model()
    torch.save({"model": model.state_dict()}, tmp_path / "small.pth")
    labels = {i: f"class{i}" for i in range(SMALL.num_classes)}
    torch.save({"model": model.state_dict(), "detrq_config": asdict(SMALL), "id2label": labels},
               tmp_path / "small_cfg.pth")
    code, err = cli(capsys, "convert", "--checkpoint", str(tmp_path / "small_cfg.pth"), "--to-hf",
                    str(tmp_path / "hf"), "--backbone", variant)
    assert code == 0, err
    code, err = cli(capsys, "convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.pth"))
    assert code == 0, err
    back = open_checkpoint(tmp_path / "back.pth")
    own = model.state_dict()
    assert list(back.state_dict) == list(own) and all(torch.equal(back.state_dict[k], own[k]) for k in own)
    assert back.config == SMALL and back.id2label == labels and back.variant == variant
    # A second conversion of the same directory writes the same bytes (so its SHA-256, a cache key, is stable).
    code, _ = cli(capsys, "convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "again.pth"))
    assert code == 0 and (tmp_path / "again.pth").read_bytes() == (tmp_path / "back.pth").read_bytes()
    # --checkpoint takes the directory itself, with the same weights and the same outputs.
    loaded, _ = load_model("mini", tmp_path / "hf")  # the directory's own architecture wins over the preset
    x = images()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def _hf_dir(tmp_path: Path, variant: str = "no_timm") -> Path:
    return write_hf(tmp_path / f"hf_{variant}", small_model().state_dict(), SMALL, variant,
                    {i: f"class{i}" for i in range(SMALL.num_classes)})


def test_bad_directories_give_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "x.pth")
    (tmp_path / "empty").mkdir()
    assert_one_line(*cli(capsys, "convert", "--from-hf", str(tmp_path / "empty"), "--out", out), "no config.json")

    src = _hf_dir(tmp_path)
    raw = json.loads((src / "config.json").read_text())

    def variant_dir(name: str, config: dict | None = None, tensors: dict | None = None) -> str:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config if config is not None else raw))
        from safetensors.torch import load_file, save_file

        save_file(tensors if tensors is not None else load_file(src / "model.safetensors"), d / "model.safetensors")
        return str(d)

    deformable = {**raw, "model_type": "deformable_detr", "architectures": ["DeformableDetrForObjectDetection"]}
    assert_one_line(*cli(capsys, "convert", "--from-hf", variant_dir("deformable", deformable), "--out", out),
                    "DeformableDetrForObjectDetection checkpoint, not DETR")
    from safetensors.torch import load_file

    tensors = load_file(src / "model.safetensors")
    fewer = {k: v for k, v in tensors.items() if k != "model.input_projection.bias"}
    assert_one_line(*cli(capsys, "convert", "--from-hf", variant_dir("missing", tensors=fewer), "--out", out),
                    "missing tensor 'model.input_projection.bias'")
    more = {**tensors, "model.extra.weight": torch.zeros(2)}
    assert_one_line(*cli(capsys, "convert", "--from-hf", variant_dir("extra", tensors=more), "--out", out),
                    "unexpected tensor 'model.extra.weight'")
    wider = {**tensors, "model.query_position_embeddings.weight": torch.zeros(6, 48)}
    assert_one_line(*cli(capsys, "convert", "--from-hf", variant_dir("shape", tensors=wider), "--out", out),
                    "shape mismatch at 'model.query_position_embeddings.weight'")
    more_labels = {**raw, "id2label": {str(i): f"c{i}" for i in range(9)}}
    assert_one_line(*cli(capsys, "convert", "--from-hf", variant_dir("labels", more_labels), "--out", out),
                    "label mismatch")
    gap = {**raw, "id2label": {"0": "a", "2": "b"}}
    assert_one_line(*cli(capsys, "convert", "--from-hf", variant_dir("gap", gap), "--out", out), "id2label ids")
    assert not Path(out).exists()  # no failed conversion wrote anything
    # --checkpoint with a directory gets the same one line.
    assert_one_line(*cli(capsys, "evaluate", "--checkpoint", str(tmp_path / "empty"), "--coco", str(tmp_path)),
                    "no config.json")


def test_bad_directory_is_one_line_from_a_fresh_process(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "detrq", "convert", "--from-hf", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "x.pth")], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no config.json" in proc.stderr, proc.stderr


def test_an_earlier_hf_directory_survives_a_failed_write(tmp_path):
    src = _hf_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(DetrqError, match="no Hugging Face form"):
        write_hf(src, DETR(DetrConfig(backbone="narrow", num_classes=3)).state_dict(),
                 DetrConfig(backbone="narrow", num_classes=3), "timm", {0: "a", 1: "b", 2: "c"})
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_labels_follow_id2label_and_a_mismatch_is_named():
    labels = {0: "N/A", 1: "person", 2: "bicycle"}
    check_labels(labels, [{"id": 1, "name": "person"}, {"id": 2, "name": "Bicycle"}], "ann.json")
    check_labels({0: "LABEL_0", 1: "LABEL_1"}, [{"id": 1, "name": "anything"}], "ann.json")  # placeholders
    with pytest.raises(DetrqError, match="category 1 is 'bicycle' in ann.json but 'person'.*calls class 2"):
        check_labels(labels, [{"id": 1, "name": "bicycle"}], "ann.json")
    with pytest.raises(DetrqError, match="category id 7"):
        check_labels(labels, [{"id": 7, "name": "dog"}], "ann.json")


def test_hub_configs_of_both_eras_and_variants():
    """config.json as the hub holds it (transformers 4 era, flat keys) and as transformers 5 writes it (nested)."""
    coco = {str(i): ("N/A" if i in (0, 12) else f"c{i}") for i in range(91)}
    v4 = {"architectures": ["DetrForObjectDetection"], "model_type": "detr", "backbone": "resnet50",
          "use_timm_backbone": True, "dilation": False, "d_model": 256, "id2label": coco}
    config, variant, labels = config_from_hf(v4, "v4")
    assert (config.backbone, variant, config.num_classes, labels[12]) == ("resnet50", "timm", 91, "N/A")
    assert config == DetrConfig(backbone="resnet50", num_classes=91)  # the official DETR-R50
    assert config_from_hf({**v4, "backbone": "resnet101", "dilation": True}, "dc5")[0].dilation
    no_timm = {**v4, "use_timm_backbone": False, "backbone": None,
               "backbone_config": {"model_type": "resnet", "layer_type": "bottleneck", "depths": [3, 4, 6, 3],
                                   "hidden_sizes": [256, 512, 1024, 2048], "out_features": ["stage4"]}}
    assert config_from_hf(no_timm, "no_timm")[:2] == (config, "no_timm")
    v5 = {**v4, "backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50", "out_indices": [1, 2, 3, 4],
                                    "output_stride": 16}}
    assert config_from_hf(v5, "v5")[0].dilation
    with pytest.raises(DetrqError, match="none of the torchvision trunks"):
        config_from_hf({**no_timm, "backbone_config": {**no_timm["backbone_config"], "depths": [1, 1, 1, 1]}}, "x")
    with pytest.raises(DetrqError, match="'resnet50d' is not supported"):
        config_from_hf({**v4, "backbone": "resnet50d"}, "x")
    with pytest.raises(DetrqError, match="position_embedding_type"):
        config_from_hf({**v4, "position_embedding_type": "learned"}, "x")


def test_hf_directory_reads_back_its_size_policy(tmp_path):
    hf = read_hf(_hf_dir(tmp_path, "timm"))
    assert (hf.config.min_size, hf.config.max_size) == (SMALL.min_size, SMALL.max_size) and hf.variant == "timm"


# --- against transformers' DetrForObjectDetection --------------------------------------------------------------------

def _transformers():
    return pytest.importorskip("transformers",
                               reason="transformers is a test dependency: pip install transformers timm")


def _hf_config(variant: str, backbone: str = "resnet18", **small):
    transformers = _transformers()
    if variant == "timm":
        pytest.importorskip("timm", reason="the timm backbone variant needs timm")
        return transformers.DetrConfig(use_timm_backbone=True, backbone=backbone, use_pretrained_backbone=False,
                                       **small)
    layer_type, depths, hidden = {"resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
                                  "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048])}[backbone]
    resnet = transformers.ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=hidden,
                                       out_features=["stage4"])
    return transformers.DetrConfig(use_timm_backbone=False, backbone_config=resnet, use_pretrained_backbone=False,
                                   **small)


SMALL_HF = dict(num_labels=5, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6)


def assert_agree(ours: DETR, theirs, x: list[torch.Tensor]) -> tuple[float, float]:
    """Our outputs against transformers' on each image alone and on the two as one padded batch (pixel_mask: 1 on
    valid pixels, the official mask's complement); returns the largest logit and box differences."""
    worst = [0.0, 0.0]
    with torch.no_grad():
        for batch in ([x[0]], [x[1]], x):
            pixels, mask = pad_images(batch)
            a = ours(batch)
            b = theirs(pixel_values=pixels, pixel_mask=(~mask).long())
            worst[0] = max(worst[0], (a["pred_logits"] - b.logits).abs().max().item())
            worst[1] = max(worst[1], (a["pred_boxes"] - b.pred_boxes).abs().max().item())
    assert worst[0] <= 5e-4 and worst[1] <= 1e-4, worst
    return worst[0], worst[1]


@pytest.mark.parametrize("variant", ["timm", "no_timm"])
def test_hf_model_converts_and_agrees(tmp_path, capsys, variant):
    DetrForObjectDetection = _transformers().DetrForObjectDetection

    theirs = DetrForObjectDetection(_hf_config(variant, **SMALL_HF)).eval()
    randomize(theirs.state_dict(), 1)
    theirs.save_pretrained(tmp_path / "hf")
    code, err = cli(capsys, "convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "detr.pth"))
    assert code == 0, err
    ours, _ = load_model("r50", tmp_path / "detr.pth")  # its stored architecture wins over the preset
    assert ours.cfg.backbone == "resnet18" and ours.cfg.num_classes == 5
    logits, boxes = assert_agree(ours, theirs, images())
    print(f"{variant}: max |logit diff| {logits:.2e}, max |box diff| {boxes:.2e}")
    # A state dict saved from the live model (transformers 5's in-memory names) reads the same.
    from safetensors.torch import save_file

    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "live" / "model.safetensors")
    live = read_hf(tmp_path / "live").state_dict
    assert all(torch.equal(live[k], v) for k, v in ours.state_dict().items())


def test_dc5_timm_model_converts_and_agrees(tmp_path):
    """DETR-DC5 (layer4 dilated, timm's output_stride 16): torchvision's dilation, as the official DC5 models."""
    DetrForObjectDetection = _transformers().DetrForObjectDetection

    theirs = DetrForObjectDetection(_hf_config("timm", "resnet50", dilation=True, **SMALL_HF)).eval()
    randomize(theirs.state_dict(), 4)
    theirs.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(None, tmp_path / "hf")
    assert ours.cfg.dilation and ours.cfg.backbone == "resnet50"
    assert_agree(ours, theirs, images(3))


@pytest.mark.parametrize("variant", ["timm", "no_timm"])
def test_to_hf_loads_in_transformers_and_agrees(tmp_path, capsys, variant):
    DetrForObjectDetection = _transformers().DetrForObjectDetection

    model = small_model(2)
    torch.save({"model": model.state_dict(), "detrq_config": asdict(SMALL)}, tmp_path / "small.pth")
    code, err = cli(capsys, "convert", "--checkpoint", str(tmp_path / "small.pth"), "--to-hf", str(tmp_path / "hf"),
                    "--backbone", variant)
    assert code == 0, err
    _hf_config(variant)  # skips without transformers (and timm for its variant)
    theirs, info = DetrForObjectDetection.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_agree(model, theirs.eval(), images(1))


@pytest.mark.skipif(not MANIFEST.is_file(), reason="needs ../shared/detr_r50_state_dict_manifest.json")
@pytest.mark.parametrize("variant", ["timm", "no_timm"])
def test_r50_layout_equals_what_transformers_writes(tmp_path, variant):
    """The hub's DETR-R50 layout: transformers' own R50 (random, both variants) saved to disk holds exactly the
    names and shapes that the official manifest maps to; converted, its outputs agree with ours."""
    from safetensors import safe_open
    DetrForObjectDetection = _transformers().DetrForObjectDetection

    theirs = DetrForObjectDetection(_hf_config(variant, "resnet50", num_labels=91)).eval()
    randomize(theirs.state_dict(), 3)
    theirs.save_pretrained(tmp_path / "hf")
    entries = json.loads(MANIFEST.read_text())["entries"]
    mapped = {k: tuple(v.shape) for k, v in to_hf({e["name"]: torch.empty(e["shape"]) for e in entries},
                                                  variant).items()}
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == mapped
    ours, _ = load_model("r50", tmp_path / "hf")
    assert [k for k in ours.state_dict()] == [e["name"] for e in entries]
    logits, boxes = assert_agree(ours, theirs, images(2))
    print(f"R50 {variant}: max |logit diff| {logits:.2e}, max |box diff| {boxes:.2e}")
