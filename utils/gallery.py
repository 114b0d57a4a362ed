"""Search a folder of person crops with a sentence, in bounded memory.

Every image under the folder (nested folders; .jpg .jpeg .png .bmp .webp; any
size) is embedded once and cached; later searches only embed files that are
new or changed since, and drop deleted ones.

Cache: under `cache_dir` (retrieve.py: the run's `gallery_cache/` unless
--cache_dir says otherwise), a folder per gallery, `<name>-<hash of its
resolved path>`, holding a folder per checkpoint, `<key>`, where `key` hashes
the checkpoint file (resolved path, modification time, size) and whatever else
changes the embeddings (image size, embedding mode). A checkpoint's folder holds
  source.json     the checkpoint's resolved path, mtime_ns and size
  index.pt        paths relative to the gallery, their mtime_ns and size, and
                  the files that could not be read (so they are not retried
                  until they change); torch.save of plain data, loaded with
                  weights_only=True
  emb-<id>.npy    float16 (N, D) L2-normalised embeddings; fp16 halves disk
                  and memory and changes cosine scores by ~1e-3 at most.
The embeddings are written into and read from a memory map, one chunk at a
time: neither building nor searching holds the whole (N, D) matrix in RAM.
index.pt is replaced atomically after the new embedding file is complete, so
an interrupted run leaves the previous cache usable.

A cache is validated as a whole before it is used: version and key, the
embedding file is a plain file of that folder, every field has the type and
length the index says, paths are relative and stay inside the gallery, and the
embeddings are float16 of the model's width, finite and of unit norm. Any
mismatch gives a warning and a rebuild. After each search the caches of the
same gallery whose checkpoint file has since changed or gone are removed.

Files and folders whose names start with "." are not part of the gallery.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datasets.pedes import BadImageError, DatasetError
from datasets.transforms import read_image
from utils.misc import autocast

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LEGACY_CACHE_PREFIX = ".comoe_gallery_cache_"  # caches inside the gallery, no longer used
CACHE_VERSION = 1
SOURCE_FILE = "source.json"
KEY_PATTERN = re.compile(r"[0-9a-f]{16}")
EMBEDDINGS_PATTERN = re.compile(r"emb-[0-9a-f]{12}\.npy")
NORM_TOLERANCE = 1e-2      # stored rows are unit vectors in float16
SEARCH_CHUNK = 65536       # embedding rows scored per step of the search
MAX_LISTED = 5             # unreadable paths named in a warning


class Encoder(Protocol):
    """What the gallery needs from a model: L2-normalisable embeddings per sample."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...  # B,3,H,W -> B,D

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor: ...  # B,L -> B,D


@dataclass(frozen=True)
class GalleryFile:
    rel: str        # path relative to the gallery root, "/"-separated
    mtime_ns: int
    size: int


def scan_gallery(root: Path) -> list[GalleryFile]:
    """Image files under `root`, sorted by relative path (symlinked folders are followed once)."""
    found: list[GalleryFile] = []
    stack = [(root, "")]
    seen_dirs = {os.path.realpath(root)}
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            logger.warning("cannot list %s (%s); its images are left out", folder, err)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real not in seen_dirs:
                        seen_dirs.add(real)
                        stack.append((Path(entry.path), rel + "/"))
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    stat = entry.stat()
                    found.append(GalleryFile(rel, stat.st_mtime_ns, stat.st_size))
            except OSError as err:
                logger.warning("cannot read %s (%s); left out", entry.path, err)
    found.sort(key=lambda f: f.rel)
    return found


def checkpoint_source(checkpoint: str | os.PathLike) -> dict:
    """The identity of a checkpoint file: resolved path, mtime_ns and size."""
    path = Path(checkpoint).resolve()
    stat = path.stat()
    return {"checkpoint": str(path), "mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def gallery_cache_key(checkpoint: str | os.PathLike, *extra) -> str:
    """16 hex digits identifying a checkpoint file (path, mtime, size) plus `extra` settings."""
    source = checkpoint_source(checkpoint)
    text = "|".join([source["checkpoint"], str(source["mtime_ns"]), str(source["size"]),
                     *map(str, extra)])
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def gallery_cache_folder(cache_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """The folder under `cache_dir` holding the caches of gallery `root` (one per checkpoint)."""
    real = os.path.realpath(root)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(real)).strip("._") or "gallery"
    return Path(cache_dir) / f"{name[:40]}-{hashlib.sha1(real.encode('utf-8')).hexdigest()[:8]}"


class _GalleryImages(Dataset):
    """(row, image tensor or None, error text) for each listed file."""

    def __init__(self, root: Path, rels: Sequence[str], transform: Callable):
        self.root = root
        self.rels = list(rels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, index: int):
        path = os.path.join(self.root, self.rels[index])
        try:
            return index, self.transform(read_image(path)), ""
        except BadImageError as err:
            return index, None, str(err)
        except (OSError, ValueError) as err:  # e.g. an image too small for the transform
            return index, None, f"Cannot read image {path}: {type(err).__name__}: {err}"


def _collate(batch):
    """Stack the readable images; keep (row, error) of the others."""
    good = [(i, image) for i, image, _ in batch if image is not None]
    bad = [(i, error) for i, image, error in batch if image is None]
    rows = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([image for _, image in good]) if good else None
    return rows, images, bad


@dataclass
class GalleryIndex:
    """Cached, L2-normalised embeddings of a gallery folder."""
    root: Path
    cache_dir: Path              # the .comoe_gallery_cache_<key> folder
    paths: list[str]             # relative paths, one per embedding row
    embeddings: np.ndarray       # N, D float16, memory-mapped
    stats: dict = field(default_factory=dict)  # embedded / reused / removed / unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, row: int) -> str:
        return os.path.join(self.root, self.paths[row])

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int,
               chunk: int = SEARCH_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k cosine scores and rows of each query, best first.

        queries: (Q, D) L2-normalised. Returns scores (Q, k') float32 and rows
        (Q, k') long on `queries.device`, k' = min(k, N). Rows are scored
        `chunk` at a time and merged into a running top-k, so memory is
        O(Q x (chunk + k)) whatever the gallery size.
        """
        queries = queries.float()
        k = min(k, len(self))
        best_scores = queries.new_empty((len(queries), 0))
        best_rows = torch.empty((len(queries), 0), dtype=torch.long, device=queries.device)
        for start in range(0, len(self), chunk):
            block = torch.from_numpy(np.asarray(self.embeddings[start:start + chunk],
                                                dtype=np.float32)).to(queries.device)  # c, D
            scores = queries @ block.T  # Q, c
            top = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_rows = torch.cat([best_rows, top.indices + start], dim=1)
            keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_rows = keep.values, merged_rows.gather(1, keep.indices)
        return best_scores, best_rows


def _is_gallery_path(rel) -> bool:
    """A "/"-separated path relative to the gallery that stays inside it."""
    return (isinstance(rel, str) and rel != "" and "\\" not in rel and "\x00" not in rel
            and not rel.startswith("/") and posixpath.normpath(rel) == rel
            and rel.split("/")[0] != "..")


def _is_long_vector(value, length: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.dtype == torch.long and value.ndim == 1
            and len(value) == length)


def _index_problem(cached, key: str) -> str | None:
    """What is wrong with an unpickled index.pt, or None."""
    if not isinstance(cached, dict):
        return f"the index holds a {type(cached).__name__}"
    if cached.get("version") != CACHE_VERSION:
        return f"cache version {cached.get('version')!r} != {CACHE_VERSION}"
    if cached.get("key") != key:
        return f"the index was made for key {cached.get('key')!r:.40}, not {key}"
    name = cached.get("embeddings")
    if not isinstance(name, str) or not EMBEDDINGS_PATTERN.fullmatch(name):
        return f"embedding file {name!r:.80} is not a file name of this cache"
    count = cached.get("count")
    if type(count) is not int or count < 0:
        return f"count {count!r:.40} is not a number of rows"
    for field_name in ("paths", "bad_paths"):
        paths = cached.get(field_name)
        if not isinstance(paths, list):
            return f"{field_name} is a {type(paths).__name__}, not a list"
        bad = next((rel for rel in paths if not _is_gallery_path(rel)), None)
        if bad is not None:
            return f"{field_name} holds {bad!r:.80}, which is not a path inside the gallery"
        if len(set(paths)) != len(paths):
            return f"{field_name} lists a path twice"
    if len(cached["paths"]) != count:
        return f"the index lists {len(cached['paths'])} paths for {count} rows"
    for prefix, length in (("", count), ("bad_", len(cached["bad_paths"]))):
        for field_name in (f"{prefix}mtimes", f"{prefix}sizes"):
            if not _is_long_vector(cached.get(field_name), length):
                return f"{field_name} is not {length} integers"
    return None


def _embeddings_problem(embeddings: np.ndarray, count: int, embed_dim: int | None) -> str | None:
    """What is wrong with a memory-mapped embedding file, or None; reads it a chunk at a time."""
    if embeddings.dtype != np.float16 or embeddings.ndim != 2 or embeddings.shape[0] < count:
        return (f"embeddings are {embeddings.dtype} of shape {embeddings.shape}, not float16 "
                f"with at least {count} rows")
    if embeddings.shape[1] < 1:
        return "embeddings have no columns"
    if embed_dim is not None and embeddings.shape[1] != embed_dim:
        return f"embeddings are {embeddings.shape[1]} wide, the model's are {embed_dim}"
    for start in range(0, count, SEARCH_CHUNK):
        block = np.asarray(embeddings[start:min(start + SEARCH_CHUNK, count)], dtype=np.float32)
        if not np.isfinite(block).all():
            return "embeddings hold non-finite values"
        if (np.abs(np.linalg.norm(block, axis=1) - 1.0) > NORM_TOLERANCE).any():
            return "embeddings hold rows that are not unit vectors"
    return None


def _load_cached(cache_dir: Path, key: str, embed_dim: int | None) -> dict | None:
    """The cache's index with its embeddings under "array", or None (with a warning when a
    cache was there but is not valid as a whole)."""
    index_file = cache_dir / "index.pt"
    if not index_file.is_file():
        return None
    try:
        cached = torch.load(index_file, map_location="cpu", weights_only=True)
        problem = _index_problem(cached, key)
        if problem is None:
            emb_path = cache_dir / cached["embeddings"]
            if emb_path.is_symlink() or not emb_path.is_file():
                problem = f"{cached['embeddings']} is not a file of the cache folder"
            else:
                embeddings = np.load(emb_path, mmap_mode="r", allow_pickle=False)
                problem = _embeddings_problem(embeddings, cached["count"], embed_dim)
    except Exception as err:  # noqa: BLE001 - any damage means: rebuild
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        logger.warning("gallery cache %s cannot be used (%s); rebuilding it", cache_dir, problem)
        return None
    cached["array"] = embeddings
    return cached


def _write_source(cache_dir: Path, source: dict) -> None:
    tmp = cache_dir / f".{SOURCE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(source), encoding="utf-8")
    os.replace(tmp, cache_dir / SOURCE_FILE)


def _checkpoint_changed(cache_dir: Path) -> bool:
    """Whether the checkpoint a cache was made from is gone or has changed since (a cache
    without a readable source.json counts as changed)."""
    try:
        source = json.loads((cache_dir / SOURCE_FILE).read_text(encoding="utf-8"))
        return checkpoint_source(source["checkpoint"]) != source
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _prune_stale_caches(gallery_dir: Path, keep: Path) -> None:
    """Remove the caches of this gallery whose checkpoint file has changed or gone."""
    for folder in sorted(gallery_dir.iterdir()):
        if (folder == keep or not KEY_PATTERN.fullmatch(folder.name) or folder.is_symlink()
                or not folder.is_dir() or not _checkpoint_changed(folder)):
            continue
        try:
            shutil.rmtree(folder)
            logger.info("removed %s, the gallery cache of a checkpoint that has changed or gone",
                        folder)
        except OSError as err:
            logger.warning("could not remove the stale gallery cache %s (%s)", folder, err)


def _prepare_cache_dir(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DatasetError(f"cannot write the gallery cache {cache_dir} ({err}); pass a writable "
                           f"folder with --cache_dir") from err


@torch.no_grad()
def index_gallery(encoder: Encoder, root: str | os.PathLike, transform: Callable, *,
                  checkpoint: str | os.PathLike, cache_dir: str | os.PathLike,
                  settings: Sequence = (), embed_dim: int | None = None, batch_size: int = 64,
                  num_workers: int = 0, device: torch.device | str = "cpu",
                  precision: str = "fp32") -> GalleryIndex:
    """Embed the images under `root` that the cache does not hold yet; return the index.

    Args:
        encoder: anything with `encode_image(B,3,H,W) -> (B, D)` (eval mode).
        transform: PIL image -> (3, H, W) tensor, e.g. build_eval_transform.
        checkpoint: the weights file of `encoder`; with `settings` (e.g. the image
            size) and `precision` it keys the cache, and its changing makes the cache
            stale.
        cache_dir: the folder that holds the caches (e.g. RUN/gallery_cache).
        embed_dim: the encoder's embedding width, checked against a cached one.

    Unreadable images are skipped with one warning (count and the first few
    paths). Raises DatasetError when `root` is not a folder, holds no images,
    or none of them can be read.
    """
    root = Path(root)
    device = torch.device(device)
    if not root.is_dir():
        raise DatasetError(f"gallery folder {root} does not exist or is not a folder")
    files = scan_gallery(root)
    if not files:
        raise DatasetError(f"gallery folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, "
                           f"nested folders included); point --gallery at a folder of person crops")
    legacy = list(root.glob(LEGACY_CACHE_PREFIX + "*"))
    if legacy:
        logger.warning("%s holds %d embedding cache folder(s) of an earlier version, no longer "
                       "used; remove them with: rm -r %s", root, len(legacy),
                       os.path.join(root, LEGACY_CACHE_PREFIX + "*"))
    key = gallery_cache_key(checkpoint, *settings, precision)
    cache = gallery_cache_folder(cache_dir, root) / key
    _prepare_cache_dir(cache)
    _write_source(cache, checkpoint_source(checkpoint))
    cached = _load_cached(cache, key, embed_dim)

    old_rows: dict[str, tuple[int, int, int]] = {}
    old_bad: dict[str, tuple[int, int]] = {}
    if cached is not None:
        for row, (rel, mtime, size) in enumerate(zip(cached["paths"], cached["mtimes"].tolist(),
                                                     cached["sizes"].tolist())):
            old_rows[rel] = (row, mtime, size)
        old_bad = {rel: (mtime, size) for rel, mtime, size in
                   zip(cached["bad_paths"], cached["bad_mtimes"].tolist(),
                       cached["bad_sizes"].tolist())}
    reused: list[tuple[GalleryFile, int]] = []
    still_bad: list[GalleryFile] = []
    to_embed: list[GalleryFile] = []
    for f in files:
        old = old_rows.get(f.rel)
        if old is not None and old[1:] == (f.mtime_ns, f.size):
            reused.append((f, old[0]))
        elif old_bad.get(f.rel) == (f.mtime_ns, f.size):
            still_bad.append(f)
        else:
            to_embed.append(f)
    current = {f.rel for f in files}
    removed = sum(1 for rel in old_rows if rel not in current)
    stats = {"images": len(files), "reused": len(reused), "embedded": 0, "removed": removed,
             "unreadable": [f.rel for f in still_bad], "cache": str(cache)}
    if still_bad:
        _warn_unreadable(root, [os.path.join(root, f.rel) for f in still_bad], cached=True)
    if cached is not None and not to_embed and len(reused) == len(old_rows):  # up to date
        _prune_stale_caches(cache.parent, keep=cache)
        return GalleryIndex(root, cache, list(cached["paths"]), cached["array"][:cached["count"]],
                            stats)

    emb_name = f"emb-{uuid.uuid4().hex[:12]}.npy"
    try:
        paths, mtimes, sizes, bad, errors = _write_embeddings(
            encoder, transform, root, cache / emb_name, reused, to_embed, cached, batch_size,
            num_workers, device, precision)
    except BaseException:
        (cache / emb_name).unlink(missing_ok=True)
        raise
    bad = still_bad + bad
    stats["embedded"] = len(paths) - len(reused)
    stats["unreadable"] = [f.rel for f in bad]
    if errors:
        _warn_unreadable(root, errors, cached=False)
    if not paths:
        (cache / emb_name).unlink(missing_ok=True)
        raise DatasetError(f"none of the {len(files)} images under {root} could be read "
                           f"(first: {os.path.join(root, bad[0].rel)}); check the files")
    from utils.checkpoint import atomic_save
    atomic_save({"version": CACHE_VERSION, "key": key, "embeddings": emb_name,
                 "count": len(paths), "paths": paths,
                 "mtimes": torch.tensor(mtimes, dtype=torch.long),
                 "sizes": torch.tensor(sizes, dtype=torch.long),
                 "bad_paths": [f.rel for f in bad],
                 "bad_mtimes": torch.tensor([f.mtime_ns for f in bad], dtype=torch.long),
                 "bad_sizes": torch.tensor([f.size for f in bad], dtype=torch.long)},
                cache / "index.pt")  # the new embeddings become current only here
    for old in cache.glob("emb-*.npy"):
        if old.name != emb_name:
            try:
                old.unlink()
            except OSError as err:  # e.g. still mapped elsewhere on some systems
                logger.warning("could not remove the stale cache file %s (%s)", old, err)
    logger.info("gallery %s: %d images indexed (%d embedded now, %d from the cache, %d removed, "
                "%d unreadable)", root, len(paths), stats["embedded"], stats["reused"], removed,
                len(bad))
    _prune_stale_caches(cache.parent, keep=cache)
    embeddings = np.load(cache / emb_name, mmap_mode="r")[:len(paths)]
    return GalleryIndex(root, cache, paths, embeddings, stats)


def _write_embeddings(encoder: Encoder, transform: Callable, root: Path, emb_path: Path,
                      reused: list[tuple[GalleryFile, int]], to_embed: list[GalleryFile],
                      cached: dict | None, batch_size: int, num_workers: int,
                      device: torch.device, precision: str):
    """Fill a new memory-mapped embedding file: the reused rows first, then the new files.

    Rows of unreadable new files are left out (the file keeps a few unused
    rows at its end). Returns (paths, mtimes, sizes, unreadable files, their errors).
    """
    capacity = len(reused) + len(to_embed)
    emb = None

    def open_file(dim: int):
        return np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float16,
                                         shape=(capacity, dim))

    paths = [f.rel for f, _ in reused]
    mtimes = [f.mtime_ns for f, _ in reused]
    sizes = [f.size for f, _ in reused]
    if reused:
        emb = open_file(cached["array"].shape[1])
        old_rows = np.fromiter((row for _, row in reused), dtype=np.int64, count=len(reused))
        for start in range(0, len(old_rows), SEARCH_CHUNK):
            part = old_rows[start:start + SEARCH_CHUNK]
            emb[start:start + len(part)] = cached["array"][part]
    bad: list[GalleryFile] = []
    errors: list[str] = []
    loader = DataLoader(_GalleryImages(root, [f.rel for f in to_embed], transform),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    for step, (rows, images, failed) in enumerate(loader, start=1):
        for row, error in failed:
            bad.append(to_embed[row])
            errors.append(error)
        if step % 50 == 0:
            logger.info("embedding new gallery images: %d / %d",
                        min(step * batch_size, len(to_embed)), len(to_embed))
        if images is None:
            continue
        with autocast(device, precision):
            feats = encoder.encode_image(images.to(device, non_blocking=True))  # B, D
        feats = F.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float16)
        if emb is None:
            emb = open_file(feats.shape[1])
        emb[len(paths):len(paths) + len(rows)] = feats
        for row in rows.tolist():
            f = to_embed[row]
            paths.append(f.rel)
            mtimes.append(f.mtime_ns)
            sizes.append(f.size)
    if emb is not None:
        emb.flush()
    return paths, mtimes, sizes, bad, errors


def _warn_unreadable(root: Path, messages: Sequence[str], cached: bool) -> None:
    shown = "; ".join(messages[:MAX_LISTED]) + (" ..." if len(messages) > MAX_LISTED else "")
    note = " (known from the cache; fix or replace the files to retry)" if cached else ""
    logger.warning("%d unreadable image(s) under %s skipped%s: %s", len(messages), root, note,
                   shown)


@torch.no_grad()
def encode_queries(encoder: Encoder, texts: Sequence[str], tokenize: Callable,
                   device: torch.device | str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """(Q, D) L2-normalised float32 embeddings of `texts`.

    `tokenize(list[str])` gives the (Q, L) ids `encoder.encode_text` takes.
    """
    device = torch.device(device)
    ids = tokenize(list(texts)).to(device)  # Q, L
    with autocast(device, precision):
        feats = encoder.encode_text(ids)
    return F.normalize(feats.float(), dim=-1)


@dataclass
class Match:
    path: str      # the image file (gallery root joined with its relative path)
    score: float   # cosine similarity


def search_gallery(index: GalleryIndex, queries: torch.Tensor, k: int) -> list[list[Match]]:
    """The top-k gallery images of each query embedding (`encode_queries`), best first."""
    scores, rows = index.search(queries, k)
    return [[Match(index.path(r), s) for r, s in zip(row.tolist(), score.tolist())]
            for row, score in zip(rows, scores)]
