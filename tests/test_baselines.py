"""Baseline configurations: IRRA losses, CMPM, CoMoE + IRRA, frozen backbone."""
from __future__ import annotations

import json

import pytest
import torch

import train as train_script
from conftest import ROOT, tiny_overrides
from model import build_model
from utils.config import load_config


def _tiny_cfg(*extra: str):
    from conftest import TINY_MODEL
    return load_config(ROOT / "configs" / "demo.yaml", TINY_MODEL + list(extra))


def _batch(cfg, n: int = 4):
    torch.manual_seed(0)
    h, w = cfg.input.size
    ids = torch.zeros(n, cfg.dataset.text_length, dtype=torch.long)
    for i in range(n):
        length = 5 + i
        ids[i, 0] = 49406
        ids[i, 1:length] = torch.randint(1, 40000, (length - 1,))
        ids[i, length] = 49407
    return {"images": torch.randn(n, 3, h, w), "caption_ids": ids,
            "pids": torch.tensor([0, 0, 1, 2][:n])}


def test_frozen_backbone_changes_only_the_head():
    cfg = _tiny_cfg("model.freeze_backbone=true", "loss.names=sdm+itc+coar+id")
    model = build_model(cfg, num_classes=3)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(p.requires_grad for p in model.backbone.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    sum(model(_batch(cfg)).values()).backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert changed, "no head weight changed after an optimizer step"


def test_irra_losses_reach_every_trainable_parameter():
    cfg = _tiny_cfg("model.head=none", "model.embed=global", "loss.names=sdm+mlm+id",
                    "model.cmt_depth=1")
    model = build_model(cfg, num_classes=3)
    losses = model(_batch(cfg))
    assert set(losses) == {"sdm", "mlm", "id"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("config, extra, terms", [
    ("irra.yaml", [], {"sdm", "mlm", "id"}),
    ("comoe_irra.yaml", [], {"sdm", "itc", "coar", "mlm", "id"}),
    ("clip.yaml", ["loss.names=cmpm+id"], {"cmpm", "id"}),
])
def test_baseline_configs_train_end_to_end(synth_root, tmp_path, config, extra, terms):
    path = ROOT / "configs" / "CUHK-PEDES" / config
    overrides = tiny_overrides(synth_root, tmp_path, "b") + [
        "solver.num_epoch=1", "model.cmt_depth=1", "dataset.generate=false"] + extra
    result = train_script.main(["--config_file", str(path), *overrides])
    assert 0 <= result["t2i"]["R1"] <= 100
    log = (tmp_path / "CUHK-PEDES" / "b" / "train.log").read_text()
    for term in terms:
        assert f"{term}=" in log
    saved = json.loads((tmp_path / "CUHK-PEDES" / "b" / "test_metrics.json").read_text())
    assert saved["t2i"] == result["t2i"]


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = {}
    for flag in ("false", "true"):
        cfg = _tiny_cfg(f"model.grad_checkpointing={flag}", "moe.expert_dropout=0")
        torch.manual_seed(0)
        model = build_model(cfg)
        sum(model(_batch(cfg)).values()).backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert model.backbone.transformer.grad_checkpointing
    assert grads["true"].keys() == grads["false"].keys()
    for name, grad in grads["false"].items():
        torch.testing.assert_close(grads["true"][name], grad, rtol=1e-5, atol=1e-6)


def test_training_accuracies_come_apart_from_the_loss_terms():
    cfg = _tiny_cfg("model.head=none", "model.embed=global", "loss.names=sdm+mlm+id",
                    "model.cmt_depth=1")
    model = build_model(cfg, num_classes=3)
    batch = _batch(cfg)
    with torch.no_grad():  # identities the classifier gets right for 3 of the 4 images
        predicted = model.classifier(model.encode_image(batch["images"])).argmax(-1)
    batch["pids"] = torch.cat([predicted[:3], (predicted[3:] + 1) % 3])
    losses, metrics = model(batch, return_metrics=True)
    assert set(losses) == set(model(batch)) == {"sdm", "mlm", "id"}  # no accuracy among them
    assert set(metrics) == {"img_acc", "txt_acc", "mlm_acc"}
    assert metrics["img_acc"].item() == pytest.approx(0.75)
    assert all(not v.requires_grad and 0 <= v.item() <= 1 for v in metrics.values())
