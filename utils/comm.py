"""Process-group helpers.

A plain `python train.py` is one process and none of these functions touch
torch.distributed (every collective below returns its input unchanged). Under
`torchrun` the group is set up from its environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when the device is CUDA, Gloo on
CPU.

The collectives here carry no gradient; the differentiable gathers that let the
contrastive losses see the global batch live next to the losses (model/build.py).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launch_rank() -> int:
    """This process's rank as torchrun numbers it (0 for a plain run), readable before
    the process group exists: who logs while a run starts."""
    return int(os.environ.get("RANK", 0)) if launched_by_torchrun() else 0


def launched_by_torchrun() -> bool:
    """True when torchrun started this process as one of several workers."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ
            and int(os.environ["WORLD_SIZE"]) > 1)


def train_command() -> str:
    """How this run was launched, for the resume commands it prints: `python train.py`,
    or torchrun with this run's process counts (a resume keeps every rank's random state)."""
    if not launched_by_torchrun():
        return "python train.py"
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local == world:
        return f"torchrun --nproc_per_node={local} train.py"
    return (f"torchrun --nnodes={world // local} --nproc_per_node={local} "
            f"<your rendezvous options> train.py")


def backend_for(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA, Gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (a no-op for a single process or when already joined)."""
    if not launched_by_torchrun() or is_dist():
        return
    if device.type == "cuda":
        # NCCL and the object collectives use the current device of each process.
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device))
    host_group()  # every rank creates it here, in the same order


_HOST_GROUP: Any = None


def host_group() -> Any:
    """A Gloo group for flags that live on the host (a stop signal, an unreadable file).

    Exchanging them over NCCL would put a CUDA tensor on the hot path and make every
    step wait for the GPU to read it back; over Gloo the hosts talk to each other
    while the GPU keeps working. On a Gloo default group it is that group.
    """
    global _HOST_GROUP
    if _HOST_GROUP is None and is_dist():
        _HOST_GROUP = (dist.group.WORLD if dist.get_backend() == "gloo"
                       else dist.new_group(backend="gloo"))
    return _HOST_GROUP


def any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (host-side, through `host_group`), so every rank
    takes the same branch. Returns the flags unchanged in a single process."""
    if get_world_size() == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return [bool(v) for v in t.tolist()]


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    global _HOST_GROUP
    if is_dist():
        dist.destroy_process_group()
    _HOST_GROUP = None


def shard_bounds(num_items: int, rank: int | None = None,
                 world_size: int | None = None) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous share of `num_items` items.

    Shares differ by at most one item and, concatenated in rank order, give
    back the items in their original order.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_gather_object(obj: Any, host: bool = False) -> list[Any]:
    """Every rank's picklable `obj`, in rank order; `host`: over `host_group` (no GPU)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=host_group() if host else None)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; ranks may hold different counts.

    x: (n_r, ...) on this rank's collective device (CUDA under NCCL). A rank with
    no rows may pass any empty tensor; the trailing shape and dtype are taken
    from the ranks that have rows. Returns (sum of n_r, ...). No gradient.
    """
    if not is_dist():
        return x
    metas = all_gather_object((x.shape[0], tuple(x.shape[1:]), x.dtype))
    sizes = [n for n, _, _ in metas]
    filled = [(tail, dtype) for n, tail, dtype in metas if n > 0]
    if not filled:
        return x
    tail, dtype = filled[0]
    if x.shape[0] == 0:
        x = x.new_zeros((0, *tail), dtype=dtype)
    padded = x.new_zeros((max(sizes), *tail), dtype=dtype)  # equal shapes for all_gather
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])
