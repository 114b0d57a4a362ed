"""Samples/s and peak memory of one full CoMoE training step, per precision.

A step is ``processor.trainer.Trainer._step``, the trainer's own code: forward
through CLIP and the CoMoE head, the configured losses (default
``sdm+itc+coar``), backward, the finiteness check and ``optimizer.step()``
(AdamW with the project's parameter groups; fused on CUDA, so a non-finite step
is skipped on the device and the step never waits for it). ``--compile on``
sets ``solver.compile=true`` (``model.compile()``; ``--compile-mode
reduce-overhead`` adds CUDA graphs), ``--checkpointing``
``model.grad_checkpointing=true``. Batches are synthetic and already on the
device: 384x128 images, captions of 15-60 tokens in 77 positions, 4 images
per identity (so SDM has positives).

Each configuration runs in its own child process, so peak memory is its
own: on the CPU the peak resident set size over all steps (sampled every
2 ms), on CUDA ``torch.cuda.max_memory_allocated``; the table shows the
growth over what was held before the first step (model, batch: so the
growth holds activations, gradients and the optimizer state) and, in
brackets, the total. CPU figures include the allocator's slack. Model FLOPs per step are
counted once with ``torch.utils.flop_counter.FlopCounterMode`` over forward
and backward (the optimizer's few FLOPs are left out; with
``--checkpointing`` the recomputed forward counts too, so the MFU column is
then hardware FLOPs utilisation); model FLOPs
utilisation (MFU) = FLOPs per step x steps/s / the GPU's dense peak for the
precision the matmuls run in:

    GPU                      bf16 / fp16     TF32        fp32
    H100 SXM, H200           989.4 TFLOP/s   494.7       66.9
    H100 PCIe                756.0           378.0       51.2
    A100                     312.0           156.0       19.5

fp32 runs use TF32 tensor cores only with ``--tf32`` (as the trainer: off);
``--peak-tflops`` overrides the table (and gives a CPU an MFU).

    python -m benchmarks.bench_train_step                        # CPU, tiny CoMoE model, fp32 vs bf16
    python -m benchmarks.bench_train_step --full --device cuda --precisions fp32 bf16 fp16 --compile both
    python -m benchmarks.bench_train_step --full --device cuda --checkpointing --channels-last

The tiny model is ``configs/demo.yaml``'s architecture at 384x128 with patch
16 and 77-token captions; ``--full`` is ViT-B/16 with random weights. The
last line is the ratio of bf16 to fp32 samples/s (eager).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
TINY_ARCH = ("{embed_dim: 128, patch_size: 16, vision_width: 128, vision_layers: 3, vision_heads: 4, "
             "text_width: 128, text_layers: 3, text_heads: 4, context_length: 77}")
TINY_HEAD = ["moe.layers=2", "moe.heads=4", "moe.reduction=4"]
# Dense peak FLOP/s (no sparsity) by GPU name fragment, checked in order: bf16/fp16, TF32, fp32.
PEAK_TFLOPS = (
    ("H100 PCIe", {"half": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"half": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"half": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", {"half": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"half": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--full", action="store_true", help="full ViT-B/16 (random weights) instead of the tiny model")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="default: fp32 bf16 on the CPU, fp32 bf16 fp16 on CUDA (fp16 with a grad scaler)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile the model (both: eager and compiled rows)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"),
                        default="default", help="solver.compile_mode of the compiled rows")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--losses", default="sdm+itc+coar", help="loss.names of the model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 1 CPU, 10 CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 CPU, 30 CUDA)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing of every backbone transformer block")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels-last images and patch-embedding weights")
    parser.add_argument("--batch-augment", action="store_true",
                        help="feed uint8 images and run datasets.cache.BatchAugment inside the step")
    parser.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                        help="fused AdamW (auto: on CUDA, as solver.build_optimizer does)")
    parser.add_argument("--tf32", action="store_true", help="TF32 tensor cores for fp32 matmuls on CUDA")
    parser.add_argument("--check-syncs", action="store_true",
                        help="CUDA: count host-device syncs in one step (torch.cuda sync debug mode)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile 3 steps with torch.profiler: per-op table and trace in DIR")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s for the MFU column (overrides the GPU table)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- building --------------------------------------------------------------------------------------

def build_config(args: argparse.Namespace, precision: str, compiled: bool):
    from utils.config import load_config
    height, width = args.image_size
    kernel = {"auto": "auto", "on": "fused", "off": "foreach"}[args.fused]
    overrides = ["model.pretrain=none", "model.stride=16", f"input.size=[{height},{width}]",
                 f"solver.batch_size={args.batch_size}", f"solver.precision={precision}",
                 f"loss.names={args.losses}", "dataset.text_length=77", f"device={args.device}",
                 f"solver.optimizer_kernel={kernel}", f"solver.compile={str(compiled).lower()}",
                 f"solver.compile_mode={args.compile_mode}",
                 f"solver.tf32={str(args.tf32).lower()}",
                 f"model.grad_checkpointing={str(args.checkpointing).lower()}"]
    if not args.full:
        overrides += [f"model.arch={TINY_ARCH}", *TINY_HEAD]
    return load_config(None, overrides)


def synthetic_batch(batch_size: int, image_size, vocab_size: int, device: torch.device, uint8: bool) -> dict:
    """A training batch on ``device``: images, 77-token captions of 15-60 tokens, 4 images per identity."""
    from utils.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(15, 61, (batch_size,), generator=g)
    caption_ids = torch.zeros(batch_size, 77, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        caption_ids[row, 0] = SOT_TOKEN_ID
        caption_ids[row, 1:length + 1] = torch.randint(1, min(vocab_size, SOT_TOKEN_ID) - 1, (length,), generator=g)
        caption_ids[row, length + 1] = EOT_TOKEN_ID
    batch = {"caption_ids": caption_ids, "pids": torch.arange(batch_size) // 4,
             "image_ids": torch.arange(batch_size)}
    if uint8:
        batch["images_uint8"] = torch.randint(0, 256, (batch_size, 3, *image_size), dtype=torch.uint8, generator=g)
        batch["aug_seeds"] = torch.randint(0, 2**62, (batch_size,), generator=g)
    else:
        batch["images"] = torch.randn(batch_size, 3, *image_size, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


class BatchStub:
    """Stands in for the train loader: the Trainer asks it to prepare each batch."""

    def __init__(self, augment, channels_last: bool):
        self.augment = augment
        self.channels_last = channels_last

    def prepare_batch(self, batch: dict, device: torch.device, keys=None) -> dict:
        batch = dict(batch)
        if self.augment is not None:
            batch["images"] = self.augment(batch.pop("images_uint8"), batch.pop("aug_seeds"))
        if self.channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        return batch


# -- one configuration (child process) ------------------------------------------------------------

def run_config(args: argparse.Namespace, precision: str, compiled: bool) -> dict:
    """Times ``processor.trainer.Trainer._step``, the trainer's own step, on one batch."""
    import tempfile

    from datasets.cache import BatchAugment
    from datasets.transforms import ImageAugment
    from model import build_model
    from processor.runner import compile_training_model, configure_backends
    from processor.trainer import Trainer
    from solver import build_scheduler, optimizer_from_config
    from utils.misc import autocast

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    cfg = build_config(args, precision, compiled)
    configure_backends(cfg)
    model = build_model(cfg).to(device).train()
    image_size = tuple(args.image_size)
    batch = synthetic_batch(args.batch_size, image_size, model.backbone.vocab_size, device, args.batch_augment)
    if args.channels_last:
        model.backbone.visual.conv1.to(memory_format=torch.channels_last)
    augment = BatchAugment(image_size, ImageAugment()) if args.batch_augment else None
    stub = BatchStub(augment, args.channels_last)
    optimizer = optimizer_from_config(model, cfg.solver)
    scheduler = build_scheduler(optimizer, steps_per_epoch=1000, num_epoch=1, warmup_epochs=0,
                                warmup_factor=1.0, min_lr_factor=1.0)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    compile_training_model(model, cfg)  # what solver.compile=true does
    trainer = Trainer(cfg, model, stub, None, optimizer, scheduler, scaler, device,
                      Path(tempfile.mkdtemp(prefix="bench_train_step_")))

    def step() -> torch.Tensor:
        return trainer._step(batch)[0]["loss"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 1)
    steps = args.steps if args.steps is not None else (30 if device.type == "cuda" else 3)
    # Memory: the peak over all steps (the first creates the optimizer state) above what
    # was held before the first step (model, batch).
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss_bytes()
        sampler = RssSampler()
        sampler.start()
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.stop()
    memory = {"peak_bytes": peak, "step_bytes": peak - base}

    syncs = None
    if args.check_syncs and device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum(str(w.message).startswith("called a synchronizing") for w in caught)
    if args.profile:
        profile_steps(args, precision, compiled, step, sync)

    # Model FLOPs of the step's math, counted after the timing (so the memory figures
    # start from a clean state) on the eager forward (`forward` bypasses a compiled __call__).
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, precision):
            losses = model.forward(stub.prepare_batch(batch, device))
        sum(losses.values()).backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    compile_stats = {}
    if compiled:  # what dynamo and inductor did: graphs, graph breaks, CUDA-graph skips
        from torch._dynamo.utils import counters
        compile_stats = {"graphs": counters["stats"]["unique_graphs"],
                         "graph_breaks": sum(counters["graph_break"].values()),
                         "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    return {**compile_stats, "precision": precision, "compiled": compiled, "samples_per_s": args.batch_size * steps / elapsed,
            "ms_per_step": elapsed / steps * 1000, "flops_per_step": flops, "warmup_s": warmup_s,
            "loss": float(loss), "fused_optimizer": trainer.skip_on_device, "syncs_per_step": syncs,
            "nonfinite_steps": trainer.nonfinite_steps + trainer._unreported_nonfinite(), **memory}


def profile_steps(args: argparse.Namespace, precision: str, compiled: bool, step, sync) -> None:
    """Three steps under torch.profiler: a per-op table (device time first) and a trace."""
    from torch.profiler import ProfilerActivity, profile
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{precision}{'_compiled' if compiled else ''}_b{args.batch_size}"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        sync()
    wall = (time.perf_counter() - start) / 3
    sort = "self_cuda_time_total" if ProfilerActivity.CUDA in activities else "self_cpu_time_total"
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 3
    kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 3
    table = events.table(sort_by=sort, row_limit=30, max_name_column_width=60)
    summary = (f"{name}: wall {wall * 1000:.1f} ms/step under the profiler; device kernels "
               f"{device_us / 1000:.1f} ms/step (busy {device_us / 1000 / (wall * 1000) * 100:.0f}%), "
               f"{kernels:.0f} kernels/step")
    (out / f"profile_{name}.txt").write_text(summary + "\n" + table)
    trace = out / f"trace_{name}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    print(summary, file=sys.stderr)


def _current_rss_bytes() -> int:
    """Resident set size now (Linux); elsewhere the peak so far (ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class RssSampler(threading.Thread):
    """Peak resident set size while it runs, sampled every ``interval`` seconds.

    ru_maxrss is a process-lifetime maximum (it would include start-up);
    sampling gives the peak of the steps alone.
    """

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _current_rss_bytes()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, _current_rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _current_rss_bytes())


# -- the parent: one child per configuration, then the table ----------------------------------------

def peak_tflops(args: argparse.Namespace, precision: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(args.device))
    kind = "half" if precision in ("bf16", "fp16") else ("tf32" if args.tf32 else "fp32")
    for fragment, table in PEAK_TFLOPS:
        if fragment in name:
            return table[kind]
    return None


def run_child(argv: list[str], precision: str, compiled: bool) -> dict:
    spec = json.dumps({"precision": precision, "compiled": compiled})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_step", *argv, "--child", spec],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"precision": precision, "compiled": compiled, "error": (proc.stderr or proc.stdout).strip()[-800:]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(run_config(args, spec["precision"], spec["compiled"])), flush=True)
        return []

    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "bf16"] if device.type == "cpu" else ["fp32", "bf16", "fp16"])
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = [run_child(argv, precision, compiled) for compiled in compile_modes for precision in precisions]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"CoMoE training step ({'ViT-B/16' if args.full else 'tiny model'}, losses {args.losses}), "
          f"{args.image_size[0]}x{args.image_size[1]}, batch {args.batch_size}, 77-token captions; "
          f"{device} ({where}), torch {torch.__version__}"
          + (", gradient checkpointing" if args.checkpointing else "")
          + (", channels-last" if args.channels_last else "")
          + (", BatchAugment in the step" if args.batch_augment else "")
          + (", TF32" if args.tf32 else "")
          + (f", compile mode {args.compile_mode}" if args.compile_mode != "default" else ""))
    flops = next((r["flops_per_step"] for r in results if r.get("flops_per_step")), None)
    if flops:
        print(f"model FLOPs per step (forward + backward): {flops / 1e12:.3f} TFLOP "
              f"({flops / args.batch_size / 1e9:.1f} GFLOP per sample)")
    mem_label = "peak RSS: step (total)" if device.type == "cpu" else "peak alloc: step (total)"
    print(f"{'precision':<12}{'compile':<9}{'samples/s':>10}{'ms/step':>10}{mem_label:>24}{'TFLOP/s':>9}"
          f"{'MFU':>8}" + ("  syncs/step" if args.check_syncs else ""))
    for r in results:
        label = r["precision"] + ("+scaler" if r["precision"] == "fp16" else "")
        if "error" in r:
            print(f"{label:<12}{'yes' if r['compiled'] else 'no':<9} failed: {r['error'].splitlines()[-1]}")
            continue
        achieved = flops * r["samples_per_s"] / args.batch_size if flops else None
        peak = peak_tflops(args, r["precision"])
        mfu = f"{achieved / (peak * 1e12) * 100:7.1f}%" if achieved and peak else f"{'n/a':>8}"
        memory = f"{r['step_bytes'] / 2**20:8.0f} MiB (total {r['peak_bytes'] / 2**30:.2f} GiB)"
        tflops = f"{achieved / 1e12:9.3f}" if achieved else f"{'n/a':>9}"
        print(f"{label:<12}{'yes' if r['compiled'] else 'no':<9}{r['samples_per_s']:10.1f}{r['ms_per_step']:10.1f}"
              f"{memory:>24}{tflops}{mfu}"
              + (f"  {r['syncs_per_step']}" if args.check_syncs else ""))
    for r in results:
        if r["compiled"] and "error" not in r:
            graphs = (f", CUDA graphs skipped {r['cudagraph_skips']} time(s)"
                      if args.compile_mode == "reduce-overhead" else "")
            print(f"compiled {r['precision']}: {r['graphs']} graph(s), {r['graph_breaks']} graph break(s)"
                  f"{graphs}; compiling and warm-up took {r['warmup_s']:.0f} s")
    by_key = {(r["precision"], r["compiled"]): r for r in results if "error" not in r}
    for compiled in compile_modes:
        fp32, bf16 = by_key.get(("fp32", compiled)), by_key.get(("bf16", compiled))
        if compiled and fp32 and bf16:
            print(f"ratio bf16 / fp32 samples/s (compiled): {bf16['samples_per_s'] / fp32['samples_per_s']:.2f}x")
    fp32, bf16 = by_key.get(("fp32", False)), by_key.get(("bf16", False))
    if fp32 and bf16:
        print(f"ratio bf16 / fp32 samples/s (eager): {bf16['samples_per_s'] / fp32['samples_per_s']:.2f}x")
    return results


if __name__ == "__main__":
    main()
