"""The leak audit: embeddings that depend on their batch neighbours fail the
evaluation; the real heads pass; test.py records the audit in test_metrics.json."""
from __future__ import annotations

import json

import pytest
import torch

import model.build
import test as test_script
from conftest import ROOT, TINY_MODEL, tiny_overrides
from datasets import build_dataset, build_eval_loaders
from model.comoe import CoMoEHead
from processor.evaluator import LeakAuditError, audit_tolerance, evaluate
from utils.checkpoint import atomic_save
from utils.config import ConfigError, load_config, save_config, to_plain

CPU = torch.device("cpu")


class BatchMeanLeakHead(CoMoEHead):
    """A CoMoE head that leaks: every token also gets the batch's mean output, the kind
    of mixing that a batch-axis attention layer causes."""

    def forward(self, tokens, valid, modality, global_pos=None):
        out, stats = super().forward(tokens, valid, modality, global_pos)
        return out + out.mean(dim=0, keepdim=True), stats


def _model(overrides: list[str]):
    torch.manual_seed(0)
    net = model.build.build_model(load_config(None, TINY_MODEL + overrides)).eval()
    if net.head is not None:  # a fresh head is the identity; make it do something
        with torch.no_grad():
            for p in net.head.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net


def _test_loaders(synth_root, batch_size: int = 8):
    split = build_dataset("CUHK-PEDES", synth_root).test
    return build_eval_loaders(split, image_size=(32, 16), batch_size=batch_size, text_length=24)


@pytest.mark.parametrize("overrides", [[], ["moe.aux_input=context"],
                                       ["model.head=none", "model.embed=global",
                                        "loss.names=sdm+itc"]])
def test_real_heads_pass_the_audit(synth_root, overrides):
    result = evaluate(_model(overrides), *_test_loaders(synth_root), CPU, audit_samples=4)
    audit = result["audit"]
    assert audit["passed"] and audit["arithmetic"] == "fp32" and audit["tolerance"] == 1e-4
    assert audit["samples"] == {"text": 4, "image": 4}
    assert max(audit["max_diff"].values()) <= 1e-5, audit


def test_a_head_that_adds_the_batch_mean_fails_the_audit(synth_root, monkeypatch):
    monkeypatch.setattr(model.build, "CoMoEHead", BatchMeanLeakHead)
    leaky = _model([])
    with pytest.raises(LeakAuditError, match="embeddings depend on other samples in the batch"):
        evaluate(leaky, *_test_loaders(synth_root), CPU, audit_samples=4)
    # The measured difference is far above any rounding (the result of a lax tolerance).
    result = evaluate(leaky, *_test_loaders(synth_root), CPU, audit_samples=4, audit_tolerance=1.0)
    assert min(result["audit"]["max_diff"].values()) > 1e-2, result["audit"]
    # Without the audit (validation during training) nothing is checked.
    assert "audit" not in evaluate(leaky, *_test_loaders(synth_root), CPU)


def test_audit_tolerance_follows_the_arithmetic():
    net = torch.nn.Linear(2, 2)
    assert audit_tolerance(net, "fp32", CPU) == ("fp32", 1e-4)
    assert audit_tolerance(net, "bf16", CPU) == ("bf16", 1e-2)
    assert audit_tolerance(net, "fp16", CPU) == ("fp16", 2e-3)
    # fp16 weights (IRRA's legacy training) round like fp16 even under "fp32".
    assert audit_tolerance(net.half(), "fp32", CPU) == ("fp16 weights", 2e-3)
    for bad in ("eval.audit_samples=0", "eval.audit_tolerance=-1e-3"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])


def _run_folder(synth_root, tmp_path) -> str:
    """A run folder with a saved config and an untrained best.pth."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(synth_root, tmp_path))
    run = tmp_path / "CUHK-PEDES" / cfg.name
    run.mkdir(parents=True)
    save_config(cfg, run / "configs.yaml")
    torch.manual_seed(0)
    net = model.build.build_model(cfg)
    atomic_save({"model": net.state_dict(), "config": to_plain(cfg), "epoch": 0}, run / "best.pth")
    return str(run / "configs.yaml")


def test_test_py_always_records_an_audit_and_fails_loudly_on_a_leak(synth_root, tmp_path,
                                                                    monkeypatch):
    config_file = _run_folder(synth_root, tmp_path)
    metrics = tmp_path / "CUHK-PEDES" / "tiny" / "test_metrics.json"
    test_split = build_dataset("CUHK-PEDES", synth_root).test  # 12 captions, 6 images
    quick = test_script.main(["--config_file", config_file])
    assert quick["audit"]["passed"]
    assert quick["audit"]["samples"] == {"text": min(16, len(test_split.captions)),
                                         "image": min(16, len(test_split.image_paths))}
    assert json.loads(metrics.read_text())["audit"] == quick["audit"]
    # eval.audit=true never audits fewer than the quick audit.
    chosen = test_script.main(["--config_file", config_file, "eval.audit=true",
                               "eval.audit_samples=5"])
    assert chosen["audit"]["passed"] and chosen["audit"]["samples"] == quick["audit"]["samples"]
    metrics.unlink()
    monkeypatch.setattr(model.build, "CoMoEHead", BatchMeanLeakHead)  # same weights, leaky
    with pytest.raises(LeakAuditError, match="embeddings depend on other samples in the batch"):
        test_script.main(["--config_file", config_file])
    assert not metrics.exists()
