"""The training forward and backward of every loss never need a value on the host.

On a GPU, an op whose output shape depends on the data (boolean-mask indexing,
nonzero, masked_select) or that reads a scalar back (.item(), bool(tensor)) makes
the host wait for the device. This watches every op a training step dispatches
on the CPU, so it runs without a GPU; tests/test_cuda.py checks the same on CUDA
with torch's sync debug mode. The same forward must also trace as one graph for
torch.compile.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_MODEL
from model import build_model
from utils.config import load_config
from utils.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID

HOST_READS = {"_local_scalar_dense", "nonzero", "nonzero_numpy", "masked_select", "unique",
              "_unique2", "unique_consecutive", "unique_dim"}


class HostReadWatch(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            if any(getattr(t, "dtype", None) == torch.bool for t in args[1] if t is not None):
                self.seen.append(f"{name} with a bool mask")
        return func(*args, **(kwargs or {}))


def _batch(size: int = 8, length: int = 24) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(size, length, dtype=torch.long)
    for row in range(size):
        words = 3 + row % 12
        ids[row, 0], ids[row, words + 1] = SOT_TOKEN_ID, EOT_TOKEN_ID
        ids[row, 1:words + 1] = torch.randint(1, 400, (words,), generator=g)
    return {"images": torch.randn(size, 3, 32, 16, generator=g), "caption_ids": ids,
            "pids": torch.arange(size) // 2, "image_ids": torch.arange(size)}


# Routing by each sample's global token (a gather), top-1 with the "prob" combine rule
# and the per-modality CoAR balance.
ROUTING_VARIANT = ["moe.aux_input=context", "moe.topk=1", "moe.combine=prob",
                   "moe.balance=per_modality"]


@pytest.mark.parametrize("names,head,extra", [("sdm+itc+coar", "comoe", []),
                                              ("sdm+itc+coar", "comoe", ROUTING_VARIANT),
                                              ("sdm+mlm+id", "none", ["model.embed=global"]),
                                              ("sdm+itc+coar+mlm+id+cmpm", "comoe", [])])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_has_no_data_dependent_shape_or_host_read(names, head, extra, precision):
    cfg = load_config(None, TINY_MODEL + [f"loss.names={names}", f"model.head={head}",
                                          "model.cmt_depth=1", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4).train()
    batch = _batch()
    watch = HostReadWatch()
    with watch:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses, metrics = model(batch, return_metrics=True)  # as the trainer calls it
        sum(losses.values()).backward()
    assert watch.seen == []
    assert all(torch.isfinite(v) for v in (losses | metrics).values())


def test_the_watch_sees_a_host_read():
    watch = HostReadWatch()
    x = torch.randn(5)
    with watch:
        x[x > 0].sum().item()
    assert watch.seen == ["index with a bool mask", "_local_scalar_dense"]


@pytest.mark.parametrize("names,head,extra", [("sdm+itc+coar", "comoe", []),
                                              ("sdm+itc+coar", "comoe", ROUTING_VARIANT),
                                              ("sdm+itc+coar+mlm+id+cmpm", "comoe", [])])
def test_training_forward_compiles_as_one_graph(names, head, extra):
    """solver.compile and CUDA graphs (compile_mode=reduce-overhead) need the whole
    training forward, losses included, in one graph: a graph break would run the code
    between graphs eagerly and keep CUDA graphs from covering the step. Dynamo traces it
    with fullgraph=True, which raises at any break; the "eager" backend skips code
    generation, so this takes seconds on the CPU."""
    import torch._dynamo
    cfg = load_config(None, TINY_MODEL + [f"loss.names={names}", f"model.head={head}",
                                          "model.cmt_depth=1", *extra])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4).train()
    batch = _batch()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
        torch.manual_seed(1)  # dropout and MLM masking draw the same numbers in both runs
        traced = compiled(batch, return_metrics=True)  # as the trainer calls it
    finally:
        torch._dynamo.reset()
    torch.manual_seed(1)
    eager = model(batch, return_metrics=True)
    for traced_terms, eager_terms in zip(traced, eager):
        assert traced_terms.keys() == eager_terms.keys()
        for key in eager_terms:
            torch.testing.assert_close(traced_terms[key], eager_terms[key], msg=f"term {key}")
