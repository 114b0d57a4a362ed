"""Retrieval metrics: CMC Rank-k, mAP and mINP from a query x gallery similarity block.

Ranking rule (deterministic, and the one the reference loop in the tests uses):
gallery items are ordered by descending similarity; equal similarities are
ordered by gallery index, lower index first -- exactly what a stable descending
sort gives. Similarities are compared in float32 (fp16/bf16 inputs convert
exactly; float64 inputs are rounded, so values equal in float32 count as ties).

Why there is no full sort: every metric here is a function of the ranks of the
*relevant* gallery items only, and a relevant item's rank is one plus the number
of gallery items ordered before it. All of those items score at least as high
as the query's lowest-scoring relevant item, so one threshold pass selects them
and the counting happens on that short candidate list instead of a sorted
(Q, G) block: one binary search per candidate among its query's relevant
items gives, through a histogram, how many candidates outrank each relevant
item. With a usable model the candidates are a few percent of the gallery;
with a random one they are most of it, and the cost approaches one binary
search per similarity entry -- still no sort, and memory stays bounded by the
chunk.

Threads: on the CPU, chunks are shared out whole among as many Python threads
as the caller's torch thread count, and each runs its chunk's ops on one torch
thread; the caller's thread settings are restored afterwards, also on an error.
A chunk is a few dozen short ops. Split op by op among OpenMP threads (torch's
default), every op ends at a barrier where the threads spin until all of them
have had CPU time; beside other busy processes (a training run next to the
evaluation) that made the ranking 3-5x slower. Whole chunks per thread meet
only once, at the end. The NaN check over the whole block and the final sums
keep the caller's threads: they are single large ops, and the sums round as
they always did, so the metrics do not depend on how the chunks are shared.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["retrieval_metrics"]

# A gallery item's rank key packs (chunk row, similarity, gallery index) into an
# int64 that stays below 2**63 while rows * G <= 2**30 (see _rank_keys).
_MAX_ROWS_TIMES_GALLERY = 1 << 30
_AUTO_CHUNK_ENTRIES = 1 << 23


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(value))
    raise TypeError(f"retrieval_metrics: {name} must be a torch.Tensor or numpy array, "
                    f"got {type(value).__name__}")


@contextmanager
def _chunk_map(workers: int) -> Iterator[Callable]:
    """`map` over chunks: with workers > 1, a pool of that many Python threads, each running torch on one thread.

    torch's thread count is per thread, but a new thread starts from the count
    last set anywhere, so the caller's count (`workers`) is set again on exit.
    """
    if workers == 1:
        yield map
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="retrieval_metrics",
                              initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool.map
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(workers)


def _rank_keys(flat_index: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
               gallery_size: int) -> torch.Tensor:
    """(N,) int64 keys, distinct, and larger = ranked earlier within a chunk row.

    Args:
        flat_index: (N,) row * gallery_size + gallery index, in the chunk.
        rows: (N,) chunk row of each item.
        scores: (N,) float32 similarities.

    The key is (row * 2**32 + order(score) + row) * G - flat_index
    = (row * 2**32 + order(score)) * G - gallery_index, where order() maps the
    float's bits to an int32 that sorts like the float. Rows never overlap,
    higher scores win, and equal scores fall back to the lower gallery index.
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: the zeros tie
    # Negative floats sort inversely to their bit patterns: flip their magnitude bits.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return torch.add(ordered, rows, alpha=(1 << 32) + 1).mul_(gallery_size).sub_(flat_index)


def _rank_chunk(similarity: torch.Tensor, num_relevant: torch.Tensor, relevant_start: torch.Tensor,
                gallery_order: torch.Tensor, max_relevant: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of the first relevant item, AP and INP of each query of one chunk.

    Args:
        similarity: (C, G) similarities of the chunk's queries, any floating dtype.
        num_relevant: (C,) relevant gallery items of each query, all >= 1.
        relevant_start: (C,) where each query's relevant items begin in `gallery_order`.
        gallery_order: (G,) gallery indices grouped by pid.
        max_relevant: width of the AP row sums, the same for every chunk so that
            the metrics do not depend on the chunking.

    Returns:
        (C,) int64 1-based rank of the first relevant item, (C,) float64 AP and
        (C,) float64 INP.
    """
    num_rows, num_gallery = similarity.shape
    device = similarity.device
    scores = similarity.to(torch.float32).contiguous()  # C, G
    flat_scores = scores.view(-1)  # C*G

    # Relevant items, flat and grouped by row: R = sum of per-query counts.
    segment_end = num_relevant.cumsum(0)  # C
    segment_start = segment_end - num_relevant
    total_relevant = int(segment_end[-1])
    rel_row = torch.repeat_interleave(torch.arange(num_rows, device=device), num_relevant,
                                      output_size=total_relevant)  # R
    within = torch.arange(total_relevant, device=device) - segment_start[rel_row]  # R
    rel_col = gallery_order[relevant_start[rel_row] + within]  # R
    rel_flat = rel_row * num_gallery + rel_col  # R
    rel_score = flat_scores[rel_flat]  # R
    # Sorting keeps rows in order, so row q's relevant items still occupy
    # [segment_start[q], segment_end[q]), now ascending: `within` becomes the
    # ascending position a, and a = 0 is the row's last-ranked relevant item.
    rel_key = torch.sort(_rank_keys(rel_flat, rel_row, rel_score, num_gallery)).values  # R

    # Everything ranked before a query's last relevant item scores >= that item.
    lowest = torch.full((num_rows,), float("inf"), device=device)
    lowest.scatter_reduce_(0, rel_row, rel_score, reduce="amin")  # C
    cand = (scores >= lowest[:, None]).view(torch.uint8).view(-1).nonzero().squeeze(1)  # P, flat index
    cand_row = torch.div(cand, num_gallery, rounding_mode="trunc")  # P
    cand_key = _rank_keys(cand, cand_row, flat_scores[cand], num_gallery)  # P

    # searchsorted counts the relevant items of its row a candidate outranks,
    # plus all earlier rows' R; adding the row keeps each row's n_q + 1 bins apart.
    bins = torch.searchsorted(rel_key, cand_key).add_(cand_row)  # P
    histogram = torch.bincount(bins, minlength=total_relevant + num_rows)
    prefix = torch.cat([histogram.new_zeros(1), histogram.cumsum(0)])  # R + C + 1

    # The relevant item at ascending position a is outranked by exactly the
    # candidates that outrank at least a + 1 of its row's relevant items.
    row_base = segment_start[rel_row] + rel_row  # R
    outranked_by = prefix[row_base + num_relevant[rel_row] + 1] - prefix[row_base + within + 1]
    rank = outranked_by + 1  # R, 1-based
    hits_so_far = num_relevant[rel_row] - within  # R, relevant items ranked at or before it

    precision = torch.zeros(num_rows, max_relevant, dtype=torch.float64, device=device)
    precision[rel_row, within] = hits_so_far / rank.to(torch.float64)
    return (rank[segment_end - 1], precision.sum(1) / num_relevant,
            num_relevant / rank[segment_start].to(torch.float64))


def _check_inputs(similarity, query_pids, gallery_pids, ranks, chunk_size):
    similarity = _as_tensor(similarity, "similarity")
    query_pids = _as_tensor(query_pids, "query_pids")
    gallery_pids = _as_tensor(gallery_pids, "gallery_pids")
    if similarity.ndim != 2:
        raise ValueError(f"retrieval_metrics: similarity must be 2-D (num_queries, num_gallery), "
                         f"got shape {tuple(similarity.shape)}")
    num_queries, num_gallery = similarity.shape
    if num_queries == 0 or num_gallery == 0:
        raise ValueError(f"retrieval_metrics: similarity of shape {tuple(similarity.shape)} is empty")
    if not similarity.is_floating_point():
        raise ValueError(f"retrieval_metrics: similarity must be floating point, got {similarity.dtype}")
    if query_pids.shape != (num_queries,):
        raise ValueError(f"retrieval_metrics: query_pids must have shape ({num_queries},) to match "
                         f"similarity {tuple(similarity.shape)}, got {tuple(query_pids.shape)}")
    if gallery_pids.shape != (num_gallery,):
        raise ValueError(f"retrieval_metrics: gallery_pids must have shape ({num_gallery},) to match "
                         f"similarity {tuple(similarity.shape)}, got {tuple(gallery_pids.shape)}")
    for name, pids in (("query_pids", query_pids), ("gallery_pids", gallery_pids)):
        if pids.is_floating_point() or pids.is_complex() or pids.dtype == torch.bool:
            raise ValueError(f"retrieval_metrics: {name} must hold integer identity labels, got {pids.dtype}")
    ranks = tuple(ranks)
    if not ranks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                        for k in ranks):
        raise ValueError(f"retrieval_metrics: ranks must be positive integers, got {ranks}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
                                   or chunk_size < 1):
        raise ValueError(f"retrieval_metrics: chunk_size must be a positive integer or None, got {chunk_size!r}")
    if num_gallery > _MAX_ROWS_TIMES_GALLERY:
        raise ValueError(f"retrieval_metrics: at most {_MAX_ROWS_TIMES_GALLERY} gallery items are "
                         f"supported, got {num_gallery}")
    device = similarity.device
    return (similarity, query_pids.to(device=device, dtype=torch.int64),
            gallery_pids.to(device=device, dtype=torch.int64), tuple(int(k) for k in ranks),
            None if chunk_size is None else int(chunk_size))


@torch.no_grad()
def retrieval_metrics(similarity, query_pids, gallery_pids, ranks: Sequence[int] = (1, 5, 10),
                      chunk_size: int | None = None) -> dict[str, float]:
    """CMC Rank-k, mAP and mINP of a retrieval, all in percent.

    Args:
        similarity: (Q, G) float tensor (or numpy array), larger = more similar.
            Any floating dtype and device; compared in float32 on its device.
        query_pids: (Q,) integer identity of each query.
        gallery_pids: (G,) integer identity of each gallery item.
        ranks: the k of each "R{k}" key: percent of queries whose first relevant
            gallery item is ranked within the top k.
        chunk_size: queries ranked per vectorised step. On the CPU, as many
            steps run at once as torch has threads (see the module docstring).
            None picks about 8M similarity entries for all the steps that run
            at once. Working memory per step is chunk_size * G bytes plus ~50
            bytes per candidate (entry scoring at least its query's lowest
            relevant score), so at most ~50 * chunk_size * G bytes, and a
            float32 copy of the chunk when the input is not float32.

    Returns:
        {"R1": .., "R5": .., "R10": .., "mAP": .., "mINP": ..} as Python floats
        (one "R{k}" per entry of `ranks`). AP of a query is the mean over its
        relevant items (same pid) of precision at that item's rank; INP is
        (#relevant) / (1-based rank of the last relevant item). Ties follow the
        rule in the module docstring.

    Raises:
        ValueError: on mismatched shapes, non-integer pids, NaN similarities,
            or queries that have no relevant gallery item.
    """
    similarity, query_pids, gallery_pids, ranks, chunk_size = _check_inputs(
        similarity, query_pids, gallery_pids, ranks, chunk_size)
    num_queries, num_gallery = similarity.shape
    device = similarity.device
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if chunk_size is None:  # about 8M similarity entries at a time, shared by the workers
        chunk_size = max(1, _AUTO_CHUNK_ENTRIES // (num_gallery * workers))

    # Gallery grouped by pid: each query's relevant items are one slice of `gallery_order`.
    gallery_order = torch.argsort(gallery_pids, stable=True)  # G
    pid_values, pid_counts = torch.unique_consecutive(gallery_pids[gallery_order], return_counts=True)
    pid_starts = pid_counts.cumsum(0) - pid_counts
    slot = torch.searchsorted(pid_values, query_pids).clamp_(max=pid_values.numel() - 1)  # Q
    has_relevant = pid_values[slot] == query_pids
    if not bool(has_relevant.all()):
        missing = (~has_relevant).nonzero().flatten()
        raise ValueError(
            f"retrieval_metrics: {missing.numel()} of {num_queries} queries have no relevant gallery "
            f"item (no gallery pid equals theirs), e.g. query indices {missing[:10].tolist()} with pids "
            f"{query_pids[missing[:10]].tolist()}; drop those queries or fix the pids")
    query_num_relevant = pid_counts[slot]  # Q
    query_relevant_start = pid_starts[slot]  # Q

    if bool(torch.isnan(similarity.amax())):  # amax propagates NaN and needs no (Q, G) temporary
        bad = torch.cat([torch.isnan(similarity[begin:begin + chunk_size]).any(1).nonzero().flatten() + begin
                         for begin in range(0, num_queries, chunk_size)])
        raise ValueError(f"retrieval_metrics: similarity has NaN in {bad.numel()} query rows, e.g. "
                         f"{bad[:10].tolist()}; check the embeddings that produced them")

    rows_per_chunk = max(1, min(chunk_size, _MAX_ROWS_TIMES_GALLERY // num_gallery))
    # Per-query results are reduced once at the end, and each AP is a row sum over
    # a fixed width, so the metrics do not depend on chunk_size.
    max_relevant = int(query_num_relevant.max())

    def rank_chunk(begin: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        end = begin + rows_per_chunk
        return _rank_chunk(similarity[begin:end], query_num_relevant[begin:end], query_relevant_start[begin:end],
                           gallery_order, max_relevant)

    with _chunk_map(workers) as map_chunks:
        chunks = list(map_chunks(rank_chunk, range(0, num_queries, rows_per_chunk)))
    first_rank, average_precision, inverse_negative_penalty = (torch.cat(parts) for parts in zip(*chunks))

    metrics = {f"R{k}": 100.0 * int((first_rank <= k).sum()) / num_queries for k in ranks}
    metrics["mAP"] = 100.0 * float(average_precision.sum()) / num_queries
    metrics["mINP"] = 100.0 * float(inverse_negative_penalty.sum()) / num_queries
    return metrics
