"""torch Datasets over the loaded annotations. Items are dicts; the default collate stacks them."""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from datasets.pedes import BadImageError, TrainItem
from datasets.transforms import TextAugment, augment_caption, read_image

logger = logging.getLogger(__name__)


def tokenize_caption(caption: str, text_length: int) -> torch.Tensor:
    """(text_length,) long ids: SOT, BPE ids, EOT, zero padding (truncated with EOT kept)."""
    from utils.tokenizer import tokenize
    return tokenize(caption, context_length=text_length, truncate=True)[0]


class ImageTextDataset(Dataset):
    """Training pairs: ``{"images": (3, H, W) float, "caption_ids": (L,) long, "pids": long, "image_ids": long}``.

    An index may be an int or an ``(index, sample_seed)`` pair (what the
    samplers yield with ``yield_seeds=True``). With a seed, the image and
    text augmentation of that sample are drawn from generators seeded with it,
    so they depend on nothing else (not the worker, not earlier samples); the
    caller's global torch random state is left as it was.

    With ``skip_bad_images`` an unreadable image is replaced by the next
    readable image of the same identity (with this item's caption), and a
    warning names it; otherwise BadImageError stops training. With
    ``load_truncated`` a truncated file is decoded as far as it goes (IRRA)
    instead of being unreadable.

    With an ``image_cache`` (``datasets.cache.ImageCache``) the image is read
    from the cache, already resized, and returned unaugmented as
    ``"images_uint8": (3, H, W) uint8`` with its ``"aug_seeds": long`` instead
    of ``"images"``; ``transform`` is unused and ``BatchAugment`` augments the
    collated batch.
    """

    def __init__(self, items: Sequence[TrainItem], transform: Callable | None, text_length: int = 77,
                 text_aug: TextAugment | None = None, skip_bad_images: bool = False, image_cache=None,
                 load_truncated: bool = False):
        self.items = list(items)
        self.transform = transform
        self.image_cache = image_cache
        self.text_length = text_length
        self.text_aug = text_aug or TextAugment(enabled=False)
        self.skip_bad_images = skip_bad_images
        self.load_truncated = load_truncated
        self._items_of_pid: dict[int, list[int]] | None = None
        self._skipped: set[str] = set()
        self._caption_ids: dict[int, torch.Tensor] = {}  # tokenised once per process, reused every epoch

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: str):
        """A PIL image, or with the cache a (3, H, W) uint8 tensor; BadImageError if unreadable."""
        if self.image_cache is not None:
            return self.image_cache.get(path)
        return read_image(path, self.load_truncated)

    def _read(self, index: int):
        """(image, replaced): `replaced` is True when a stand-in image was used."""
        item = self.items[index]
        try:
            return self._load(item.path), False
        except BadImageError:
            if not self.skip_bad_images:
                raise
        if self._items_of_pid is None:
            self._items_of_pid = {}
            for i, other in enumerate(self.items):
                self._items_of_pid.setdefault(other.pid, []).append(i)
        same = self._items_of_pid[item.pid]
        start = same.index(index)
        tried = {item.path}
        self._note_skipped(item.path)
        for other in same[start + 1:] + same[:start]:
            path = self.items[other].path
            if path in tried:
                continue
            tried.add(path)
            try:
                return self._load(path), True
            except BadImageError:
                self._note_skipped(path)
        raise BadImageError(item.path, f"no readable image of identity {item.pid} to use instead")

    def _note_skipped(self, path: str) -> None:
        if path not in self._skipped:
            self._skipped.add(path)
            logger.warning("skipping unreadable image %s (%d skipped so far by this process)", path,
                           len(self._skipped))

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, sample_seed = key if isinstance(key, (tuple, list)) else (key, None)
        item = self.items[index]
        image, replaced = self._read(index)
        caption_ids = self._caption_ids.get(index)
        if caption_ids is None:
            caption_ids = self._caption_ids[index] = tokenize_caption(item.caption, self.text_length)
        if self.image_cache is not None:
            if sample_seed is None:
                sample_seed = int(torch.randint(0, 2**62, ()).item())
            generator = torch.Generator().manual_seed(sample_seed + 1)
            return {"images_uint8": image, "aug_seeds": torch.tensor(sample_seed, dtype=torch.long),
                    "caption_ids": augment_caption(caption_ids, self.text_aug, generator),
                    "pids": torch.tensor(item.pid, dtype=torch.long),
                    "image_ids": torch.tensor(item.image_id, dtype=torch.long),
                    "replaced_images": torch.tensor(int(replaced))}
        if sample_seed is None:
            images = self.transform(image)
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        else:
            # torchvision draws from the global generator: seed it for this sample only.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                images = self.transform(image)
            generator = torch.Generator().manual_seed(sample_seed + 1)
        caption_ids = augment_caption(caption_ids, self.text_aug, generator)
        return {"images": images, "caption_ids": caption_ids,
                "pids": torch.tensor(item.pid, dtype=torch.long),
                "image_ids": torch.tensor(item.image_id, dtype=torch.long),
                "replaced_images": torch.tensor(int(replaced))}


class ImageDataset(Dataset):
    """Evaluation gallery: ``{"images": (3, H, W) float, "pids": long}``, in list order.

    ``transform`` receives the decoded PIL image, or with an ``image_cache``
    the cached (3, H, W) uint8 tensor (e.g. ``datasets.cache.Uint8Normalize``).
    ``load_truncated`` decodes truncated files as far as they go (IRRA).
    """

    def __init__(self, image_paths: Sequence[str], pids: Sequence[int], transform: Callable, image_cache=None,
                 load_truncated: bool = False):
        if len(image_paths) != len(pids):
            raise ValueError(f"{len(image_paths)} image paths but {len(pids)} pids.")
        self.image_paths = list(image_paths)
        self.pids = list(pids)
        self.transform = transform
        self.image_cache = image_cache
        self.load_truncated = load_truncated

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.image_paths[index]
        if self.image_cache is not None:
            image = self.image_cache.get(path)
        else:
            image = read_image(path, self.load_truncated)
        return {"images": self.transform(image),
                "pids": torch.tensor(self.pids[index], dtype=torch.long)}


class TextDataset(Dataset):
    """Evaluation queries: ``{"caption_ids": (L,) long, "pids": long}``, in list order."""

    def __init__(self, captions: Sequence[str], pids: Sequence[int], text_length: int = 77):
        if len(captions) != len(pids):
            raise ValueError(f"{len(captions)} captions but {len(pids)} pids.")
        self.captions = list(captions)
        self.pids = list(pids)
        self.text_length = text_length

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"caption_ids": tokenize_caption(self.captions[index], self.text_length),
                "pids": torch.tensor(self.pids[index], dtype=torch.long)}


__all__ = ["ImageTextDataset", "ImageDataset", "TextDataset", "BadImageError", "tokenize_caption"]
