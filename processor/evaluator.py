"""Encode an evaluation split and rank it: text-to-image (and image-to-text).

Every image and caption is embedded on its own (eval mode, no cross-sample
operation), L2-normalised, and ranked by cosine similarity in blocks of queries
so the full query x gallery matrix never has to exist at once.

Under torchrun every rank encodes one contiguous shard of the images and of
the captions, the shards are gathered back into the split's order, and rank 0
ranks them once; every rank returns rank 0's result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from utils import comm
from utils.metrics import retrieval_metrics
from utils.misc import autocast

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


@dataclass
class ExpertUsage:
    """Top-k selection counts per CoMoE layer and modality."""

    counts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, modality: str, stats: list) -> None:
        if not stats:
            return
        layers = self.counts.setdefault(modality, [torch.zeros_like(s.counts, dtype=torch.float64,
                                                                    device="cpu")
                                                   for s in stats])
        for total, s in zip(layers, stats):
            total += s.counts.detach().to("cpu", torch.float64)

    def all_reduce(self) -> None:
        """Sum the counts of every rank (ranks may have seen different modalities)."""
        if comm.get_world_size() == 1:
            return
        merged: dict[str, list[torch.Tensor]] = {}
        for counts in comm.all_gather_object(self.counts):
            for modality, layers in counts.items():
                if modality not in merged:
                    merged[modality] = [c.clone() for c in layers]
                else:
                    for total, c in zip(merged[modality], layers):
                        total += c
        self.counts = merged

    def summary(self) -> dict:
        """{"image": {"usage": [[...] per layer], "entropy": [...]}, "text": {...}}.

        `usage` is the fraction of selections each expert received; `entropy` is
        the usage entropy divided by log(E): 1 = perfectly even, 0 = one expert.
        """
        out = {}
        for modality, layers in self.counts.items():
            usage, entropy = [], []
            for counts in layers:
                total = counts.sum()
                p = counts / total if total > 0 else torch.full_like(counts, 1 / len(counts))
                h = -(p[p > 0] * p[p > 0].log()).sum().item()
                usage.append([round(v, 6) for v in p.tolist()])
                entropy.append(round(h / math.log(len(p)), 6) if len(p) > 1 else 1.0)
            out[modality] = {"usage": usage, "entropy": entropy}
        return out


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """A loader over `rank`'s contiguous share of `loader`'s dataset, same batching."""
    if loader.batch_size is None:
        raise ValueError("sharded evaluation needs loaders built with a batch_size (as "
                         "datasets.build_eval_loaders builds them), not a batch_sampler")
    start, stop = comm.shard_bounds(len(loader.dataset), rank, world_size)
    # A fresh loader per evaluation: persistent workers would outlive it unused.
    return DataLoader(Subset(loader.dataset, range(start, stop)), batch_size=loader.batch_size,
                      shuffle=False, drop_last=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn)


@torch.no_grad()
def encode_loader(model: nn.Module, loader, kind: str, device: torch.device, precision: str,
                  usage: ExpertUsage | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings (N, D) on `device` and pids (N,) of one loader.

    A loader without batches gives (0, 0) float and (0,) long tensors.
    """
    feats, pids = [], []
    encode = model.image_features if kind == "image" else model.text_features
    key = "images" if kind == "image" else "caption_ids"
    for batch in loader:
        inputs = batch[key].to(device, non_blocking=True)
        with autocast(device, precision):
            emb, stats = encode(inputs)
        feats.append(F.normalize(emb.float(), dim=-1))
        pids.append(batch["pids"])
        if usage is not None:
            usage.add(kind, stats)
    if not feats:  # an empty shard
        return (torch.zeros(0, 0, device=device),
                torch.zeros(0, dtype=torch.long, device=device))
    return torch.cat(feats), torch.cat(pids).to(device)


def ranked_metrics(query: torch.Tensor, gallery: torch.Tensor, query_pids: torch.Tensor,
                   gallery_pids: torch.Tensor, block: int = 4096) -> dict[str, float]:
    """Metrics of cosine ranking, one block of queries at a time (exact: all are means)."""
    totals = dict.fromkeys(METRIC_KEYS, 0.0)
    for start in range(0, len(query), block):
        sim = query[start:start + block] @ gallery.T  # q, G
        part = retrieval_metrics(sim, query_pids[start:start + block], gallery_pids)
        for key in METRIC_KEYS:
            totals[key] += part[key] * len(sim)
    return {key: value / len(query) for key, value in totals.items()}


@torch.no_grad()
def evaluate(model: nn.Module, image_loader, text_loader, device: torch.device,
             precision: str = "fp32", i2t: bool = False) -> dict:
    """{"t2i": {...}, "i2t": {...}?, "experts": {...}?, "num_queries", "num_gallery"}.

    Every rank of a process group must call this with the same full-split
    loaders; each encodes its shard (see module docstring) and all return the
    same dict.
    """
    core = model.module if hasattr(model, "module") else model
    rank, world_size = comm.get_rank(), comm.get_world_size()
    if world_size > 1:
        image_loader = shard_loader(image_loader, rank, world_size)
        text_loader = shard_loader(text_loader, rank, world_size)
    was_training = core.training
    core.eval()
    usage = ExpertUsage()
    image_feats, image_pids = encode_loader(core, image_loader, "image", device, precision, usage)
    text_feats, text_pids = encode_loader(core, text_loader, "text", device, precision, usage)
    core.train(was_training)
    image_feats, image_pids = comm.all_gather_rows(image_feats), comm.all_gather_rows(image_pids)
    text_feats, text_pids = comm.all_gather_rows(text_feats), comm.all_gather_rows(text_pids)
    usage.all_reduce()
    result = None
    if rank == 0:
        result = {"t2i": ranked_metrics(text_feats, image_feats, text_pids, image_pids),
                  "num_queries": len(text_feats), "num_gallery": len(image_feats)}
        if i2t:
            result["i2t"] = ranked_metrics(image_feats, text_feats, image_pids, text_pids)
        if usage.counts:
            result["experts"] = usage.summary()
    return comm.broadcast_object(result)
