"""Training-step time and parameters of each method, relative to the CLIP baseline.

Builds CLIP (SDM+ITC), CoMoE, CoMoE without CoAR, IRRA (SDM+MLM+ID) and CoMoE
with IRRA's losses from `configs/demo.yaml` (or full-size ViT-B/16 with
`--full`), then times full training steps (forward, losses, backward, AdamW)
on the same synthetic batch. The configurations take turns, round after round,
so a change in machine load hits all of them alike; the median per
configuration is reported.

    python -m benchmarks.bench_configs                  # demo architecture, CPU
    python -m benchmarks.bench_configs --full --batch-size 8 --rounds 3

The last line gives each configuration's step time over CLIP's.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from model import build_model
from solver import build_optimizer
from utils.config import load_config
from utils.misc import count_parameters, resolve_device

ROOT = Path(__file__).resolve().parent.parent
METHODS = {
    "clip": ["model.head=none", "model.embed=global", "loss.names=sdm+itc"],
    "comoe": ["loss.names=sdm+itc+coar"],
    "comoe_nocoar": ["loss.names=sdm+itc"],
    "irra": ["model.head=none", "model.embed=global", "loss.names=sdm+mlm+id"],
    "comoe_irra": ["loss.names=sdm+itc+coar+mlm+id"],
}
FULL = ["model.pretrain=none", "model.arch={}", "input.size=[384,128]", "model.stride=16",
        "dataset.text_length=77", "moe.layers=4", "moe.heads=8", "moe.reduction=8",
        "model.cmt_depth=4"]


def synthetic_batch(cfg, batch_size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = cfg.input.size
    length = cfg.dataset.text_length
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    for i in range(batch_size):
        n = int(torch.randint(10, length - 1, (1,), generator=g))
        ids[i, 0], ids[i, n] = 49406, 49407
        ids[i, 1:n] = torch.randint(1, 40000, (n - 1,), generator=g)
    return {"images": torch.randn(batch_size, 3, h, w, generator=g).to(device),
            "caption_ids": ids.to(device),
            "pids": (torch.arange(batch_size) // 2).to(device)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="ViT-B/16 sizes at 384x128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    setups = {}
    for name, overrides in METHODS.items():
        cfg = load_config(ROOT / "configs" / "demo.yaml",
                          [*(FULL if args.full else []), *overrides, "model.cmt_depth=2"
                           if not args.full else "model.cmt_depth=4"])
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=args.batch_size // 2).to(device).train()
        optimizer = build_optimizer(model, name="adamw", lr=1e-5, weight_decay=4e-5,
                                    lr_factor=5.0, bias_lr_factor=2.0)
        setups[name] = (model, optimizer, synthetic_batch(cfg, args.batch_size, device))

    def step(name: str) -> float:
        model, optimizer, batch = setups[name]
        start = time.perf_counter()
        loss = sum(model(batch).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in setups:  # warm-up
        step(name)
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name in setups:
            times[name].append(step(name))

    clip_time = statistics.median(times["clip"])
    print(f"device {device}, batch {args.batch_size}, {'ViT-B/16' if args.full else 'demo'} "
          f"sizes, {args.rounds} rounds (median step)")
    print(f"{'method':14s} {'params M':>9s} {'head M':>8s} {'step s':>8s} {'vs clip':>8s}")
    for name, (model, _, _) in setups.items():
        head = sum(count_parameters(m) for m in (model.head, model.mlm_head, model.classifier)
                   if m is not None)
        t = statistics.median(times[name])
        print(f"{name:14s} {count_parameters(model) / 1e6:9.2f} {head / 1e6:8.2f} {t:8.3f} "
              f"{t / clip_time:7.2f}x")
    backbone = count_parameters(setups["comoe"][0].backbone)
    head = count_parameters(setups["comoe"][0].head)
    print(f"CoMoE head: {head / 1e6:.2f}M parameters = {100 * head / backbone:.1f}% of the "
          f"backbone's {backbone / 1e6:.2f}M")
    print("step time vs clip: " + ", ".join(
        f"{name} {statistics.median(t) / clip_time:.2f}x" for name, t in times.items()))


if __name__ == "__main__":
    main()
