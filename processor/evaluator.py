"""Encode an evaluation split and rank it: text-to-image (and image-to-text).

Every image and caption is embedded on its own (eval mode, no cross-sample
operation), L2-normalised, and ranked by cosine similarity in blocks of queries
so the full query x gallery matrix never has to exist at once.

Under torchrun every rank encodes one contiguous shard of the images and of
the captions, the shards are gathered back into the split's order, and rank 0
ranks them once; every rank returns rank 0's result.

The leak audit (`leak_audit`) checks the claim of the first paragraph on the
trained model itself: it re-embeds some captions and images alone, and in
reversed order in batches of another size, and fails when their embeddings
move by more than the arithmetic's rounding explains.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from prettytable import PrettyTable
from torch import nn
from torch.utils.data import DataLoader, Subset

from utils import comm
from utils.logger import Progress
from utils.metrics import retrieval_metrics
from utils.errors import UserError
from utils.misc import autocast
from utils.signals import stop_signals_blocked

logger = logging.getLogger(__name__)

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
# Seconds between progress log lines while a split is encoded (when no bar is drawn).
PROGRESS_EVERY = 30.0
# Captions and images the audit always re-embeds (eval.audit=true: eval.audit_samples).
QUICK_AUDIT_SAMPLES = 16
# Largest change of a component of an L2-normalised embedding that re-batching may
# cause without any mixing of samples: other batch sizes get other kernels and
# reduction orders, and lower precisions round their results. Measured on the CPU
# (ViT-B/16 sizes, random weights, each sample alone vs in a batch of 8): fp32 8e-8,
# bf16 1.3e-3, fp16 0. TF32 (fp32 on CUDA with TF32 matmuls or convolutions allowed)
# keeps fp16's 10-bit mantissa; fp16 or bf16 weights (a legacy training mode) round
# like the autocast precision of their type. A batch leak moves embeddings by far more:
# adding the batch mean, or attention over the batch axis (the sequence-first attention
# on batch-first tensors that inflated a public fork's ICFG-PEDES scores), changes them
# by O(0.1).
AUDIT_TOLERANCES = {"fp32": 1e-4, "tf32": 2e-3, "fp16": 2e-3, "bf16": 1e-2}


class LeakAuditError(UserError, RuntimeError):
    """Embeddings that change with the other samples of their batch."""


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
                  usage: ExpertUsage | None = None,
                  progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings (N, D) on `device` and pids (N,) of one loader.

    A loader without batches gives (0, 0) float and (0,) long tensors.
    """
    feats, pids = [], []
    encode = model.image_features if kind == "image" else model.text_features
    key = "images" if kind == "image" else "caption_ids"
    with stop_signals_blocked():  # workers start here (see utils.signals)
        batches = iter(loader)
    for batch in batches:
        inputs = batch[key].to(device, non_blocking=True)
        with autocast(device, precision):
            emb, stats = encode(inputs)
        feats.append(F.normalize(emb.float(), dim=-1))
        pids.append(batch["pids"])
        if usage is not None:
            usage.add(kind, stats)
        if progress is not None:
            progress.update(1)
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


def audit_tolerance(model: nn.Module, precision: str, device: torch.device) -> tuple[str, float]:
    """(arithmetic, tolerance) of `model` evaluated in `precision` on `device`; see
    AUDIT_TOLERANCES."""
    if precision == "fp32":
        weights = {p.dtype for p in model.parameters()}
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            if dtype in weights:
                return f"{name} weights", AUDIT_TOLERANCES[name]
        if device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                      or torch.backends.cudnn.allow_tf32):
            return "tf32", AUDIT_TOLERANCES["tf32"]
    return precision, AUDIT_TOLERANCES[precision]


@torch.no_grad()
def audit_embeddings(model: nn.Module, loader: DataLoader, kind: str, reference: torch.Tensor,
                     device: torch.device, precision: str, num_samples: int) -> dict:
    """Largest difference between `reference` and the same samples embedded again.

    Args:
        loader: the evaluation loader that produced `reference` (its dataset and
            batch size).
        kind: "image" or "text".
        reference: (N, D) normalised embeddings of the loader's N samples, in order.
        num_samples: how many samples, spread evenly over the dataset (so over
            its batches), are embedded again: each one alone, and all of them in
            reversed order in batches of another size than the loader's.

    Returns:
        {"samples": n, "max_diff": largest absolute difference of an embedding
        component}.
    """
    count = len(loader.dataset)
    indices = torch.linspace(0, count - 1, min(num_samples, count)).round().long().tolist()
    if not indices:
        return {"samples": 0, "max_diff": 0.0}
    other_size = max(2, loader.batch_size // 2 + 1)

    def embed(order: list[int], batch_size: int) -> torch.Tensor:
        subset = DataLoader(Subset(loader.dataset, order), batch_size=batch_size, shuffle=False,
                            collate_fn=loader.collate_fn)
        return encode_loader(model, subset, kind, device, precision)[0]

    expected = reference[indices]
    alone = embed(indices, 1)
    backwards = embed(indices[::-1], other_size).flip(0)
    max_diff = torch.maximum((alone - expected).abs().max(), (backwards - expected).abs().max())
    return {"samples": len(indices), "max_diff": max_diff.item()}


def leak_audit(model: nn.Module, loaders: dict, references: dict, device: torch.device,
               precision: str, num_samples: int, tolerance: float | None = None) -> dict:
    """Audit both modalities (`audit_embeddings`) against a tolerance.

    Args:
        loaders, references: {"image": ..., "text": ...} evaluation loaders and the
            embeddings they gave.
        tolerance: largest allowed difference; None: AUDIT_TOLERANCES for the
            arithmetic of `model` in `precision` on `device`.

    Returns:
        {"samples": {"text", "image"}, "max_diff": {"text", "image"}, "arithmetic",
        "tolerance", "passed"}, the result for test_metrics.json.
    """
    arithmetic, default = audit_tolerance(model, precision, device)
    tolerance = default if tolerance is None else tolerance
    parts = {kind: audit_embeddings(model, loaders[kind], kind, references[kind], device,
                                    precision, num_samples) for kind in ("text", "image")}
    max_diff = {kind: part["max_diff"] for kind, part in parts.items()}
    passed = all(diff <= tolerance for diff in max_diff.values())  # NaN fails too
    logger.info("leak audit: %d captions and %d images embedded alone and reversed in other "
                "batches; largest embedding difference %.1e (captions) / %.1e (images), "
                "tolerance %.0e (%s): %s", parts["text"]["samples"], parts["image"]["samples"],
                max_diff["text"], max_diff["image"], tolerance, arithmetic,
                "passed" if passed else "FAILED")
    return {"samples": {kind: part["samples"] for kind, part in parts.items()},
            "max_diff": max_diff, "arithmetic": arithmetic, "tolerance": tolerance,
            "passed": passed}


def _leak_message(audit: dict) -> str:
    return (f"leak audit failed: embeddings depend on other samples in the batch. Embedding "
            f"{audit['samples']['text']} captions and {audit['samples']['image']} gallery images "
            f"again, alone and in reversed batches of another size, changed them by up to "
            f"{audit['max_diff']['text']:.2e} (captions) and {audit['max_diff']['image']:.2e} "
            f"(images); rounding in {audit['arithmetic']} explains at most "
            f"{audit['tolerance']:.0e}. Some layer mixes the samples of a batch (e.g. attention "
            f"over the batch axis), so these retrieval metrics cannot be trusted.")


@torch.no_grad()
def evaluate(model: nn.Module, image_loader, text_loader, device: torch.device,
             precision: str = "fp32", i2t: bool = False, desc: str = "evaluation",
             audit_samples: int = 0, audit_tolerance: float | None = None) -> dict:
    """{"t2i": {...}, "i2t": {...}?, "experts": {...}?, "audit": {...}?, "num_queries",
    "num_gallery"}.

    Every rank of a process group must call this with the same full-split
    loaders; each encodes its shard (see module docstring) and all return the
    same dict. `desc` names the split in the progress lines. With `audit_samples`
    > 0, rank 0 also runs `leak_audit` on that many captions and images (with
    `audit_tolerance`), and every rank raises LeakAuditError when it fails.
    """
    core = model.module if hasattr(model, "module") else model
    rank, world_size = comm.get_rank(), comm.get_world_size()
    full_loaders = {"image": image_loader, "text": text_loader}
    if rank == 0:
        logger.info("%s: encoding %d images and %d captions", desc, len(image_loader.dataset),
                    len(text_loader.dataset))
    start = time.perf_counter()
    if world_size > 1:
        image_loader = shard_loader(image_loader, rank, world_size)
        text_loader = shard_loader(text_loader, rank, world_size)
    was_training = core.training
    core.eval()
    usage = ExpertUsage()
    progress = Progress(len(image_loader) + len(text_loader), f"{desc}: encoding batches",
                        rank=rank, every=PROGRESS_EVERY)
    image_feats, image_pids = encode_loader(core, image_loader, "image", device, precision, usage,
                                            progress)
    text_feats, text_pids = encode_loader(core, text_loader, "text", device, precision, usage,
                                          progress)
    progress.close()
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
        if audit_samples > 0:
            result["audit"] = leak_audit(core, full_loaders,
                                         {"image": image_feats, "text": text_feats}, device,
                                         precision, audit_samples, audit_tolerance)
        logger.info("%s: encoded and ranked in %.1fs", desc, time.perf_counter() - start)
    core.train(was_training)
    result = comm.broadcast_object(result)
    if "audit" in result and not result["audit"]["passed"]:
        raise LeakAuditError(_leak_message(result["audit"]))
    return result


def metrics_table(result: dict) -> PrettyTable:
    """The retrieval metrics of an `evaluate` result, one row per task (t2i, i2t)."""
    table = PrettyTable(["task", *METRIC_KEYS])
    for task in ("t2i", "i2t"):
        if task in result:
            table.add_row([task, *(f"{result[task][k]:.2f}" for k in METRIC_KEYS)])
    return table
