"""Warm-up + cosine learning-rate schedule as a pure function of the step."""
from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, warmup_factor: float = 0.1,
                  min_factor: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear from `warmup_factor` to 1 over `warmup_steps`, then a half cosine from 1
    down to `min_factor` at `total_steps`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        alpha = step / warmup_steps
        return warmup_factor * (1 - alpha) + alpha
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_multiplier(step: int, total_steps: int, warmup_steps: float,
                        warmup_factor: float = 0.1, min_factor: float = 0.0,
                        steps_per_unit: int = 1) -> float:
    """The multiplier `WarmupCosineSchedule` (same arguments) applies at optimizer step
    `step`: `lr_multiplier` of the step's unit (the step itself, or its epoch)."""
    return lr_multiplier(step // steps_per_unit, total_steps, warmup_steps, warmup_factor,
                         min_factor)


class WarmupCosineSchedule:
    """Sets every param group's lr to `group["base_lr"] * lr_multiplier(unit)`, where
    unit = step // steps_per_unit: the step itself, or with `steps_per_unit` =
    steps per epoch the epoch of the step (IRRA's schedule, stepped once per epoch;
    `total_steps` and `warmup_steps` then count epochs).

    Its only state is the step, so a resumed run continues the same curve.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: float,
                 warmup_factor: float = 0.1, min_factor: float = 0.0,
                 steps_per_unit: int = 1) -> None:
        if steps_per_unit < 1:
            raise ValueError(f"steps_per_unit must be >= 1, got {steps_per_unit}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.min_factor = min_factor
        self.steps_per_unit = steps_per_unit
        self.step_count = 0
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self._apply()

    def multiplier(self) -> float:
        return schedule_multiplier(self.step_count, self.total_steps, self.warmup_steps,
                                   self.warmup_factor, self.min_factor, self.steps_per_unit)

    def _apply(self) -> None:
        factor = self.multiplier()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "steps_per_unit": self.steps_per_unit}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
