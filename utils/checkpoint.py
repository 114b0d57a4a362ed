"""Checkpoints that survive crashes and never execute code when loaded.

A checkpoint is a dict of plain data: the model state dict, optimizer, schedule,
grad scaler, counters, best metric, RNG states and the resolved config. It is
written to a temporary file in the same folder, flushed to disk and renamed over
the old one, so a crash or a full disk mid-write leaves the previous file intact.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .config import config_diff
from .errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unsafe, corrupt or made for another config."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with `weights_only=True`; anything but plain data is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects that are not plain data (tensors, numbers, strings, "
            f"lists, dicts), so it was not loaded: loading it could run code. "
            f"Details: {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} could not be read (truncated or not a checkpoint): "
                              f"{err}") from err
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    model = obj["model"]
    if not isinstance(model, Mapping) or not all(torch.is_tensor(v) for v in model.values()):
        raise CheckpointError(f"{path} is damaged or not a checkpoint of this project: its "
                              f"'model' entry is {type(model).__name__} {model!r:.60}, not a "
                              f"state dict of tensors")
    return obj


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_model_state(model: nn.Module, ckpt: Mapping, cfg: Mapping | None = None,
                     source: str = "checkpoint") -> None:
    """Load `ckpt["model"]` strictly; on mismatch report config keys and parameters."""
    state = strip_module_prefix(ckpt["model"])
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{source} does not fit the model built from the config."]
        if cfg is not None and ckpt.get("config") is not None:
            diff = config_diff(ckpt["config"], cfg)
            if diff:
                lines.append("config keys that differ (checkpoint != current):")
                lines += [f"  {d}" for d in diff[:30]]
        for title, items in (("missing in checkpoint", missing),
                             ("unexpected in checkpoint", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(items[:10]) +
                             (" ..." if len(items) > 10 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generators as plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
