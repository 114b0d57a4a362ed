"""Seeding, device choice, the precision switch and the torch version floor."""
from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch


MIN_TORCH = (2, 6)


class UnsupportedTorchError(RuntimeError):
    """The installed torch is older than MIN_TORCH."""


def require_torch(version: str | None = None) -> None:
    """Refuse a torch older than MIN_TORCH (default: the installed one).

    Every checkpoint and weights file here is read with `weights_only=True`, which a
    crafted file can bypass to run code before torch 2.6 (CVE-2025-32434).
    """
    version = torch.__version__ if version is None else version
    release = re.match(r"(\d+)\.(\d+)", str(version))
    if release is None or tuple(map(int, release.groups())) < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        raise UnsupportedTorchError(
            f"torch {version} is installed but this code needs torch>={floor}: older versions "
            f"let a crafted checkpoint run code despite weights_only=True (CVE-2025-32434). "
            f"Upgrade with: pip install -r requirements.txt")


def set_seed(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str) -> torch.device:
    """`auto` -> the local CUDA device when present (LOCAL_RANK under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was requested but CUDA is not available here; "
                           "use device=auto or device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision over fp32 weights; `fp32` disables it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
