from .build import build_optimizer, build_scheduler, optimizer_from_config, param_groups
from .lr_scheduler import WarmupCosineSchedule, lr_multiplier

__all__ = ["build_optimizer", "build_scheduler", "optimizer_from_config", "param_groups",
           "WarmupCosineSchedule", "lr_multiplier"]
