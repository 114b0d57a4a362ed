"""Running averages, one per named loss term."""
from __future__ import annotations

from collections import defaultdict


class AverageMeter:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.sum += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


class MeterDict:
    """A dict of AverageMeters keyed by loss name."""

    def __init__(self) -> None:
        self.meters: dict[str, AverageMeter] = defaultdict(AverageMeter)

    def update(self, values: dict[str, float], n: int = 1) -> None:
        for key, value in values.items():
            self.meters[key].update(value, n)

    def averages(self) -> dict[str, float]:
        return {key: meter.avg for key, meter in self.meters.items()}

    def __str__(self) -> str:
        return " ".join(f"{k}={m.avg:.4f}" for k, m in self.meters.items())
