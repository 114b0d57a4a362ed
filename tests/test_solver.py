import math

import pytest
import torch
from torch import nn

from solver import build_optimizer, build_scheduler, lr_multiplier, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def test_param_groups_factors_and_decay():
    model = Toy()
    groups = param_groups(model, lr=1.0, weight_decay=0.1, lr_factor=5.0, bias_lr_factor=2.0)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_param[id(model.backbone[0].weight)] == (1.0, 0.1)
    assert by_param[id(model.backbone[0].bias)] == (2.0, 0.0)
    assert by_param[id(model.backbone[1].weight)] == (1.0, 0.0)   # norm: no decay
    assert by_param[id(model.head.weight)] == (5.0, 0.1)
    assert by_param[id(model.head.bias)] == (10.0, 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out():
    model = Toy()
    model.backbone.requires_grad_(False)
    groups = param_groups(model, 1.0, 0.1, 5.0, 2.0)
    assert sum(len(g["params"]) for g in groups) == 2


def test_lr_multiplier_shape():
    assert lr_multiplier(0, 100, 10, warmup_factor=0.1) == pytest.approx(0.1)
    assert lr_multiplier(5, 100, 10, warmup_factor=0.1) == pytest.approx(0.55)
    assert lr_multiplier(10, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, 10) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, 10, min_factor=0.01) == pytest.approx(0.01)
    values = [lr_multiplier(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_resume_continues_the_same_curve():
    model = Toy()
    opt = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.0, lr_factor=1.0,
                          bias_lr_factor=1.0)
    sched = build_scheduler(opt, steps_per_epoch=10, num_epoch=5, warmup_epochs=1,
                            warmup_factor=0.1, min_lr_factor=0.0)
    for _ in range(17):
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(Toy(), name="adamw", lr=1e-3, weight_decay=0.0, lr_factor=1.0,
                           bias_lr_factor=1.0)
    sched2 = build_scheduler(opt2, steps_per_epoch=10, num_epoch=5, warmup_epochs=1,
                             warmup_factor=0.1, min_lr_factor=0.0)
    sched2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 40))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_optimizer_kernel_choice_and_a_clear_error_when_fused_is_missing(monkeypatch):
    from utils.config import ConfigError
    model = nn.Linear(4, 2)
    args = dict(name="adamw", lr=1e-3, weight_decay=0.0, lr_factor=1.0, bias_lr_factor=1.0)
    fused = build_optimizer(model, kernel="fused", **args)
    assert fused.defaults["fused"] and getattr(fused, "_step_supports_amp_scaling", False)
    assert not build_optimizer(model, kernel="auto", **args).defaults["fused"]  # CPU params
    assert not build_optimizer(model, kernel="foreach", **args).defaults["fused"]

    original = torch.optim.AdamW

    def old_torch(*a, fused=None, **k):  # what torch < 2.4 says for CPU parameters
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")
        return original(*a, **k)
    monkeypatch.setattr(torch.optim, "AdamW", old_torch)
    with pytest.raises(ConfigError, match="solver.optimizer_kernel=fused is not available"):
        build_optimizer(model, kernel="fused", **args)


def test_no_decay_names_name_parameters_of_the_model_and_the_router_groups():
    """Each name in NO_DECAY_NAMES is a parameter of today's model (none left behind by a
    rename); the router's prompt and mixing weight get no decay, its gates do."""
    from conftest import ROOT, TINY_MODEL
    from model import build_model
    from solver.build import NO_DECAY_NAMES
    from utils.config import load_config
    model = build_model(load_config(ROOT / "configs" / "demo.yaml", TINY_MODEL))
    names = [name for name, _ in model.named_parameters()]
    for key in NO_DECAY_NAMES:
        assert any(key in name for name in names), key
    groups = param_groups(model, lr=1.0, weight_decay=0.1, lr_factor=5.0, bias_lr_factor=2.0)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    router = dict(model.head.blocks[0].moe.router.named_parameters())
    assert {"alpha", "prompt", "gates.0.weight", "gates.1.weight", "aux_gate.weight"} <= set(router)
    for name, param in router.items():
        assert decay[id(param)] == (0.1 if "gate" in name and name.endswith("weight") else 0.0), name
