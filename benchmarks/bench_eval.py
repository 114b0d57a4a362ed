"""Speed and memory of ``utils.metrics.retrieval_metrics`` against the usual implementation.

The reference is the ranking code most text-based person retrieval projects
share (IRRA's ``rank``): a full ``argsort`` of the (Q, G) similarity, the pid of
every ranked gallery item, a (Q, G) match matrix and its cumulative sum for CMC
and mAP, and a Python loop over queries for mINP. It is re-implemented below
with the same algorithm; two details differ from IRRA and both favour it here:
the argsort is stable (so both sides break ties the same way and their numbers
can be compared exactly) and precision-at-k is one vectorised division instead
of a Python loop over the G columns.

Synthetic embeddings at the sizes of the ICFG-PEDES test split (19,848 captions
x 19,848 images, 1,000 identities) and the CUHK-PEDES one (6,156 x 3,074, 1,000
identities): identities are grouped around a few "appearance" directions and
every embedding is its identity's centre plus noise of a per-sample scale, so
the hard negatives are the similar-looking identities, as in real data. The
default calibration lands near published ICFG-PEDES numbers (R1 ~70, mAP ~25,
mINP ~5); ``--features isotropic`` spreads the confusions over the whole gallery,
the costliest case for the candidate-based ranking.

Each implementation runs in its own subprocess, which builds the embeddings,
computes the similarity (timed separately) and then the metrics, and reports
its peak resident memory (``ru_maxrss``), so the numbers are for the whole
process. A third subprocess times the two alternately on one similarity block,
``--repeats`` rounds: the last line is the median of their speed ratios per
round, which compares them under the same load (the line above it divides the
best times of the separate processes, taken at different moments).

The reference holds several (Q, G) tensors at once: about 16 GB at ICFG-PEDES
size. ``--ref-queries N`` ranks only the first N queries with it (the metric
time is extrapolated linearly, the agreement checked on those N).

``--neighbour`` measures the speed beside a training run, the usual situation
of an evaluation: a background process repeats the training step of
``benchmarks.bench_train_step``'s tiny CoMoE model (fp32, batch 64, 384x128,
forward, backward and AdamW on one synthetic batch, torch's default threads)
from before the first worker starts until the last one ends; the table is
followed by its step rate. On a machine with few cores, OpenMP's spin-waiting
slows code made of many short parallel ops far more than one long argsort,
which is why retrieval_metrics shares whole chunks among threads that each run
torch on one thread. The header shows the load average.

    python -m benchmarks.bench_eval                        # both sizes, CPU
    python -m benchmarks.bench_eval --size icfg --ref-queries 4000
    python -m benchmarks.bench_eval --neighbour --ref-queries 4000 --repeats 3
    python -m benchmarks.bench_eval --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

# name: (queries = captions, gallery = images, identities)
SIZES = {"icfg": (19848, 19848, 1000), "cuhk": (6156, 3074, 1000)}
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")
EMBED_DIM = 512
TOLERANCE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("icfg", "cuhk", "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip-reference", action="store_true", help="time only retrieval_metrics")
    parser.add_argument("--ref-queries", type=int, default=0, metavar="N",
                        help="run the reference on the first N queries only and extrapolate its time "
                             "linearly to all queries (0 = all queries)")
    parser.add_argument("--features", choices=("grouped", "isotropic"), default="grouped",
                        help="synthetic embedding model (see the module docstring)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="retrieval_metrics chunk_size (default: the library default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed metric runs per process; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--neighbour", action="store_true",
                        help="run a training step in a loop beside the benchmark (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("ours", "reference", "paired", "neighbour"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ref_queries < 0 or args.repeats < 1:
        parser.error("--ref-queries must be >= 0 and --repeats >= 1")
    return args


def make_embeddings(num_queries: int, num_gallery: int, num_ids: int, features: str, seed: int,
                    device: torch.device):
    """L2-normalised caption (Q, D) and image (G, D) embeddings with their pids."""
    gen = torch.Generator().manual_seed(seed)
    if features == "grouped":
        groups, id_spread, noise, noise_spread = 50, 0.5, 1.5, 0.3
        group_dirs = F.normalize(torch.randn(groups, EMBED_DIM, generator=gen), dim=1)
        group_of_id = torch.randint(0, groups, (num_ids,), generator=gen)
        centres = group_dirs[group_of_id] + id_spread * torch.randn(num_ids, EMBED_DIM, generator=gen) / EMBED_DIM**0.5
    else:
        noise, noise_spread = 2.5, 0.0
        centres = torch.randn(num_ids, EMBED_DIM, generator=gen)
    centres = F.normalize(centres, dim=1)  # num_ids, D

    def sample(pids: torch.Tensor) -> torch.Tensor:
        scale = noise * torch.exp(noise_spread * torch.randn(len(pids), 1, generator=gen))
        feats = centres[pids] + scale * torch.randn(len(pids), EMBED_DIM, generator=gen) / EMBED_DIM**0.5
        return F.normalize(feats, dim=1).to(device)

    # Every identity appears on both sides, about equally often.
    query_pids = torch.randperm(num_queries, generator=gen) % num_ids
    gallery_pids = torch.randperm(num_gallery, generator=gen) % num_ids
    return sample(query_pids), sample(gallery_pids), query_pids.to(device), gallery_pids.to(device)


def reference_rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, max_rank: int = 10):
    """The field's usual full-sort ranking; returns (cmc (max_rank,), mAP, mINP) in percent."""
    indices = torch.argsort(similarity, dim=1, descending=True, stable=True)  # Q, G
    pred_labels = g_pids[indices]  # Q, G
    matches = pred_labels.eq(q_pids.view(-1, 1))  # Q, G

    cmc = matches[:, :max_rank].cumsum(1)
    cmc[cmc > 1] = 1
    cmc = cmc.float().mean(0) * 100

    num_rel = matches.sum(1)  # Q
    hits_so_far = matches.cumsum(1)  # Q, G
    inp = []
    for i, match_row in enumerate(matches):
        last = match_row.nonzero()[-1]
        inp.append(hits_so_far[i][last] / (last + 1.0))
    mINP = torch.cat(inp).mean() * 100

    positions = torch.arange(1, matches.shape[1] + 1, device=matches.device)
    precision = hits_so_far / positions * matches
    AP = precision.sum(1) / num_rel
    mAP = AP.mean() * 100
    return cmc, mAP, mINP


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def implementations(chunk_size: int | None) -> dict:
    """{"ours": retrieval_metrics, "reference": reference_rank}, both (sim, q_pids, g_pids) -> metrics dict."""
    from utils.metrics import retrieval_metrics
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}

    def ours(sim, qp, gp):
        return retrieval_metrics(sim, qp, gp, **kwargs)

    def reference(sim, qp, gp):
        cmc, mAP, mINP = reference_rank(sim, qp, gp)
        return {"R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9]), "mAP": float(mAP),
                "mINP": float(mINP)}

    return {"ours": ours, "reference": reference}


def timed(device: torch.device, fn, *args):
    """(seconds, fn(*args)), with the device synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - start, out


def _setup(args: argparse.Namespace):
    """A worker's threads, device and synthetic embeddings (with their pids) of --size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    num_queries, num_gallery, num_ids = SIZES[args.size]
    return (device, *make_embeddings(num_queries, num_gallery, num_ids, args.features, args.seed, device))


def run_worker(args: argparse.Namespace) -> dict:
    """Build the data, time the similarity and the metrics, report everything as a dict."""
    device, queries, gallery, query_pids, gallery_pids = _setup(args)
    num_queries, num_gallery = len(queries), len(gallery)
    timed_queries = num_queries
    if args.worker == "reference" and args.ref_queries:
        timed_queries = min(args.ref_queries, num_queries)
        queries, query_pids = queries[:timed_queries], query_pids[:timed_queries]
    impls = implementations(args.chunk_size)
    compute = impls[args.worker]

    # Warm-up on a small block: thread pools, allocator, lazy CUDA init.
    compute(queries[:64] @ gallery.t(), query_pids[:64], gallery_pids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    similarity_s, similarity = timed(device, torch.matmul, queries, gallery.t())  # Q, G
    metric_s = float("inf")
    for _ in range(args.repeats):
        seconds, metrics = timed(device, compute, similarity, query_pids, gallery_pids)
        metric_s = min(metric_s, seconds)

    result = {"impl": args.worker, "size": args.size, "queries": timed_queries, "gallery": num_gallery,
              "similarity_s": similarity_s, "metric_s": metric_s, "metrics": metrics,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "threads": torch.get_num_threads()}
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.worker == "ours" and args.ref_queries:
        # The same subset the reference ranked, for the agreement check.
        subset = min(args.ref_queries, num_queries)
        result["subset_metrics"] = compute(similarity[:subset], query_pids[:subset], gallery_pids)
    return result


def run_paired(args: argparse.Namespace) -> dict:
    """Speed ratios from one process: the two implementations alternate on one block, round by round.

    Side by side they see the same load, which the separate workers (there for
    their peak memory) do not: beside a busy neighbour their times come from
    different moments. The reference ranks the first --ref-queries queries and
    its time is scaled to all of them.
    """
    device, queries, gallery, query_pids, gallery_pids = _setup(args)
    num_queries = len(queries)
    ref_queries = min(args.ref_queries or num_queries, num_queries)
    impls = implementations(args.chunk_size)
    for compute in impls.values():
        compute(queries[:64] @ gallery.t(), query_pids[:64], gallery_pids)
    similarity = queries @ gallery.t()  # Q, G
    ratios = []
    for _ in range(args.repeats):
        ours_s, _ = timed(device, impls["ours"], similarity, query_pids, gallery_pids)
        reference_s, _ = timed(device, impls["reference"], similarity[:ref_queries], query_pids[:ref_queries],
                               gallery_pids)
        ratios.append(reference_s * num_queries / ref_queries / ours_s)
    return {"ratios": ratios}


def run_neighbour() -> None:
    """Training steps of the tiny CoMoE model until SIGTERM; "ready" after the first, then its rate as JSON."""
    from benchmarks.bench_train_step import build_config, synthetic_batch
    from benchmarks.bench_train_step import parse_args as train_step_args
    from model import build_model
    from solver import optimizer_from_config

    train_args = train_step_args([])
    torch.manual_seed(0)
    cfg = build_config(train_args, "fp32", compiled=False)
    model = build_model(cfg).train()
    optimizer = optimizer_from_config(model, cfg.solver)
    batch = synthetic_batch(train_args.batch_size, tuple(train_args.image_size), model.backbone.vocab_size,
                            torch.device("cpu"), uint8=False)
    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    steps, start = -1, time.perf_counter()
    while not stop:
        sum(model(batch).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps == 0:  # the first step builds the optimizer state: not counted
            print("ready", flush=True)
            start = time.perf_counter()
    print(json.dumps({"steps": steps, "seconds": time.perf_counter() - start}), flush=True)


@contextmanager
def neighbour_load(enabled: bool):
    """Runs `run_neighbour` in a child process for the block; yields a dict that receives its step rate."""
    if not enabled:
        yield {}
        return
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_eval", "--worker", "neighbour"],
                            cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, text=True)
    rate = {}
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the --neighbour training process failed (exit code {proc.wait()})")
        yield rate
    finally:
        proc.terminate()
        lines = proc.communicate()[0].strip().splitlines()
        if lines and lines[-1].startswith("{"):
            rate.update(json.loads(lines[-1]))


def worker_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def spawn(args: argparse.Namespace, impl: str, size: str) -> dict:
    """Run one implementation in a fresh interpreter; its peak RSS is its own."""
    command = [sys.executable, "-m", "benchmarks.bench_eval", "--worker", impl, "--size", size,
               "--device", args.device, "--features", args.features, "--repeats", str(args.repeats),
               "--seed", str(args.seed), "--ref-queries", str(args.ref_queries)]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, cwd=ROOT, env=worker_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        hint = " (killed: out of memory? try --ref-queries N)" if proc.returncode in (-9, 137) else ""
        raise SystemExit(f"{impl} worker for size={size} failed with exit code {proc.returncode}{hint}:\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    header = (f"{'size':<5} {'impl':<10} {'thr':>3} {'queries':>7} {'gallery':>7} {'sim s':>7} {'metric s':>9} "
              f"{'peak RSS GiB':>12} " + " ".join(f"{k:>7}" for k in METRIC_KEYS))
    print(header)
    print("-" * len(header))
    for row in rows:
        cuda = f"  (CUDA peak {row['peak_cuda_gib']:.2f} GiB)" if "peak_cuda_gib" in row else ""
        print(f"{row['size']:<5} {row['impl']:<10} {row['threads']:>3} {row['queries']:>7} {row['gallery']:>7} "
              f"{row['similarity_s']:>7.2f} {row['metric_s']:>9.2f} {row['peak_rss_gib']:>12.2f} "
              + " ".join(f"{row['metrics'][k]:>7.3f}" for k in METRIC_KEYS) + cuda)


def main(argv=None) -> dict[str, float]:
    """Runs the benchmark; returns the one-process speed ratio (median) of each size."""
    args = parse_args(argv)
    if args.worker == "neighbour":
        run_neighbour()
        return {}
    if args.worker:
        print(json.dumps(run_paired(args) if args.worker == "paired" else run_worker(args)))
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available here; use --device cpu")
    sizes = ("icfg", "cuhk") if args.size == "both" else (args.size,)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f} at start), device={args.device}, features={args.features}"
          + (", beside a training step in a loop (--neighbour)" if args.neighbour else ""))

    rows, notes, ratios, paired, agree = [], [], {}, {}, True
    with neighbour_load(args.neighbour) as neighbour:
        for size in sizes:
            ours = spawn(args, "ours", size)
            rows.append(ours)
            if args.skip_reference:
                continue
            ref = spawn(args, "reference", size)
            rows.append(ref)
            full_queries = SIZES[size][0]
            expected = ours["metrics"]
            ref_metric_s = ref["metric_s"]
            if ref["queries"] < full_queries:
                expected = ours["subset_metrics"]
                ref_metric_s *= full_queries / ref["queries"]
                notes.append(f"{size}: reference ran on the first {ref['queries']} of {full_queries} queries; its "
                             f"metric time is extrapolated linearly to {ref_metric_s:.2f} s, its peak RSS is for "
                             f"the subset, and agreement is checked on that subset")
            diff = max(abs(expected[k] - ref["metrics"][k]) for k in METRIC_KEYS)
            agree &= diff <= TOLERANCE
            status = "OK" if diff <= TOLERANCE else "MISMATCH"
            notes.append(f"{size}: max |ours - reference| over {', '.join(METRIC_KEYS)} = {diff:.2e} ({status}, "
                         f"tolerance {TOLERANCE:g})")
            ratios[size] = ref_metric_s / ours["metric_s"]
            paired[size] = spawn(args, "paired", size)["ratios"]

    print_table(rows)
    for note in notes:
        print(note)
    if neighbour:
        print(f"neighbour: {neighbour['steps']} training steps in {neighbour['seconds']:.0f} s after its first "
              f"({neighbour['seconds'] / max(neighbour['steps'], 1):.2f} s per step)")
    if ratios:
        print(f"speed ratio (reference metric time / retrieval_metrics time), separate processes, best of "
              f"{args.repeats}: " + ", ".join(f"{size} {ratio:.1f}x" for size, ratio in ratios.items()))
        print(f"speed ratio in one process, the two alternating, median of {args.repeats} rounds (lowest-highest): "
              + ", ".join(f"{size} {statistics.median(r):.1f}x ({min(r):.1f}-{max(r):.1f}x)"
                          for size, r in paired.items()))
    if not agree:
        raise SystemExit(1)
    return {size: statistics.median(r) for size, r in paired.items()}


if __name__ == "__main__":
    main()
