"""Checkpoints that survive crashes and never execute code when loaded.

A checkpoint is a dict of plain data: the model state dict, optimizer, schedule,
grad scaler, counters, best metric, RNG states and the resolved config. It is
written to a temporary file `.NAME.tmp-<pid>` in the same folder, flushed to disk
and renamed over the old one, so a crash or a full disk mid-write leaves the
previous file intact. A full disk (or quota) is reported with the space the file
needs; temporary files of writers that died (SIGKILL, node failure) are removed
by `sweep_temporaries`.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .config import config_diff
from .errors import UserError


logger = logging.getLogger(__name__)

TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")
_NO_SPACE = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded"}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unsafe, corrupt, made for another config or unwritable."""


def payload_bytes(obj: Any) -> int:
    """Bytes of the tensor storages in `obj`, each storage once: what torch.save writes,
    less a few kilobytes of pickled structure."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (str(storage.device), storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def _no_space_reason(err: BaseException, folder: Path, needed: int) -> str | None:
    """"disk full" / "disk quota exceeded" when `err` (or an error it arose from) says so, or
    when an I/O error left less free space than the file needs; else None. torch.save
    reports a failed write as a RuntimeError whose context holds the OSError."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return _NO_SPACE[cause.errno]
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, (OSError, RuntimeError)):
        try:
            if shutil.disk_usage(folder).free < needed:
                return "disk full"
        except OSError:
            pass
    return None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` through `.NAME.tmp-<pid>` and a rename.

    Raises CheckpointError "disk full at PATH: N GB needed, M GB free" (or quota
    exceeded) when the disk has no room; `path` keeps its previous content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        needed = payload_bytes(obj)
        reason = _no_space_reason(err, path.parent, needed) if isinstance(err, Exception) else None
        if reason is None:
            raise
        try:
            free = f", {_size(shutil.disk_usage(path.parent).free)} free"
        except OSError:
            free = ""
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise CheckpointError(f"{reason} at {path}: {_size(needed)} needed{free}{kept}. "
                              f"Free some space there, then try again") from err
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def is_live_process_of_ours(pid: int) -> bool:
    """Whether `pid` runs here under this user (signal 0 probes without signalling).

    Elsewhere than POSIX the probe is unavailable, so every pid counts as live."""
    if os.name != "posix":
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OverflowError):
        return False  # gone, or another user's process that reused the number
    return True


def sweep_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the `.NAME.tmp-<pid>` files of `atomic_save` in `folder` whose writer is
    gone: its pid is not a live process of this user (our own pid counts as gone,
    since this process is not writing while it sweeps). Call it from the one process
    that writes there (rank 0 under torchrun): other ranks' pids are live and theirs
    are kept anyway, but a writer on another host cannot be probed. Returns the
    removed paths.
    """
    removed, freed = [], 0
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        logger.warning("cannot list %s to remove stale temporary files (%s)", folder, err)
        return removed
    for entry in entries:
        match = TEMPORARY_NAME.fullmatch(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and is_live_process_of_ours(pid):
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as err:
            logger.warning("could not remove the stale temporary file %s (%s)", entry.path, err)
            continue
        removed.append(Path(entry.path))
        freed += size
    if removed:
        logger.info("removed %d stale temporary file(s) of interrupted writes (%s): %s",
                    len(removed), _size(freed), ", ".join(p.name for p in removed))
    return removed


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
    """The state dict without the ``module.`` prefix DDP (or DataParallel) adds to its keys."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_model_state(model: nn.Module, ckpt: Mapping, cfg: Mapping | None = None,
                     source: str = "checkpoint") -> None:
    """Load `ckpt["model"]` strictly; on mismatch report config keys and parameters.

    The modules' load hooks convert older layouts first (e.g. the per-expert
    parameters of `model.moe.ExpertPool`), so keys are compared after conversion. A
    checkpoint that does not fit raises CheckpointError and may leave the model
    partly loaded.
    """
    state = strip_module_prefix(ckpt["model"])
    own = model.state_dict()
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if not shapes:
        try:
            result = model.load_state_dict(state, strict=False)
            missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
        except RuntimeError as err:  # a converted tensor of the wrong shape
            shapes = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
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


def rng_state_for_rank(ckpt: Mapping, rank: int, world_size: int, seed: int) -> dict:
    """The random state that `rank` of `world_size` resumes from.

    A checkpoint written by several processes holds each rank's state
    (`rng_ranks`), so every rank continues its own dropout and masking streams.
    Where the process count changed, or the file holds one state only, rank 0
    takes the saved state and every other rank seeds its generators from
    (seed, rank, the step reached), a stream of its own again.
    """
    states = ckpt.get("rng_ranks")
    if states is not None and len(states) == world_size:
        return dict(states[rank])
    saved = dict(ckpt["rng"] if states is None else states[0])
    if rank == 0:
        return saved
    logger.warning("the checkpoint holds the random state of %d process(es), this run has %d: "
                   "rank %d seeds its random streams afresh", 1 if states is None else len(states),
                   world_size, rank)
    derived = (seed * 1_000_003 + rank * 7_919 + int(ckpt.get("global_step", 0))) % (1 << 62)
    python = random.Random(derived).getstate()
    numpy = np.random.RandomState(derived % (1 << 32)).get_state()
    state = {"python": [python[0], list(python[1]), python[2]],
             "numpy": [numpy[0], torch.from_numpy(numpy[1].astype(np.int64)), int(numpy[2]),
                       int(numpy[3]), float(numpy[4])],
             "torch": torch.Generator().manual_seed(derived).get_state()}
    if "cuda" in saved:
        state["cuda_seed"] = derived
    return state


def restore_rng_state(state: Mapping) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, np_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_seed" in state and torch.cuda.is_available():
        torch.cuda.manual_seed_all(state["cuda_seed"])
