"""Decode-once image cache and batch-wise augmentation on the training device.

The reference data path (``datasets.transforms``) decodes and resizes every
image again in every epoch, then augments it sample by sample on a CPU worker.
With a cache, each distinct image file is decoded and resized to (H, W) once,
with the same function and kernel as the reference path (torchvision's PIL
resize, bicubic or bilinear), and stored as uint8 in one memory-mapped ``.npy`` file
(N, 3, H, W). A training sample is then a slice of that file, and
``BatchAugment`` applies IRRA's augmentation (flip, pad + random crop,
normalisation, random erasing) to a whole uint8 batch at once, on whatever
device the batch is on.

Cache files live in a cache folder, two per (set of images, image size):

    images_{H}x{W}_{slot}.json            index: key, data file, row of every path
    images_{H}x{W}_{slot}_{key}.npy       (N, 3, H, W) uint8 pixels

``slot`` hashes the sorted image paths, the size and the decoding settings
(interpolation, truncated files), ``key`` additionally the size and
modification time of every file and the cache format version. A
changed, added or removed image gives a new key (or slot), and the cache is
rebuilt; the JSON index is replaced last and atomically, so a reader sees the
old or the new cache, never half of one, and concurrent builders (one per
rank) end with the same files.

Augmentation randomness: each sample carries the ``sample_seed`` the training
sampler drew for it (``datasets.sampler``); ``BatchAugment`` derives all the
random numbers of that sample from the seed alone, as outputs of SplitMix64
(integer arithmetic, so CPU and CUDA give the same draws). A sample's
augmentation therefore depends on nothing else in its batch, not on the
number of ranks or workers, nor on the device, and a resumed run repeats it.
The draws follow the reference path's distribution exactly, but they are not
the same draws as torchvision's (which use torch's global generator).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF

from datasets.pedes import BadImageError
from datasets.transforms import (CLIP_MEAN, CLIP_STD, ImageAugment, _size, interpolation_mode,
                                 read_image)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
ERASING_RATIO = (0.3, 3.3)   # torchvision RandomErasing's default aspect-ratio range (the reference path's)
ERASING_ATTEMPTS = 10        # torchvision tries 10 boxes before giving up on erasing a sample
_CHUNK = 64                  # rows per task when building with worker processes


def default_cache_dir(root: str | os.PathLike) -> Path:
    """Where a dataset's caches go unless told otherwise: ``{root}/.cache``."""
    return Path(root) / ".cache"


def decode_resized(path: str, image_size: tuple[int, int], interpolation: str = "bicubic",
                   load_truncated: bool = False) -> np.ndarray:
    """(3, H, W) uint8 pixels of ``path`` resized exactly as the reference transforms resize it."""
    image = TF.resize(read_image(path, load_truncated), list(image_size),
                      interpolation=interpolation_mode(interpolation))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _decoding(interpolation: str, load_truncated: bool) -> str:
    return f"{interpolation}{' truncated' if load_truncated else ''}"


def _slot(paths: Sequence[str], image_size: tuple[int, int], decoding: str) -> str:
    digest = hashlib.sha256(f"{image_size[0]}x{image_size[1]} {decoding}\n".encode())
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:16]


def _key(paths: Sequence[str], image_size: tuple[int, int], decoding: str) -> str:
    """Hash of version, size, decoding, and every path with its file size and mtime (missing files count too)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size[0]}x{image_size[1]} {decoding}\n".encode())
    for path in paths:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size} {st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(path.encode("utf-8", "surrogateescape") + f"\t{stamp}\n".encode())
    return digest.hexdigest()[:16]


def _fill_rows(data_file: str, rows: list[tuple[int, str]], image_size: tuple[int, int], interpolation: str,
               load_truncated: bool) -> list[tuple[str, str]]:
    """Decode ``rows`` (row, path) into the array in ``data_file``; return (path, error) of unreadable ones.

    Errors are returned, not raised, so they cross process boundaries intact and
    one build reports every unreadable image; their rows stay zero.
    """
    array = np.load(data_file, mmap_mode="r+")
    bad = []
    for row, path in rows:
        try:
            array[row] = decode_resized(path, image_size, interpolation, load_truncated)
        except BadImageError as err:
            bad.append((path, str(err)))
            array[row] = 0
    array.flush()
    return bad


class ImageCache:
    """Resized uint8 images of a fixed set of files, memory-mapped.

    Use ``ImageCache.open(paths, image_size, cache_dir)``: it builds the cache
    on first use (or when the images or the size changed) and maps it.
    ``get(path)`` is a (3, H, W) uint8 tensor; a file that could not be decoded
    while building (only kept with ``skip_bad_images``) raises BadImageError.

    Pickling keeps only the file name and the index, so DataLoader workers map
    the file themselves instead of receiving a copy of the pixels.
    """

    def __init__(self, data_file: str | os.PathLike, paths: Sequence[str], image_size: tuple[int, int],
                 bad_paths: Iterable[str] = ()):
        self.data_file = os.fspath(data_file)
        self.paths = list(paths)
        self.image_size = _size(image_size)
        self.row_of = {path: row for row, path in enumerate(self.paths)}
        self.bad_paths = frozenset(bad_paths)
        self._array: np.ndarray | None = None

    # -- building -------------------------------------------------------------------------
    @classmethod
    def open(cls, paths: Iterable[str], image_size: tuple[int, int], cache_dir: str | os.PathLike,
             num_workers: int = 0, skip_bad_images: bool = False, interpolation: str = "bicubic",
             load_truncated: bool = False) -> "ImageCache":
        """Map the cache of ``paths`` at ``image_size`` in ``cache_dir``, building it if needed.

        Args:
            paths: image files (duplicates are stored once).
            image_size: (H, W) the images are resized to.
            cache_dir: folder of the cache files (created if missing).
            num_workers: decoding processes when building (0: this process).
            skip_bad_images: store an unreadable image as zeros and raise for it
                in ``get`` instead of stopping the build with BadImageError.
            interpolation: resize kernel, "bicubic" or "bilinear".
            load_truncated: decode truncated files as far as they go.
        """
        image_size = _size(image_size)
        paths = sorted(set(map(os.fspath, paths)))
        if not paths:
            raise ValueError("ImageCache.open: no image paths given.")
        cache_dir = Path(cache_dir)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the image cache folder {cache_dir} ({err}); choose a writable "
                          "folder (dataset.cache_dir) or turn the cache off") from None
        decoding = _decoding(interpolation, load_truncated)
        slot = _slot(paths, image_size, decoding)
        key = _key(paths, image_size, decoding)
        index_file = cache_dir / f"images_{image_size[0]}x{image_size[1]}_{slot}.json"
        _sweep_stale_builds(cache_dir)
        cache = cls._load_index(index_file, key, paths, image_size)
        if cache is None:
            cache = cls._build(index_file, key, paths, image_size, num_workers, skip_bad_images,
                               interpolation, load_truncated)
        cache.array  # map now: a later rebuild may remove the file, but not an open map of it
        return cache

    @classmethod
    def _load_index(cls, index_file: Path, key: str, paths: list[str],
                    image_size: tuple[int, int]) -> "ImageCache | None":
        try:
            index = json.loads(index_file.read_text())
        except (OSError, ValueError):
            return None
        data_file = index_file.parent / str(index.get("data_file", ""))
        if (index.get("key") != key or index.get("paths") != paths
                or list(index.get("image_size", ())) != list(image_size) or not data_file.is_file()):
            logger.info("image cache %s is stale (images or size changed); rebuilding", index_file)
            return None
        cache = cls(data_file, paths, image_size, index.get("bad_paths", ()))
        shape = cache.array.shape
        if shape != (len(paths), 3, *image_size):
            logger.warning("image cache %s holds an array of shape %s, expected %s; rebuilding", data_file, shape,
                           (len(paths), 3, *image_size))
            return None
        return cache

    @classmethod
    def _build(cls, index_file: Path, key: str, paths: list[str], image_size: tuple[int, int], num_workers: int,
               skip_bad_images: bool, interpolation: str, load_truncated: bool) -> "ImageCache":
        height, width = image_size
        data_file = index_file.with_name(f"{index_file.stem}_{key}.npy")
        tmp = data_file.with_name(_temporary_name(data_file.name))
        size_gb = len(paths) * 3 * height * width / 1e9
        logger.info("building image cache %s: %d images at %dx%d (%.2f GB)", data_file, len(paths), height, width,
                    size_gb)
        free = shutil.disk_usage(index_file.parent).free
        if free < size_gb * 1e9 + 2**28:
            # Writing a memory map past the end of the disk kills the process (SIGBUS): refuse up front.
            raise OSError(f"the image cache needs {size_gb:.2f} GB but {index_file.parent} has "
                          f"{free / 1e9:.2f} GB free; free space, choose another dataset.cache_dir or turn the "
                          "cache off")
        start = time.perf_counter()
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, height, width))
        del array  # written through per-task maps below
        rows = list(enumerate(paths))
        try:
            if num_workers > 0:
                chunks = [rows[i:i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
                with ProcessPoolExecutor(max_workers=num_workers) as pool:
                    futures = [pool.submit(_fill_rows, str(tmp), chunk, image_size, interpolation, load_truncated)
                               for chunk in chunks]
                    bad = [entry for future in futures for entry in future.result()]
            else:
                bad = _fill_rows(str(tmp), rows, image_size, interpolation, load_truncated)
            if bad and not skip_bad_images:
                listed = "; ".join(reason for _, reason in bad[:5]) + ("; ..." if len(bad) > 5 else "")
                raise BadImageError(bad[0][0], message=(
                    f"{len(bad)} unreadable image(s) while building the image cache: {listed}. Fix or remove "
                    "them, or set dataset.skip_bad_images=true to train without them."))
            os.replace(tmp, data_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        bad = [path for path, _ in bad]
        previous = None
        try:
            previous = json.loads(index_file.read_text()).get("data_file")
        except (OSError, ValueError):
            pass
        index = {"version": CACHE_VERSION, "key": key, "image_size": [height, width], "data_file": data_file.name,
                 "bad_paths": sorted(bad), "paths": paths}
        tmp_index = index_file.with_name(_temporary_name(index_file.name))
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, index_file)
        if previous and previous != data_file.name:
            (index_file.parent / previous).unlink(missing_ok=True)  # open maps of it stay valid
        for path in bad:
            logger.warning("image cache: unreadable image %s stored as a placeholder; it will be skipped", path)
        logger.info("image cache built in %.1fs", time.perf_counter() - start)
        return cls(data_file, paths, image_size, bad)

    # -- reading --------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """(N, 3, H, W) uint8, read-only map of the data file (opened lazily, once per process)."""
        if self._array is None:
            self._array = np.load(self.data_file, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_array": None}

    def __len__(self) -> int:
        return len(self.paths)

    def __contains__(self, path: str) -> bool:
        return path in self.row_of

    def get(self, path: str) -> torch.Tensor:
        """(3, H, W) uint8 pixels of ``path``; BadImageError if it was unreadable when the cache was built."""
        row = self.row_of.get(path)
        if row is None:
            raise KeyError(f"{path} is not in the image cache {self.data_file}.")
        if path in self.bad_paths:
            raise BadImageError(path, "unreadable when the image cache was built")
        return torch.from_numpy(np.array(self.array[row]))


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: the k-th SplitMix64 output of a seed, k = 1, 2, ...

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) int64: outputs 1..count of SplitMix64 started at each seed (bit patterns of uint64).

    int64 multiplication wraps modulo 2**64 on every torch device, which is
    the arithmetic SplitMix64 is defined in.
    """
    steps = torch.arange(1, count + 1, dtype=torch.int64, device=seeds.device)
    z = seeds.to(torch.int64)[:, None] + steps[None, :] * _as_int64(_GOLDEN_GAMMA)  # B, count
    z = (z ^ _shift_right(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _as_int64(_MIX2)
    return z ^ _shift_right(z, 31)


def uniform_from_seeds(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) float64 in [0, 1): the top 53 bits of ``splitmix64(seeds, count)``."""
    return _shift_right(splitmix64(seeds, count), 11).to(torch.float64) * 2.0 ** -53


def _randint(u: torch.Tensor, high: torch.Tensor | int) -> torch.Tensor:
    """Integers uniform in [0, high) from uniforms ``u`` in [0, 1)."""
    return torch.floor(u * high).to(torch.int64)


# ---------------------------------------------------------------------------------------------

# images_<...>.npy|json.tmp.<host>.<pid> (and .tmp<pid>, the name before hosts were recorded)
_TEMPORARY = re.compile(r"images_.+\.(?:npy|json)\.tmp(?:\.(?P<host>.+)\.)?(?P<pid>\d+)")
_OTHER_HOST_STALE_S = 3600  # a build writes its file continuously; an hour untouched is a dead one


def _temporary_name(name: str) -> str:
    return f"{name}.tmp.{socket.gethostname()}.{os.getpid()}"


def _sweep_stale_builds(cache_dir: Path) -> None:
    """Remove the temporary files of cache builds whose process is gone (a SIGKILL or a
    node failure during a build leaves one the size of the whole cache). A build of
    this host is gone when its pid is; one of another host sharing the folder cannot be
    probed, so its file must also have been untouched for _OTHER_HOST_STALE_S."""
    from utils.checkpoint import is_live_process_of_ours
    freed, now, host = 0, time.time(), socket.gethostname()
    for entry in cache_dir.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None:
            continue
        pid, here = int(match["pid"]), match["host"] in (None, host)
        if here and (pid == os.getpid() or is_live_process_of_ours(pid)):
            continue
        try:
            stat = entry.stat()
            if not here and now - stat.st_mtime < _OTHER_HOST_STALE_S:
                continue
            entry.unlink()
            freed += stat.st_size
        except FileNotFoundError:
            continue
    if freed:
        logger.info("removed the temporary files of interrupted image-cache builds in %s (%.2f GB)",
                    cache_dir, freed / 1e9)


@dataclass
class AugmentParams:
    """Per-sample augmentation of a batch; every field is (B,) on the batch's device.

    flip: mirror left-right. top, left: crop origin in the zero-padded image
    (0 .. 2 * padding; ``padding`` means no shift). erase: erase a box;
    erase_top, erase_left, erase_height, erase_width: the box, in pixels.
    """
    flip: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    erase: torch.Tensor
    erase_top: torch.Tensor
    erase_left: torch.Tensor
    erase_height: torch.Tensor
    erase_width: torch.Tensor


def normalize_uint8(images: torch.Tensor, mean: Sequence[float] | torch.Tensor = CLIP_MEAN,
                    std: Sequence[float] | torch.Tensor = CLIP_STD, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 ``(x / 255 - mean) / std`` (into ``out`` if given).

    The same operations as torchvision's ToTensor + Normalize, so the result
    is bit-identical to the reference path's.
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
    out = images.to(torch.float32) if out is None else out.copy_(images)
    return out.div_(255).sub_(mean_t).div_(std_t)


class Uint8Normalize:
    """Transform of cached (3, H, W) uint8 images for evaluation: normalisation only."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return normalize_uint8(image, self.mean, self.std)


class BatchAugment:
    """IRRA's training augmentation applied to a uint8 batch at once.

    Per sample, with the distribution of ``build_train_transform(image_size,
    augment)`` on an image already resized to (H, W): horizontal flip with
    probability 0.5; zero padding by ``augment.padding`` then a uniformly
    placed (H, W) crop (a shift by -padding .. padding pixels in each
    direction, with zeros shifted in); conversion to float and CLIP
    normalisation; with probability ``augment.erasing`` torchvision's random
    erasing (area fraction uniform in ``erasing_scale``, log aspect ratio
    uniform in log(0.3) .. log(3.3), up to 10 tries for a box that fits, the
    box filled with ``augment.mean`` after normalisation, as the reference
    does).

    Call ``augment(images, seeds)``: images (B, 3, H, W) uint8, seeds (B,)
    int64 sample seeds, both on the same device; returns (B, 3, H, W) float32.
    The work is tensor operations over the whole batch with no host-device
    sync, except that on the CPU the erasing boxes are written one by one
    (cheaper there than a masked pass over the batch). ``flip_and_shift``
    (uint8) and ``normalize_and_erase`` are the two halves of ``apply``.
    With the same parameters, the output is bit-identical to torchvision's
    transforms on the cached image (``tests/test_cache.py`` checks it).
    """

    # Columns of the per-sample uniforms (see ``draw``).
    _FLIP, _TOP, _LEFT, _ERASE = 0, 1, 2, 3
    _AREA = 4
    _RATIO = _AREA + ERASING_ATTEMPTS
    _BOX_TOP = _RATIO + ERASING_ATTEMPTS
    _BOX_LEFT = _BOX_TOP + ERASING_ATTEMPTS
    NUM_DRAWS = _BOX_LEFT + ERASING_ATTEMPTS

    def __init__(self, image_size: tuple[int, int], augment: ImageAugment | None = None):
        self.image_size = _size(image_size)
        self.augment = augment or ImageAugment()
        self.padding = self.augment.padding if self.augment.crop else 0
        self._workspace: dict[str, torch.Tensor] = {}
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_workspace": {}, "_constants": {}}

    def mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, 1, 1) float32 mean and std on ``device``, made once by fill kernels (a host-to-device
        copy from pageable memory would make the host wait)."""
        if device not in self._constants:
            self._constants[device] = tuple(torch.stack([torch.full((1, 1), float(x), device=device) for x in v])
                                            for v in (self.augment.mean, self.augment.std))
        return self._constants[device]

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable buffer for intermediates that never leave this object (CPU only).

        Fresh CPU allocations of tens of MB are returned to the OS and
        page-faulted in again on every batch, which costs more than the
        augmentation itself; the CUDA caching allocator needs no help. Not
        thread-safe: one BatchAugment per thread.
        """
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._workspace.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self._workspace[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.apply(images, self.draw(seeds), out=out)

    def draw(self, seeds: torch.Tensor) -> AugmentParams:
        """Augmentation parameters of each sample, a function of its seed only. seeds: (B,) int64."""
        a = self.augment
        height, width = self.image_size
        u = uniform_from_seeds(seeds, self.NUM_DRAWS)  # B, NUM_DRAWS
        flip = (u[:, self._FLIP] < 0.5) & a.flip
        top = _randint(u[:, self._TOP], 2 * self.padding + 1)
        left = _randint(u[:, self._LEFT], 2 * self.padding + 1)

        # torchvision's get_params: the first of 10 boxes that fits inside the image, else no erasing.
        lo, hi = a.erasing_scale
        area = height * width * (lo + (hi - lo) * u[:, self._AREA:self._RATIO])  # B, tries
        log_lo, log_hi = math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, self._RATIO:self._BOX_TOP])
        box_h = torch.round(torch.sqrt(area * ratio)).to(torch.int64)
        box_w = torch.round(torch.sqrt(area / ratio)).to(torch.int64)
        fits = (box_h < height) & (box_w < width)
        first = fits.to(torch.float32).argmax(dim=1, keepdim=True)  # first fitting try (0 if none fits)
        box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
        box_top = _randint(u[:, self._BOX_TOP:self._BOX_LEFT].gather(1, first)[:, 0], height - box_h + 1)
        box_left = _randint(u[:, self._BOX_LEFT:].gather(1, first)[:, 0], width - box_w + 1)
        erase = (u[:, self._ERASE] < a.erasing) & fits.any(dim=1)
        return AugmentParams(flip, top, left, erase, box_top, box_left, box_h, box_w)

    def apply(self, images: torch.Tensor, params: AugmentParams, out: torch.Tensor | None = None) -> torch.Tensor:
        """Augment ``images`` (B, 3, H, W) uint8 with ``params``; returns (B, 3, H, W) float32 (into ``out``)."""
        self._check(images)
        moved = None
        if images.device.type == "cpu":
            moved = self.scratch("moved", tuple(images.shape), torch.uint8, images.device)
        return self.normalize_and_erase(self.flip_and_shift(images, params, out=moved), params, out=out)

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"BatchAugment expects uint8 images of shape (B, 3, {self.image_size[0]}, "
                             f"{self.image_size[1]}); got {images.dtype} {tuple(images.shape)}.")

    def flip_and_shift(self, images: torch.Tensor, params: AugmentParams,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """The geometric half: flip, then pad + crop (a shift with zeros shifted in). uint8 -> uint8 (B, 3, H, W).

        ``out``: optional uint8 tensor to write into (e.g. shared memory in a loader worker).
        """
        self._check(images)
        if not (self.augment.flip or self.padding):
            return images if out is None else out.copy_(images)
        batch, channels, height, width = images.shape
        device = images.device
        rows = torch.arange(height, device=device)[None, :] + (params.top - self.padding)[:, None]  # B, H
        cols = torch.arange(width, device=device)[None, :] + (params.left - self.padding)[:, None]  # B, W
        row_inside = ((rows >= 0) & (rows < height)).to(torch.uint8)  # B, H
        col_inside = ((cols >= 0) & (cols < width)).to(torch.uint8)   # B, W
        # Flip before the shift, as the reference flips before padding: column x of the
        # crop reads column W - 1 - x' of the image, x' the unflipped source column.
        cols = torch.where(params.flip[:, None], width - 1 - cols, cols)
        source = self.scratch("source", (batch, height, width), torch.int64, device)
        torch.add((rows.clamp(0, height - 1) * width)[:, :, None], cols.clamp(0, width - 1)[:, None, :],
                  out=source)  # B, H, W: flat index of the source pixel
        source = source.reshape(batch, 1, height * width).expand(batch, channels, height * width)
        if out is None:
            out = torch.empty_like(images)
        torch.gather(images.reshape(batch, channels, height * width), 2, source,
                     out=out.view(batch, channels, height * width))
        return out.mul_(row_inside[:, None, :, None]).mul_(col_inside[:, None, None, :])  # zeros shifted in

    def normalize_and_erase(self, images: torch.Tensor, params: AugmentParams,
                            out: torch.Tensor | None = None) -> torch.Tensor:
        """The photometric half: to float, CLIP normalisation, random erasing. uint8 -> float32 (B, 3, H, W)."""
        self._check(images)
        if out is None and images.device.type == "cpu":
            # NumPy asks for transparent huge pages on large arrays: far fewer page faults
            # than a fresh torch allocation of the same size.
            out = torch.from_numpy(np.empty(images.shape, dtype=np.float32))
        mean, std = self.mean_std(images.device)
        out = normalize_uint8(images, mean, std, out=out)  # B, 3, H, W
        return self._erase(out, params) if self.augment.erasing > 0 else out

    def _erase(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Fill each sample's erasing box with ``augment.mean`` (in place on the CPU)."""
        if images.device.type == "cpu":
            # On the CPU a masked select over the whole batch costs far more than
            # writing the boxes one by one; reading the parameters costs no sync here.
            return self._erase_boxes(images, params)
        return self._erase_masked(images, params)

    def _erase_boxes(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        fill = torch.tensor(self.augment.mean, dtype=images.dtype, device=images.device)[:, None, None]
        boxes = torch.stack([params.erase, params.erase_top, params.erase_left, params.erase_height,
                             params.erase_width], dim=1).tolist()
        for b, (erase, top, left, box_h, box_w) in enumerate(boxes):
            if erase:
                images[b, :, top:top + box_h, left:left + box_w] = fill
        return images

    def _erase_masked(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        fill = self.mean_std(images.device)[0].to(images.dtype)  # the reference fills with the mean
        height, width = self.image_size
        rows = torch.arange(height, device=images.device)[None, :]
        cols = torch.arange(width, device=images.device)[None, :]
        in_rows = (rows >= params.erase_top[:, None]) & (rows < (params.erase_top + params.erase_height)[:, None])
        in_cols = (cols >= params.erase_left[:, None]) & (cols < (params.erase_left + params.erase_width)[:, None])
        box = in_rows[:, :, None] & in_cols[:, None, :] & params.erase[:, None, None]  # B, H, W
        return torch.where(box[:, None], fill, images)


class AugmentingCollate:
    """``collate_fn`` that applies ``BatchAugment``'s geometric half in the loader workers.

    Stacks the cached samples, flips and shifts them (uint8, written straight
    into shared memory in a worker process, as the default collate does) and
    keeps ``"aug_seeds"``; ``finish`` (run by ``TrainLoader.prepare_batch``)
    applies the normalisation and erasing drawn from the same seeds. Passing
    uint8 between processes moves a quarter of the bytes of float batches.
    """

    def __init__(self, augment: BatchAugment):
        self.augment = augment

    def __call__(self, samples: list[dict]) -> dict:
        first = samples[0]["images_uint8"]
        shape = (len(samples), *first.shape)
        images = self.augment.scratch("stacked", shape, first.dtype, first.device)
        torch.stack([sample.pop("images_uint8") for sample in samples], out=images)  # B, 3, H, W uint8
        seeds = torch.stack([sample.pop("aug_seeds") for sample in samples])           # B
        batch = torch.utils.data.default_collate(samples)
        out = None
        if torch.utils.data.get_worker_info() is not None:
            storage = first._typed_storage()._new_shared(math.prod(shape), device=first.device)
            out = first.new(storage).view(shape)
        batch["images_uint8"] = self.augment.flip_and_shift(images, self.augment.draw(seeds), out=out)
        batch["aug_seeds"] = seeds
        return batch

    def finish(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Normalisation and erasing of a collated batch: uint8 -> float32 (B, 3, H, W)."""
        return self.augment.normalize_and_erase(images, self.augment.draw(seeds))


__all__ = ["ImageCache", "BatchAugment", "AugmentParams", "Uint8Normalize", "normalize_uint8", "decode_resized",
           "default_cache_dir", "splitmix64", "uniform_from_seeds", "AugmentingCollate", "CACHE_VERSION"]
