"""Optimizer with per-module learning-rate factors and no decay on biases/norms."""
from __future__ import annotations

import logging

import torch
from torch import nn

from utils.config import ConfigError

from .lr_scheduler import WarmupCosineSchedule

logger = logging.getLogger(__name__)

# Parameters that never get weight decay besides biases and norm weights.
NO_DECAY_NAMES = ("positional_embedding", "class_embedding", "token_embedding", "logit_scale",
                  "prompt", "mix_logit")


def param_groups(model: nn.Module, lr: float, weight_decay: float, lr_factor: float,
                 bias_lr_factor: float, backbone_prefix: str = "backbone.") -> list[dict]:
    """One group per (lr, weight decay) pair.

    Parameters outside `backbone_prefix` are new modules (head, gates, experts,
    classifiers) and get `lr * lr_factor`; biases get an extra `bias_lr_factor`.
    Biases, 1-d parameters (norms, scalars) and embeddings get no weight decay.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        factor = 1.0 if name.startswith(backbone_prefix) else lr_factor
        is_bias = name.endswith(".bias")
        if is_bias:
            factor *= bias_lr_factor
        no_decay = is_bias or param.ndim <= 1 or any(key in name for key in NO_DECAY_NAMES)
        key = (lr * factor, 0.0 if no_decay else weight_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": group_lr, "base_lr": group_lr, "weight_decay": wd}
            for (group_lr, wd), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                    lr_factor: float, bias_lr_factor: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, kernel: str = "auto") -> torch.optim.Optimizer:
    """AdamW/Adam over `param_groups`; `kernel` auto picks the fused kernel on CUDA.

    A fused optimizer is one kernel launch per step and can skip a step on the device
    (see processor.trainer); foreach leaves the choice to torch (its multi-tensor kernels
    on CUDA, per-tensor loops on the CPU).
    """
    groups = param_groups(model, lr, weight_decay, lr_factor, bias_lr_factor)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps)
    on_cuda = next(model.parameters()).is_cuda
    fused = kernel == "fused" or (kernel == "auto" and on_cuda)
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
                           betas=s.betas, eps=s.eps, kernel=s.optimizer_kernel)


def build_scheduler(optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, num_epoch: int,
                    warmup_epochs: float, warmup_factor: float,
                    min_lr_factor: float) -> WarmupCosineSchedule:
    return WarmupCosineSchedule(optimizer, total_steps=steps_per_epoch * num_epoch,
                                warmup_steps=int(round(steps_per_epoch * warmup_epochs)),
                                warmup_factor=warmup_factor, min_factor=min_lr_factor)
