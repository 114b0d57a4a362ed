"""Training-data throughput: the reference per-sample path against the image cache.

Generates a synthetic dataset in CUHK-PEDES's on-disk format (crops 56-160
pixels wide, as real pedestrian crops) into a temporary folder, then
measures training images/s of ``build_train_loader`` at the same batch size,
image size, augmentation and number of loader workers:

  reference   per-sample PIL decode + torchvision transforms in the workers
              (IRRA's pipeline: resize, flip, pad + crop, normalise, erasing);
  cached      uint8 rows of the memory-mapped image cache, collated by the
              workers, augmented batch-wise by ``BatchAugment`` in the main
              process (what ``prepare_batch`` does on a CPU training device);
  cached, augmented in workers
              the same, with the workers augmenting their own batches.

Every batch is taken through ``loader.prepare_batch(batch, cpu)`` and one
value of each memory page of its images is read, so the timed work ends
with training-ready float batches in the main process (a batch that a
worker left in shared memory costs page faults on first access). Each path is measured in
several rounds (alternating order, fresh workers) and the median reported,
so that other load on the machine weighs on every path alike. The one-off
cost of building the cache is reported apart. The last line is the ratio of
the cached path (the faster variant) to the reference.

    python -m benchmarks.bench_data                     # ~1,000 images, 2 workers, 384x128, batch 64
    python -m benchmarks.bench_data --rounds 5 --workers 4
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch

from datasets import ImageAugment, build_dataset, build_train_loader
from datasets.cache import ImageCache
from datasets.synth import generate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="training images to generate (about)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40,
                        help="timed batches per path and round (after one untimed warm-up batch)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per path (the median is reported)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes of every path")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (the loader workers take the other cores)")
    parser.add_argument("--root", default=None,
                        help="folder for the generated data and the cache (default: a temporary folder, removed)")
    return parser.parse_args(argv)


def make_dataset(root: str, num_images: int):
    """A CUHK-PEDES-format dataset with about ``num_images`` training images (2 captions each)."""
    per_id, train_share = (4, 6), 0.9
    num_ids = math.ceil(num_images / (sum(per_id) / 2 * train_share))
    if not os.path.isfile(os.path.join(root, "CUHK-PEDES", "reid_raw.json")):
        generate(root, "cuhk", num_ids=num_ids, seed=0, images_per_id=per_id,
                 split_fractions=(train_share, (1 - train_share) / 2, (1 - train_share) / 2))
    return build_dataset("CUHK-PEDES", root)


def images_per_second(loader, batches: int) -> float:
    """Training images/s over ``batches`` batches, after one untimed batch (worker start-up)."""
    cpu = torch.device("cpu")
    seen, epoch, started = -1, 0, None
    count = 0
    while seen < batches:
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            batch = loader.prepare_batch(batch, cpu)
            # Read one value per 4 KiB page, as a training step reads the whole batch: the first
            # access to a worker's shared-memory batch faults its pages into this process.
            float(batch["images"].view(-1)[::1024].sum())
            if seen == -1:
                started = time.perf_counter()
            else:
                count += batch["images"].shape[0]
            seen += 1
            if seen == batches:
                break
        epoch += 1
    return count / (time.perf_counter() - started)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = args.root or tempfile.mkdtemp(prefix="bench_data_")
    try:
        start = time.perf_counter()
        dataset = make_dataset(root, args.num_images)
        num_images = len({item.path for item in dataset.train})
        print(f"data: {num_images} training images, {len(dataset.train)} captions (generated in "
              f"{time.perf_counter() - start:.0f}s) under {root}")
        size = tuple(args.image_size)
        common = dict(batch_size=args.batch_size, image_size=size, augment=ImageAugment(), seed=0,
                      num_workers=args.workers, persistent_workers=True)
        cache_dir = os.path.join(root, ".cache")
        shutil.rmtree(cache_dir, ignore_errors=True)
        start = time.perf_counter()
        ImageCache.open([item.path for item in dataset.train], size, cache_dir, num_workers=args.workers)
        build_s = time.perf_counter() - start

        load_before = os.getloadavg()[0]
        loaders = {
            "reference": lambda: build_train_loader(dataset, **common),
            "cached": lambda: build_train_loader(dataset, cache_dir=cache_dir, **common),
            "cached_in_workers": lambda: build_train_loader(dataset, cache_dir=cache_dir, augment_in_workers=True,
                                                            **common),
        }
        # Rounds in alternating order (A B C, C B A, ...), fresh workers each time, median per path:
        # other load on the machine then weighs on every path alike.
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for round_index in range(args.rounds):
            for name in (list(loaders) if round_index % 2 == 0 else list(reversed(loaders))):
                rates[name].append(images_per_second(loaders[name](), args.batches))
        result = {name: statistics.median(values) for name, values in rates.items()}

        print(f"{size[0]}x{size[1]}, batch {args.batch_size}, {args.workers} loader workers, flip + pad "
              f"{ImageAugment().padding} crop + erasing {ImageAugment().erasing}, median of {args.rounds} rounds of "
              f"{args.batches} timed batches; "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), main process "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; load average "
              f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        print(f"cache build (once): {build_s:.1f}s for {num_images} images "
              f"({num_images / build_s:.0f} images/s, {num_images * 3 * size[0] * size[1] / 1e6:.0f} MB)")
        def show(label: str, name: str) -> None:
            spread = ", ".join(f"{v:.0f}" for v in rates[name])
            print(f"{label:<50}{result[name]:8.1f} images/s   (rounds: {spread})")

        show("reference (PIL decode + torchvision per sample):", "reference")
        show("cached, BatchAugment in the main process:", "cached")
        show("cached, BatchAugment in the loader workers:", "cached_in_workers")
        best = max(result["cached"], result["cached_in_workers"])
        result["ratio"] = best / result["reference"]
        print(f"ratio cached / reference: {result['ratio']:.2f}x")
        return result
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
