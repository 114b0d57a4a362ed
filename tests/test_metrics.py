"""retrieval_metrics against a slow, obviously-correct per-query loop and hand-computed cases."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from utils.metrics import retrieval_metrics

KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def reference_metrics(similarity, query_pids, gallery_pids, ranks=(1, 5, 10)) -> dict[str, float]:
    """One query at a time: sort the gallery by (-score, index), read off the hits."""
    rows = torch.as_tensor(similarity).float().tolist()
    query_pids, gallery_pids = list(query_pids.tolist()), list(gallery_pids.tolist())
    first, ap, inp = [], [], []
    for row, pid in zip(rows, query_pids):
        order = sorted(range(len(row)), key=lambda g: (-row[g], g))
        hits = [position for position, g in enumerate(order, start=1) if gallery_pids[g] == pid]
        first.append(hits[0])
        ap.append(sum(found / position for found, position in enumerate(hits, start=1)) / len(hits))
        inp.append(len(hits) / hits[-1])
    metrics = {f"R{k}": 100.0 * sum(f <= k for f in first) / len(rows) for k in ranks}
    metrics["mAP"] = 100.0 * sum(ap) / len(rows)
    metrics["mINP"] = 100.0 * sum(inp) / len(rows)
    return metrics


def assert_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] == pytest.approx(expected[key], abs=1e-9), key


def random_problem(seed: int, num_queries: int, num_gallery: int, num_ids: int, ties: bool):
    """Pids with every identity on both sides; scores with many exact ties if `ties`."""
    gen = torch.Generator().manual_seed(seed)
    query_pids = torch.randperm(num_queries, generator=gen) % num_ids
    gallery_pids = torch.randperm(num_gallery, generator=gen) % num_ids
    if ties:
        similarity = torch.randint(-4, 5, (num_queries, num_gallery), generator=gen).float() / 4
    else:
        similarity = torch.randn(num_queries, num_gallery, generator=gen)
    # Identity-correlated scores, so the metrics are far from both 0 and 100.
    similarity += 0.75 * (query_pids[:, None] == gallery_pids[None, :]).float()
    return similarity, query_pids, gallery_pids


@pytest.mark.parametrize("ties", [False, True], ids=["tie-free", "ties"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_both_directions(seed, ties):
    similarity, caption_pids, image_pids = random_problem(seed, 45, 37, 9, ties)
    t2i = retrieval_metrics(similarity, caption_pids, image_pids)
    assert_close(t2i, reference_metrics(similarity, caption_pids, image_pids))
    assert 0 < t2i["mAP"] < 100 and 0 < t2i["R1"] < 100
    # Image-to-text: the transposed (non-contiguous) block with the pids swapped.
    i2t = retrieval_metrics(similarity.t(), image_pids, caption_pids)
    assert_close(i2t, reference_metrics(similarity.t(), image_pids, caption_pids))


def test_hand_computed_example():
    gallery_pids = torch.tensor([1, 2, 1, 3, 2])
    query_pids = torch.tensor([1, 2])
    similarity = torch.tensor([
        # Order g0 g1 g3 g4 g2: pid-1 hits at ranks 1 and 5.
        # AP = (1/1 + 2/5) / 2 = 0.7, INP = 2/5 = 0.4.
        [0.9, 0.8, 0.1, 0.5, 0.3],
        # g1 (pid 2) ties with g3 (pid 3) at 0.4; the lower index goes first, so the order
        # is g2 g4 g1 g3 g0 and the pid-2 hits are at ranks 2 and 3.
        # AP = (1/2 + 2/3) / 2 = 7/12, INP = 2/3. (The other tie order would give 1/2 and 1/2.)
        [0.2, 0.4, 0.7, 0.4, 0.6],
    ])
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids, ranks=(1, 2, 5))
    assert metrics["R1"] == pytest.approx(50.0)
    assert metrics["R2"] == pytest.approx(100.0)
    assert metrics["R5"] == pytest.approx(100.0)
    assert metrics["mAP"] == pytest.approx(100 * (0.7 + 7 / 12) / 2)
    assert metrics["mINP"] == pytest.approx(100 * (0.4 + 2 / 3) / 2)
    assert list(metrics) == ["R1", "R2", "R5", "mAP", "mINP"]


def test_single_relevant_item_is_reciprocal_rank():
    # One relevant item at rank r: AP = INP = 1/r.
    similarity = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.1, 0.5, 0.3, 0.2]])
    metrics = retrieval_metrics(similarity, torch.tensor([7, 8]), torch.tensor([7, 5, 8, 6]), ranks=(1, 3))
    # Query 0: its item g0 is last (rank 4); query 1: g2 is second.
    assert metrics == pytest.approx({"R1": 0.0, "R3": 50.0, "mAP": 100 * (1 / 4 + 1 / 2) / 2,
                                     "mINP": 100 * (1 / 4 + 1 / 2) / 2})


def test_chunk_size_does_not_change_the_result():
    similarity, query_pids, gallery_pids = random_problem(3, 64, 50, 11, ties=True)
    results = [retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=size)
               for size in (1, 7, 64, 1000, None)]
    assert all(result == results[0] for result in results[1:])
    assert_close(results[0], reference_metrics(similarity, query_pids, gallery_pids))


def test_zeros_of_both_signs_and_infinities_follow_the_tie_rule():
    similarity = torch.tensor([
        [0.0, -0.0, float("inf"), -1.0, 0.0, float("-inf")],
        [-0.0, 0.0, -0.5, float("-inf"), float("-inf"), 2.0],
        [float("inf"), float("inf"), -0.0, 0.0, -2.0, 1.0],
    ])
    query_pids = torch.tensor([0, 1, 2])
    gallery_pids = torch.tensor([1, 0, 2, 0, 1, 2])
    # Query 0: -0.0 at g1 ties with 0.0 at g0 and g4, and g0 (pid 1) goes first.
    assert_close(retrieval_metrics(similarity, query_pids, gallery_pids),
                 reference_metrics(similarity, query_pids, gallery_pids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_inputs_are_ranked_in_float32(dtype):
    similarity, query_pids, gallery_pids = random_problem(4, 30, 40, 6, ties=False)
    similarity = similarity.to(dtype)  # fp16/bf16 create ties, float64 rounds to float32
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids)
    assert_close(metrics, reference_metrics(similarity.float(), query_pids, gallery_pids))


def test_numpy_inputs_and_arbitrary_integer_pids():
    similarity, query_pids, gallery_pids = random_problem(5, 20, 25, 5, ties=True)
    # Pids need not be 0..N-1: shift them far out, negative included.
    query_pids, gallery_pids = query_pids * 1_000_003 - 7, gallery_pids * 1_000_003 - 7
    expected = reference_metrics(similarity, query_pids, gallery_pids)
    assert_close(retrieval_metrics(similarity.numpy(), query_pids.numpy().astype(np.int32),
                                   gallery_pids.numpy()), expected)


def test_gradients_are_not_tracked():
    similarity, query_pids, gallery_pids = random_problem(6, 10, 12, 3, ties=False)
    similarity.requires_grad_(True)
    metrics = retrieval_metrics(similarity * 2, query_pids, gallery_pids)
    assert all(isinstance(value, float) for value in metrics.values())


@pytest.fixture
def callers_threads():
    """The caller's torch thread count, set to one more than it was (so neither 1 nor a default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    yield threads + 1
    torch.set_num_threads(threads)


def threads_of_a_new_thread() -> int:
    """torch's thread count in a thread started now: it starts from the count last set in any thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(torch.get_num_threads).result()


def spy_on_rank_keys(monkeypatch, fail: bool = False) -> list[tuple[int, int]]:
    """(thread id, torch thread count) at each _rank_keys call, i.e. inside a chunk; raises if `fail`."""
    import utils.metrics
    seen, rank_keys = [], utils.metrics._rank_keys

    def spy(*args, **kwargs):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        if fail:
            raise RuntimeError("ranking failed")
        return rank_keys(*args, **kwargs)

    monkeypatch.setattr(utils.metrics, "_rank_keys", spy)
    return seen


def test_chunks_are_shared_by_threads_that_run_torch_on_one_thread(monkeypatch, callers_threads):
    similarity, query_pids, gallery_pids = random_problem(11, 60, 45, 7, ties=True)
    seen = spy_on_rank_keys(monkeypatch)
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=4)
    assert len(seen) == 2 * 15  # two calls per chunk
    assert {count for _, count in seen} == {1}
    assert threading.get_ident() not in {thread for thread, _ in seen}
    assert len({thread for thread, _ in seen}) <= callers_threads
    assert torch.get_num_threads() == callers_threads
    assert threads_of_a_new_thread() == callers_threads
    assert_close(metrics, reference_metrics(similarity, query_pids, gallery_pids))


def test_callers_threads_are_restored_when_the_ranking_fails(monkeypatch, callers_threads):
    similarity, query_pids, gallery_pids = random_problem(12, 20, 15, 4, ties=False)
    seen = spy_on_rank_keys(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="ranking failed"):
        retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=5)
    assert seen and {count for _, count in seen} == {1}
    assert torch.get_num_threads() == callers_threads
    assert threads_of_a_new_thread() == callers_threads


def test_one_caller_thread_ranks_in_the_callers_thread(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        similarity, query_pids, gallery_pids = random_problem(13, 30, 20, 5, ties=True)
        seen = spy_on_rank_keys(monkeypatch)
        metrics = retrieval_metrics(similarity, query_pids, gallery_pids, chunk_size=7)
        assert {thread for thread, _ in seen} == {threading.get_ident()}
    finally:
        torch.set_num_threads(threads)
    assert_close(metrics, reference_metrics(similarity, query_pids, gallery_pids))


def test_query_without_relevant_item_is_an_error():
    similarity = torch.randn(5, 4)
    gallery_pids = torch.tensor([0, 1, 1, 2])
    query_pids = torch.tensor([0, 3, 1, 9, 2])
    with pytest.raises(ValueError, match=r"2 of 5 queries have no relevant gallery item.*\[1, 3\]"):
        retrieval_metrics(similarity, query_pids, gallery_pids)


@pytest.mark.parametrize("similarity, query_pids, gallery_pids, message", [
    (torch.randn(6), torch.zeros(6), torch.zeros(6), "must be 2-D"),
    (torch.randn(3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long), r"query_pids.*\(3,\)"),
    (torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long), r"gallery_pids.*\(4,\)"),
    (torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.zeros(4, dtype=torch.long), "query_pids"),
    (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(4, dtype=torch.long), "empty"),
    (torch.randn(3, 4), torch.zeros(3), torch.zeros(4), "integer identity labels"),
    (torch.randint(0, 5, (3, 4)), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long), "floating"),
])
def test_bad_shapes_and_dtypes_are_errors(similarity, query_pids, gallery_pids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(similarity, query_pids, gallery_pids)


def test_nan_similarity_is_an_error_naming_the_rows():
    similarity = torch.randn(6, 4)
    similarity[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in 1 query rows, e.g. \[4\]"):
        retrieval_metrics(similarity, torch.zeros(6, dtype=torch.long), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kwargs, message", [
    ({"ranks": (0, 5)}, "ranks"),
    ({"ranks": ()}, "ranks"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
])
def test_bad_options_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                          **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    similarity, query_pids, gallery_pids = random_problem(7, 70, 55, 8, ties=True)
    expected = retrieval_metrics(similarity, query_pids, gallery_pids)
    actual = retrieval_metrics(similarity.cuda().half(), query_pids.cuda(), gallery_pids)
    assert_close(actual, retrieval_metrics(similarity.half(), query_pids, gallery_pids))
    assert_close(retrieval_metrics(similarity.cuda(), query_pids.cuda(), gallery_pids.cuda()), expected)


def test_benchmark_reference_agrees():
    # The argsort-based ranking that benchmarks/bench_eval.py times against.
    from benchmarks.bench_eval import reference_rank
    similarity, query_pids, gallery_pids = random_problem(8, 40, 30, 6, ties=True)
    cmc, mAP, mINP = reference_rank(similarity, query_pids, gallery_pids)
    metrics = retrieval_metrics(similarity, query_pids, gallery_pids)
    assert [metrics["R1"], metrics["R5"], metrics["R10"], metrics["mAP"], metrics["mINP"]] == pytest.approx(
        [float(cmc[0]), float(cmc[4]), float(cmc[9]), float(mAP), float(mINP)], abs=1e-4)
