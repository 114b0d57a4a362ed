from .build import (build_optimizer, build_scheduler, optimizer_from_config, param_groups,
                    schedule_curve, schedule_from_config)
from .lr_scheduler import WarmupCosineSchedule, lr_multiplier, schedule_multiplier

__all__ = ["build_optimizer", "build_scheduler", "optimizer_from_config", "param_groups",
           "schedule_curve", "schedule_from_config", "WarmupCosineSchedule", "lr_multiplier",
           "schedule_multiplier"]
