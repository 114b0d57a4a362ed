"""Dataset registry and DataLoader construction.

Randomness of training data, all derived from ``seed``:
- batch composition: the sampler's order of ``(seed, epoch)``;
- augmentation of the sample in slot j of global batch b of epoch e: a sample
  seed drawn from ``(seed, e)`` for (b, j) (see ``datasets.sampler``).
So a run resumed at (epoch, batch) with ``set_epoch(epoch, start_batch=batch)``
sees the same batches, augmented the same way, whatever the number of workers
or ranks. Worker processes additionally get Python/NumPy seeds from torch's
per-worker seed (only relevant for code that uses those generators).
"""
from __future__ import annotations

import logging
import os
import random
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets.bases import ImageDataset, ImageTextDataset, TextDataset
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.pedes import EvalSplit, PedesDataset, TrainItem
from datasets.rstpreid import RSTPReid
from datasets.sampler import IdentityBatchSampler, RandomBatchSampler
from datasets.transforms import ImageAugment, TextAugment, build_eval_transform, build_train_transform

logger = logging.getLogger(__name__)

DATASETS = {"CUHK-PEDES": CUHKPEDES, "ICFG-PEDES": ICFGPEDES, "RSTPReid": RSTPReid}
SAMPLERS = ("random", "identity")


def get_dataset_class(name: str) -> type[PedesDataset]:
    if name not in DATASETS:
        raise KeyError(f"Unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}.")
    return DATASETS[name]


def build_dataset(name: str, root: str | os.PathLike, val_ids: int | None = None, seed: int = 0,
                  check_images: bool = True) -> PedesDataset:
    """Load dataset ``name`` from ``{root}/{folder}`` (see ``PedesDataset`` for ``val_ids``)."""
    return get_dataset_class(name)(root, val_ids=val_ids, seed=seed, check_images=check_images)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_train_loader(dataset: PedesDataset | Sequence[TrainItem], *, batch_size: int,
                       sampler: str = "random", num_instances: int = 4,
                       image_size: tuple[int, int] = (384, 128), augment: ImageAugment | None = None,
                       text_length: int = 77, text_aug: TextAugment | None = None,
                       num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                       seed: int = 0, rank: int = 0, world_size: int = 1,
                       skip_bad_images: bool = False) -> DataLoader:
    """DataLoader of training batches ``{"images": B,3,H,W, "caption_ids": B,L, "pids": B, "image_ids": B}``.

    ``batch_size`` is the global batch; this rank gets ``batch_size // world_size``
    samples per step. The loader's ``batch_sampler`` has ``set_epoch(epoch,
    start_batch=0)``; call it before every epoch. ``persistent_workers`` only
    applies with ``num_workers > 0``, ``pin_memory`` only when CUDA is available.
    """
    items = dataset.train if isinstance(dataset, PedesDataset) else list(dataset)
    if not items:
        raise ValueError("The training set is empty.")
    if sampler == "random":
        batch_sampler = RandomBatchSampler(len(items), batch_size, seed, rank, world_size, drop_last=True,
                                           yield_seeds=True)
    elif sampler == "identity":
        batch_sampler = IdentityBatchSampler([item.pid for item in items], batch_size, num_instances, seed,
                                             rank, world_size, yield_seeds=True)
    else:
        raise ValueError(f"sampler={sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    data = ImageTextDataset(items, build_train_transform(image_size, augment), text_length, text_aug,
                            skip_bad_images=skip_bad_images)
    return DataLoader(data, batch_sampler=batch_sampler, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=persistent_workers and num_workers > 0,
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed))


def build_eval_loaders(split: EvalSplit, *, image_size: tuple[int, int] = (384, 128), batch_size: int = 64,
                       text_length: int = 77, num_workers: int = 0, pin_memory: bool = False,
                       persistent_workers: bool = False) -> tuple[DataLoader, DataLoader]:
    """(image_loader, text_loader) over an evaluation split, in list order, no shuffling.

    Image batches: ``{"images": B,3,H,W, "pids": B}``; text batches:
    ``{"caption_ids": B,L, "pids": B}`` (original dataset identities).
    """
    common = dict(batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                  pin_memory=pin_memory and torch.cuda.is_available(),
                  persistent_workers=persistent_workers and num_workers > 0)
    images = ImageDataset(split.image_paths, split.image_pids, build_eval_transform(image_size))
    texts = TextDataset(split.captions, split.caption_pids, text_length)
    return DataLoader(images, **common), DataLoader(texts, **common)
