"""Dataset registry and DataLoader construction.

Randomness of training data, all derived from ``seed``:
- batch composition: the sampler's order of ``(seed, epoch)``;
- augmentation of the sample in slot j of global batch b of epoch e: a sample
  seed drawn from ``(seed, e)`` for (b, j) (see ``datasets.sampler``).
So a run resumed at (epoch, batch) with ``set_epoch(epoch, start_batch=batch)``
sees the same batches, augmented the same way, whatever the number of workers
or ranks. Worker processes additionally get Python/NumPy seeds from torch's
per-worker seed (only relevant for code that uses those generators).

Two image paths, chosen by ``cache_dir``: without it (the reference), every
sample is decoded and augmented on its own by torchvision in the loader
workers; with it, images are decoded and resized once into an
``datasets.cache.ImageCache`` and the loader yields uint8 images with their
sample seeds, which ``loader.prepare_batch(batch, device)`` augments
batch-wise on the training device (``datasets.cache.BatchAugment``: the same
augmentation distribution, drawn from the same sample seeds).
"""
from __future__ import annotations

import logging
import os
import random
from typing import Sequence

import numpy as np
import torch
from prettytable import PrettyTable
from torch.utils.data import DataLoader

from datasets.bases import ImageDataset, ImageTextDataset, TextDataset
from datasets.cache import AugmentingCollate, BatchAugment, ImageCache, Uint8Normalize
from datasets.pedes import EvalSplit, PedesDataset, TrainItem
from datasets.registry import get_dataset_class
from datasets.sampler import IdentityBatchSampler, RandomBatchSampler
from datasets.transforms import ImageAugment, TextAugment, build_eval_transform, build_train_transform
from utils.signals import ignore_stop_signals

logger = logging.getLogger(__name__)

SAMPLERS = ("random", "identity")


def build_dataset(name: str, root: str | os.PathLike, val_ids: int | None = None, seed: int = 0,
                  check_images: bool = True) -> PedesDataset:
    """Load dataset ``name`` from ``{root}/{folder}`` (see ``PedesDataset`` for ``val_ids``)."""
    return get_dataset_class(name)(root, val_ids=val_ids, seed=seed, check_images=check_images)


def statistics_table(dataset: PedesDataset) -> PrettyTable:
    """Identities, images and captions per split as used for training and evaluation
    (val: the dataset's own split or the held-out training identities)."""
    table = PrettyTable(["split", "ids", "images", "captions"])
    table.add_row(["train", dataset.num_train_pids, len({item.image_id for item in dataset.train}),
                   len(dataset.train)])
    for name, split in (("val", dataset.val), ("test", dataset.test)):
        if split is None:
            table.add_row([name, 0, 0, 0])
        else:
            table.add_row([name, split.num_ids, len(split.image_paths), len(split.captions)])
    return table


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def init_worker(worker_id: int) -> None:
    """A DataLoader worker's start: seeded (`seed_worker`), and deaf to SIGTERM/SIGINT,
    which the training process handles for it (see utils.signals)."""
    ignore_stop_signals()
    seed_worker(worker_id)


class TrainLoader(DataLoader):
    """A DataLoader whose batches go through ``prepare_batch`` before the model.

    ``prepare_batch(batch, device, keys)`` moves the batch's tensors (only
    those named in ``keys``, if given) to ``device`` (non-blocking) and, when
    the loader yields cached uint8 images (``"images_uint8"`` +
    ``"aug_seeds"``), augments them there into ``"images"`` (B, 3, H, W)
    float32. Batches of the reference path only move.
    """

    def __init__(self, *args, batch_augment: BatchAugment | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_augment = batch_augment
        # Workers that already flipped and shifted leave only normalisation and erasing.
        self._finish = self.collate_fn.finish if isinstance(self.collate_fn, AugmentingCollate) else batch_augment

    def prepare_batch(self, batch: dict, device: torch.device, keys: Sequence[str] | None = None) -> dict:
        wanted = None if keys is None else {*keys, "images_uint8", "aug_seeds"}
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
                 if wanted is None or k in wanted}
        if "images_uint8" in batch:
            batch["images"] = self._finish(batch.pop("images_uint8"), batch.pop("aug_seeds"))
        return batch


def build_train_loader(dataset: PedesDataset | Sequence[TrainItem], *, batch_size: int,
                       sampler: str = "random", num_instances: int = 4,
                       image_size: tuple[int, int] = (384, 128), augment: ImageAugment | None = None,
                       text_length: int = 77, text_aug: TextAugment | None = None,
                       num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                       seed: int = 0, rank: int = 0, world_size: int = 1,
                       skip_bad_images: bool = False, cache_dir: str | os.PathLike | None = None,
                       augment_in_workers: bool = False, drop_last: bool = True,
                       interpolation: str = "bicubic", load_truncated: bool = False) -> TrainLoader:
    """DataLoader of training batches ``{"images": B,3,H,W, "caption_ids": B,L, "pids": B, "image_ids": B}``.

    ``batch_size`` is the global batch; this rank gets ``batch_size // world_size``
    samples per step. The loader's ``batch_sampler`` has ``set_epoch(epoch,
    start_batch=0)``; call it before every epoch. ``persistent_workers`` only
    applies with ``num_workers > 0``, ``pin_memory`` only when CUDA is available.
    Pass every batch through ``loader.prepare_batch(batch, device)``.
    ``drop_last=False`` keeps the last incomplete batch of the random sampler,
    smaller (IRRA; one process). ``interpolation`` ("bicubic" or "bilinear") is
    the resize kernel and ``load_truncated`` decodes truncated image files as far
    as they go (IRRA).

    ``cache_dir``: None decodes and augments every sample in the workers (the
    reference path). A folder: the images are decoded once into an image
    cache there (built with ``num_workers`` processes on first use, rebuilt
    when the images or the size change), batches carry ``"images_uint8":
    B,3,H,W uint8`` and ``"aug_seeds": B`` and ``prepare_batch`` augments them
    on ``device``. With ``augment_in_workers`` the loader workers flip and
    crop (still uint8) and ``prepare_batch`` normalises and erases: for CPU
    training, where the workers run beside the model.
    """
    items = dataset.train if isinstance(dataset, PedesDataset) else list(dataset)
    if not items:
        raise ValueError("The training set is empty.")
    if sampler == "random":
        batch_sampler = RandomBatchSampler(len(items), batch_size, seed, rank, world_size, drop_last=drop_last,
                                           yield_seeds=True, keep_partial=not drop_last)
    elif sampler == "identity":
        batch_sampler = IdentityBatchSampler([item.pid for item in items], batch_size, num_instances, seed,
                                             rank, world_size, yield_seeds=True)
    else:
        raise ValueError(f"sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    batch_augment, collate_fn = None, None
    if cache_dir is None:
        data = ImageTextDataset(items, build_train_transform(image_size, augment, interpolation), text_length,
                                text_aug, skip_bad_images=skip_bad_images, load_truncated=load_truncated)
    else:
        cache = ImageCache.open([item.path for item in items], image_size, cache_dir, num_workers=num_workers,
                                skip_bad_images=skip_bad_images, interpolation=interpolation,
                                load_truncated=load_truncated)
        data = ImageTextDataset(items, None, text_length, text_aug, skip_bad_images=skip_bad_images,
                                image_cache=cache)
        batch_augment = BatchAugment(image_size, augment)
        if augment_in_workers:
            collate_fn = AugmentingCollate(batch_augment)
    return TrainLoader(data, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                       pin_memory=pin_memory and torch.cuda.is_available(),
                       persistent_workers=persistent_workers and num_workers > 0,
                       worker_init_fn=init_worker, generator=torch.Generator().manual_seed(seed),
                       batch_augment=batch_augment)


def build_eval_loaders(split: EvalSplit, *, image_size: tuple[int, int] = (384, 128), batch_size: int = 64,
                       text_length: int = 77, num_workers: int = 0, pin_memory: bool = False,
                       persistent_workers: bool = False,
                       cache_dir: str | os.PathLike | None = None, interpolation: str = "bicubic",
                       load_truncated: bool = False) -> tuple[DataLoader, DataLoader]:
    """(image_loader, text_loader) over an evaluation split, in list order, no shuffling.

    Image batches: ``{"images": B,3,H,W, "pids": B}``; text batches:
    ``{"caption_ids": B,L, "pids": B}`` (original dataset identities).
    With ``cache_dir`` the images come from an image cache of the split
    (see ``build_train_loader``), normalised only: the same tensors as without.
    ``interpolation`` and ``load_truncated`` as in ``build_train_loader``.
    """
    common = dict(batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                  pin_memory=pin_memory and torch.cuda.is_available(),
                  persistent_workers=persistent_workers and num_workers > 0,
                  worker_init_fn=init_worker)
    if cache_dir is None:
        images = ImageDataset(split.image_paths, split.image_pids,
                              build_eval_transform(image_size, interpolation=interpolation),
                              load_truncated=load_truncated)
    else:
        cache = ImageCache.open(split.image_paths, image_size, cache_dir, num_workers=num_workers,
                                interpolation=interpolation, load_truncated=load_truncated)
        images = ImageDataset(split.image_paths, split.image_pids, Uint8Normalize(), image_cache=cache)
    texts = TextDataset(split.captions, split.caption_pids, text_length)
    return DataLoader(images, **common), DataLoader(texts, **common)
