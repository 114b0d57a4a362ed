"""Operations per training step: how many ATen ops (roughly, GPU kernel launches) each
method's forward + backward issues, against a per-expert loop as the reference.

At batch 64 on an H100/H200 the CoMoE step is bound by launching kernels, not by
arithmetic (``bench_train_step --profile``: ~4,600 kernels a step and the GPU busy
about half the time), so the number of ops a step issues is what the head's
dispatch should keep low. Every op reaching the dispatcher is counted
(``TorchDispatchMode``) under bf16 autocast, including views and casts; views
launch nothing on a GPU, so the "kernel-like" column leaves out view-only ops.

    python -m benchmarks.bench_ops              # ViT-B/16 sizes, random weights, batch 8

The reference is the CoMoE head with ``ExpertPool`` run as a Python loop over
experts (2E matmuls on each expert's slice of the stacked weights, and E weighted
sums), the dispatch before the stacked one.
The last line is the ratio of ops per step, reference over ours.
"""
from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that only reinterpret memory: no kernel on a GPU.
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
            "slice", "select", "detach", "alias", "as_strided", "split", "split_with_sizes",
            "chunk", "unbind", "reshape", "flatten", "narrow", "view_as", "_reshape_alias",
            "lift_fresh", "empty", "empty_like", "empty_strided"}

METHODS = {
    "CLIP (sdm+itc)": ["model.head=none", "model.embed=global", "loss.names=sdm+itc"],
    "CoMoE (sdm+itc+coar)": [],
    "IRRA (sdm+mlm+id)": ["model.head=none", "model.embed=global", "loss.names=sdm+mlm+id"],
    "CoMoE + IRRA losses": ["loss.names=sdm+itc+coar+mlm+id"],
}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def loop_forward(self, x, selected, weights):
    """The reference dispatch: each expert on every token, summed in a Python loop."""
    combine = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
    combine.scatter_(1, selected, weights.float())
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(self.num_experts):
        hidden = torch.addmm(self.down.bias[e], x, self.down.weight[e])
        hidden = F.dropout(F.gelu(hidden), self.dropout, self.training)
        expert_out = torch.addmm(self.up.bias[e], hidden, self.up.weight[e])
        out = out + combine[:, e:e + 1] * expert_out.float()
    return out.to(x.dtype)


def count_step(overrides: list[str], batch_size: int, num_classes: int) -> collections.Counter:
    from benchmarks.bench_train_step import synthetic_batch
    from model import build_model
    from utils.config import load_config
    from utils.misc import autocast
    cfg = load_config(None, ["model.pretrain=none", "model.stride=16", "input.size=[384,128]",
                             "dataset.text_length=77", "solver.precision=bf16", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=num_classes).train()
    batch = synthetic_batch(batch_size, (384, 128), model.backbone.vocab_size, torch.device("cpu"), False)
    device = torch.device("cpu")
    for counted in (False, True):  # the first pass creates lazily built state
        counter = OpCounter()
        with counter if counted else torch.no_grad():
            with autocast(device, "bf16"):
                losses = model(batch)
            if counted:
                sum(losses.values()).backward()
    return counter.counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    from model.moe import ExpertPool

    num_classes = args.batch_size // 4
    rows = [(name, count_step(overrides, args.batch_size, num_classes)) for name, overrides in METHODS.items()]
    ours = rows[1][1]
    stacked_forward = ExpertPool.forward
    ExpertPool.forward = loop_forward
    try:
        reference = count_step([], args.batch_size, num_classes)
    finally:
        ExpertPool.forward = stacked_forward
    rows.append(("CoMoE, per-expert loop (reference)", reference))

    def kernel_like(counts):
        return sum(v for k, v in counts.items() if k not in VIEW_OPS)

    print(f"ATen ops per training step (forward + backward, bf16 autocast), ViT-B/16 at 384x128, "
          f"batch {args.batch_size}, torch {torch.__version__}")
    print(f"{'method':<38}{'all ops':>9}{'kernel-like':>13}")
    for name, counts in rows:
        print(f"{name:<38}{sum(counts.values()):>9}{kernel_like(counts):>13}")
    extra_ours = kernel_like(ours) - kernel_like(rows[0][1])
    extra_ref = kernel_like(reference) - kernel_like(rows[0][1])
    print(f"kernel-like ops the CoMoE head adds to CLIP: {extra_ours} (reference {extra_ref})")
    print(f"ratio reference / ours, kernel-like ops per step: {kernel_like(reference) / kernel_like(ours):.2f}x")


if __name__ == "__main__":
    main()
