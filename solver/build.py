"""Optimizer with per-parameter learning-rate factors and weight decay.

Two rule sets (solver.param_rules), both with optional per-module factors
(solver.module_lr_factors):

- "project": backbone parameters get the base lr, new modules (head, gates,
  experts, classifiers) lr * lr_factor, biases a further bias_lr_factor; biases,
  1-d parameters (norms, scalars) and embeddings get no weight decay.
- "irra": IRRA's `build_optimizer`, applied in its order to each parameter's
  name in IRRA's model (`model.irra.irra_name`; parameters IRRA does not have,
  e.g. the CoMoE head, under their own names): lr factor 1 and weight decay;
  "cross" in the name -> lr_factor; "bias" -> bias_lr_factor (replacing) and no
  decay; "classifier" or "mlm_head" -> lr_factor (replacing). So norms and
  embeddings are decayed, `in_proj_bias` counts as a bias, and a classifier bias
  gets lr_factor, not lr_factor * bias_lr_factor.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Iterable, Mapping

import torch
from torch import nn

from model.irra import irra_name
from utils.config import ConfigError

from .lr_scheduler import WarmupCosineSchedule

logger = logging.getLogger(__name__)

# Parameters that never get weight decay besides biases and norm weights (by name, so that
# whatever their shape): CLIP's embeddings and temperature, and the router's learned prompt
# and mixing weight (a = sigmoid(alpha)), which set the routing rule rather than map
# features. The router's gates are linear maps and are decayed.
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "token_embedding", "logit_scale",
                  "router.prompt", "router.alpha")


PARAM_RULES = ("project", "irra")


def _module_pattern(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that names parameter `name` or one of its modules."""
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*"):
            return pattern
    return None


def _project_rule(name: str, param: nn.Parameter, weight_decay: float, lr_factor: float,
                  bias_lr_factor: float, module_factor: float | None,
                  backbone_prefix: str) -> tuple[float, float]:
    factor = 1.0 if name.startswith(backbone_prefix) else lr_factor
    if module_factor is not None:
        factor = module_factor
    is_bias = name.endswith(".bias")
    if is_bias:
        factor *= bias_lr_factor
    no_decay = is_bias or param.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)
    return factor, 0.0 if no_decay else weight_decay


def _irra_rule(name: str, weight_decay: float, lr_factor: float, bias_lr_factor: float,
               module_factor: float | None) -> tuple[float, float]:
    name = irra_name(name) or name
    factor = 1.0 if module_factor is None else module_factor
    if "cross" in name:
        factor = lr_factor
    if "bias" in name:
        factor, weight_decay = bias_lr_factor, 0.0
    if "classifier" in name or "mlm_head" in name:
        factor = lr_factor
    return factor, weight_decay


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_factor: float,
                 bias_lr_factor: float, rules: str = "project",
                 module_lr_factors: Mapping[str, float] | None = None,
                 backbone_prefix: str = "backbone.") -> list[dict]:
    """One group per (lr, weight decay) pair, by `rules` ("project" or "irra", see the
    module docstring).

    `module_lr_factors` maps module-name patterns (fnmatch; ``*`` also spans dots) to
    lr factors. The first pattern that names a parameter's module replaces its module
    factor: under "project" the 1 or `lr_factor` (biases still get `bias_lr_factor`
    on top), under "irra" the starting 1, before IRRA's rules (so biases there get
    `bias_lr_factor`, as IRRA's rules give them). A pattern that names no trainable
    parameter is an error: a typo, a module this model does not have, or a pattern
    shadowed by earlier ones.
    """
    if rules not in PARAM_RULES:
        raise ValueError(f"param rules must be one of {', '.join(PARAM_RULES)}, got {rules!r}")
    module_lr_factors = dict(module_lr_factors or {})
    used: set[str] = set()
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        pattern = _module_pattern(name, module_lr_factors)
        module_factor = None if pattern is None else float(module_lr_factors[pattern])
        used.add(pattern)
        if rules == "irra":
            factor, wd = _irra_rule(name, weight_decay, lr_factor, bias_lr_factor, module_factor)
        else:
            factor, wd = _project_rule(name, param, weight_decay, lr_factor, bias_lr_factor,
                                       module_factor, backbone_prefix)
        groups.setdefault((lr * factor, wd), []).append(param)
    unused = [p for p in module_lr_factors if p not in used]
    if unused:
        raise ConfigError(f"solver.module_lr_factors: pattern(s) {', '.join(map(repr, unused))} "
                          f"apply to no trainable parameter of this model (a typo, a module it "
                          f"does not have, or shadowed by an earlier pattern; module names look "
                          f"like 'head.blocks.0.moe' or 'backbone.visual')")
    return [{"params": params, "lr": group_lr, "base_lr": group_lr, "weight_decay": wd}
            for (group_lr, wd), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                    lr_factor: float, bias_lr_factor: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, kernel: str = "auto", rules: str = "project",
                    module_lr_factors: Mapping[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW/Adam over `param_groups`; `kernel` auto picks the fused kernel on CUDA.

    A fused optimizer is one kernel launch per step and can skip a step on the device
    (see processor.trainer); foreach leaves the choice to torch (its multi-tensor kernels
    on CUDA, per-tensor loops on the CPU). Adam's weight decay is L2 added to the
    gradient, AdamW's is decoupled. With fp16 parameters (IRRA's fp16 weights) auto
    picks foreach: the fused kernel would compute their update in fp32, IRRA's is a
    sequence of fp16 operations.
    """
    groups = param_groups(model, lr, weight_decay, lr_factor, bias_lr_factor, rules,
                          module_lr_factors)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps)
    on_cuda = next(model.parameters()).is_cuda
    fp16 = any(p.dtype == torch.float16 for p in model.parameters())
    fused = kernel == "fused" or (kernel == "auto" and on_cuda and not fp16)
    if fused:
        kwargs["fused"] = True
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[name]
    try:
        return cls(groups, **kwargs)
    except RuntimeError as err:
        if not fused:
            raise
        raise ConfigError(f"solver.optimizer_kernel=fused is not available here ({err}); "
                         f"use solver.optimizer_kernel=foreach or auto") from err


def optimizer_from_config(model: nn.Module, solver_cfg) -> torch.optim.Optimizer:
    """`build_optimizer` with the settings of a config's `solver` section."""
    s = solver_cfg
    return build_optimizer(model, name=s.optimizer, lr=s.lr, weight_decay=s.weight_decay,
                           lr_factor=s.lr_factor, bias_lr_factor=s.bias_lr_factor,
                           betas=s.betas, eps=s.eps, kernel=s.optimizer_kernel,
                           rules=s.param_rules, module_lr_factors=s.module_lr_factors)


def schedule_curve(*, steps_per_epoch: int, num_epoch: int, warmup_epochs: float,
                   warmup_factor: float, min_lr_factor: float, per_epoch: bool = False) -> dict:
    """The arguments of `WarmupCosineSchedule` (and `schedule_multiplier`) for warm-up +
    cosine over the run's steps; with `per_epoch` the curve is IRRA's, over epochs, and
    every step of epoch e uses the multiplier of epoch e."""
    if per_epoch:
        return dict(total_steps=num_epoch, warmup_steps=warmup_epochs,
                    warmup_factor=warmup_factor, min_factor=min_lr_factor,
                    steps_per_unit=steps_per_epoch)
    return dict(total_steps=steps_per_epoch * num_epoch,
                warmup_steps=int(round(steps_per_epoch * warmup_epochs)),
                warmup_factor=warmup_factor, min_factor=min_lr_factor)


def schedule_from_config(solver_cfg, steps_per_epoch: int, num_epoch: int | None = None) -> dict:
    """`schedule_curve` with the settings of a config's `solver` section (`num_epoch`:
    another run length than solver.num_epoch)."""
    s = solver_cfg
    return schedule_curve(steps_per_epoch=steps_per_epoch,
                          num_epoch=s.num_epoch if num_epoch is None else num_epoch,
                          warmup_epochs=s.warmup_epochs, warmup_factor=s.warmup_factor,
                          min_lr_factor=s.min_lr_factor, per_epoch=s.lr_update == "epoch")


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, num_epoch: int,
                    warmup_epochs: float, warmup_factor: float, min_lr_factor: float,
                    per_epoch: bool = False) -> WarmupCosineSchedule:
    """A `WarmupCosineSchedule` of `optimizer` over the `schedule_curve` of these arguments."""
    return WarmupCosineSchedule(optimizer, **schedule_curve(
        steps_per_epoch=steps_per_epoch, num_epoch=num_epoch, warmup_epochs=warmup_epochs,
        warmup_factor=warmup_factor, min_lr_factor=min_lr_factor, per_epoch=per_epoch))
