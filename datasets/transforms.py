"""Image transforms (IRRA's recipe) and token-level text augmentation.

Training images: resize to (H, W) (bicubic, or bilinear as IRRA: torchvision's
Resize default), random horizontal flip, zero-pad then random crop back to
(H, W), to tensor, CLIP mean/std normalisation, random erasing. Evaluation
images: resize, to tensor, normalise.

The torchvision transforms draw from torch's global generator; the training
dataset seeds it per sample (see ``datasets.bases.ImageTextDataset``), so the
augmentation of a sample depends only on its sample seed.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
import torchvision.transforms as T
from PIL import Image, ImageFile

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BPE_VOCAB_END = 49405  # ids [0, 49405) are BPE pieces; 49405 mask, 49406 SOT, 49407 EOT
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


@dataclass(frozen=True)
class ImageAugment:
    """Training image augmentation (IRRA defaults).

    flip: random horizontal flip with probability 0.5.
    padding: pixels of zero padding on each side before the random crop.
    crop: pad + random crop back to the image size (no-op when padding is 0).
    erasing: random-erasing probability (0 disables); the erased box covers
        ``erasing_scale`` of the image and is filled with ``mean`` as IRRA does.
    mean, std: per-channel normalisation (CLIP's).
    """
    flip: bool = True
    padding: int = 10
    crop: bool = True
    erasing: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.padding < 0:
            raise ValueError(f"ImageAugment.padding={self.padding}: must be >= 0.")
        if not 0.0 <= self.erasing <= 1.0:
            raise ValueError(f"ImageAugment.erasing={self.erasing}: a probability in [0, 1] is expected.")


@dataclass(frozen=True)
class TextAugment:
    """Token-level caption augmentation, applied to the ids between SOT and EOT.

    Each caption token independently is deleted (``delete_prob``), replaced by
    a random BPE id (``replace_prob``) or masked with MASK_TOKEN_ID
    (``mask_prob``); the three are exclusive, so their sum must be <= 1.
    Defaults follow BERT-style noise at a lower rate (mask 10%, replace 5%,
    delete 5%); ``enabled=False`` turns it off.
    """
    enabled: bool = False
    mask_prob: float = 0.1
    replace_prob: float = 0.05
    delete_prob: float = 0.05

    def __post_init__(self):
        probs = (self.mask_prob, self.replace_prob, self.delete_prob)
        if min(probs) < 0 or sum(probs) > 1:
            raise ValueError(f"TextAugment probabilities mask={self.mask_prob}, replace={self.replace_prob}, "
                             f"delete={self.delete_prob}: each must be >= 0 and their sum <= 1.")


def interpolation_mode(name: str) -> T.InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation={name!r}: choose one of {', '.join(INTERPOLATIONS)}.")
    return INTERPOLATIONS[name]


def _size(image_size) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size={image_size}: expected positive (height, width).")
    return int(height), int(width)


def build_train_transform(image_size: tuple[int, int], augment: ImageAugment | None = None,
                          interpolation: str = "bicubic") -> T.Compose:
    """PIL image -> normalised float tensor (3, H, W) with training augmentation."""
    augment = augment or ImageAugment()
    size = _size(image_size)
    steps = [T.Resize(size, interpolation=interpolation_mode(interpolation))]
    if augment.flip:
        steps.append(T.RandomHorizontalFlip(0.5))
    if augment.crop and augment.padding > 0:
        steps += [T.Pad(augment.padding), T.RandomCrop(size)]
    steps += [T.ToTensor(), T.Normalize(augment.mean, augment.std)]
    if augment.erasing > 0:
        steps.append(T.RandomErasing(p=augment.erasing, scale=augment.erasing_scale, value=augment.mean))
    return T.Compose(steps)


def build_eval_transform(image_size: tuple[int, int], mean=CLIP_MEAN, std=CLIP_STD,
                         interpolation: str = "bicubic") -> T.Compose:
    """PIL image -> normalised float tensor (3, H, W), deterministic."""
    return T.Compose([T.Resize(_size(image_size), interpolation=interpolation_mode(interpolation)),
                      T.ToTensor(), T.Normalize(mean, std)])


_TRUNCATED_LOCK = threading.Lock()


@contextlib.contextmanager
def _truncated_images_allowed(allowed: bool):
    """PIL's process-wide LOAD_TRUNCATED_IMAGES switched on for one decode (IRRA sets it
    for the whole process). Reads that do not allow truncation take no lock: a process
    uses one setting."""
    if not allowed:
        yield
        return
    with _TRUNCATED_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def read_image(path: str, load_truncated: bool = False) -> Image.Image:
    """Decode an image file fully as RGB; BadImageError naming the path if it is missing or corrupt.

    A truncated file is an error, or with ``load_truncated`` (IRRA) decoded as far as
    its data goes.
    """
    from datasets.pedes import BadImageError
    try:
        with _truncated_images_allowed(load_truncated), Image.open(path) as image:
            return image.convert("RGB")  # convert() loads every pixel, so truncation shows here
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(path, f"{type(err).__name__}: {err}") from None


def augment_caption(caption_ids: torch.Tensor, augment: TextAugment, generator: torch.Generator) -> torch.Tensor:
    """Randomly mask, replace or delete caption tokens.

    Args:
        caption_ids: (L,) long, ``SOT, tokens..., EOT, 0...`` as tokenize() returns.
        generator: source of randomness (the caller seeds it per sample).

    Returns: (L,) long. SOT, EOT and padding are never changed; deletions shift
    the later tokens left and the row is re-padded with zeros after EOT. At
    least one token is kept.
    """
    from utils.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID
    if not augment.enabled:
        return caption_ids
    length = caption_ids.shape[0]
    eot = int((caption_ids == EOT_TOKEN_ID).nonzero()[0, 0]) if (caption_ids == EOT_TOKEN_ID).any() else None
    if eot is None or caption_ids[0] != SOT_TOKEN_ID or eot < 2:
        return caption_ids
    tokens = caption_ids[1:eot].clone()                          # T
    draw = torch.rand(tokens.shape[0], generator=generator)      # T
    delete = draw < augment.delete_prob
    replace = (draw >= augment.delete_prob) & (draw < augment.delete_prob + augment.replace_prob)
    mask = ((draw >= augment.delete_prob + augment.replace_prob)
            & (draw < augment.delete_prob + augment.replace_prob + augment.mask_prob))
    random_ids = torch.randint(0, BPE_VOCAB_END, tokens.shape, generator=generator)
    tokens = torch.where(replace, random_ids, tokens)
    tokens = torch.where(mask, torch.full_like(tokens, MASK_TOKEN_ID), tokens)
    if delete.all():
        delete = torch.zeros_like(delete)
    tokens = tokens[~delete]
    out = torch.zeros(length, dtype=caption_ids.dtype)
    out[0] = SOT_TOKEN_ID
    out[1:1 + tokens.shape[0]] = tokens
    out[1 + tokens.shape[0]] = EOT_TOKEN_ID
    return out
