"""Seeding, device choice, the precision switch and the torch version floor."""
from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from .errors import UserError


MIN_TORCH = (2, 6)


class UnsupportedTorchError(UserError, RuntimeError):
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


class DeviceUnavailableError(UserError):
    """A GPU was asked for (device=cuda[:N], or CUDA_VISIBLE_DEVICES) but cannot be used."""


def requested_gpus() -> str | None:
    """CUDA_VISIBLE_DEVICES when it selects at least one GPU, else None.

    CUDA reads the list up to its first invalid entry, so unset, "", "-1" and
    Slurm's "NoDevFiles" (a job without GPUs) select none; an index or a
    GPU-/MIG- UUID selects one.
    """
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    first = value.split(",")[0].strip()
    return value if first.isdigit() or first.startswith(("GPU-", "MIG-")) else None


def _why_no_cuda() -> str:
    if not torch.backends.cuda.is_built():
        return f"this PyTorch ({torch.__version__}) is a CPU-only build"
    return (f"PyTorch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable "
            f"GPU: no NVIDIA driver, or no GPU matching CUDA_VISIBLE_DEVICES")


def resolve_device(name: str) -> torch.device:
    """The device of a run: `cpu`; `cuda`/`cuda:N`; or `auto`, the local GPU (LOCAL_RANK
    under torchrun) when CUDA is usable, else the CPU.

    A GPU that was asked for is never silently replaced by the CPU: `cuda[:N]`, or
    `auto` while CUDA_VISIBLE_DEVICES selects a GPU (see `requested_gpus`), raise
    DeviceUnavailableError when CUDA is not usable. `cpu` always works.
    """
    if name == "cpu":
        return torch.device("cpu")
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = local if name == "auto" else torch.device(name)
        device = local if device.index is None else device
        if device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(
                f"device {device} does not exist: {torch.cuda.device_count()} GPU(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return device
    visible = requested_gpus()
    if name == "auto" and visible is None:
        return torch.device("cpu")
    asked = f"device={name}" if name != "auto" else f"CUDA_VISIBLE_DEVICES={visible}"
    raise DeviceUnavailableError(
        f"{asked} asks for a GPU, but CUDA is not usable here: {_why_no_cuda()}. To run on "
        f"the CPU, set device=cpu" + (" or unset CUDA_VISIBLE_DEVICES" if name == "auto" else ""))


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision over fp32 weights; `fp32` disables it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
