"""The decode-once image cache, batch-wise augmentation and the cached loaders."""
import json
import math
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

import datasets.cache as cache_module
from datasets import (BadImageError, ImageAugment, build_dataset, build_eval_loaders, build_eval_transform,
                      build_train_loader, read_image)
from datasets.cache import BatchAugment, ImageCache, normalize_uint8, splitmix64, uniform_from_seeds

SIZE = (48, 24)


@pytest.fixture(scope="module")
def dataset(synth_root):
    return build_dataset("CUHK-PEDES", synth_root)


@pytest.fixture
def private_root(synth_root, tmp_path):
    """A copy of the generated dataset that a test may change."""
    shutil.copytree(synth_root / "CUHK-PEDES", tmp_path / "CUHK-PEDES")
    return tmp_path


def train_paths(dataset):
    return sorted({item.path for item in dataset.train})


def reference_resize(path, size=SIZE) -> torch.Tensor:
    """(3, H, W) uint8 of the reference transforms' first step."""
    image = T.Resize(size, interpolation=InterpolationMode.BICUBIC)(read_image(path))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


# -- the cache ---------------------------------------------------------------------------------

def test_cached_pixels_equal_the_reference_resize(dataset, tmp_path):
    paths = train_paths(dataset)
    cache = ImageCache.open([item.path for item in dataset.train], SIZE, tmp_path)
    assert len(cache) == len(paths)  # every distinct image once, though each has two captions
    eval_transform = build_eval_transform(SIZE)
    for path in paths:
        pixels = cache.get(path)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, *SIZE)
        assert torch.equal(pixels, reference_resize(path))
        # Evaluation through the cache gives the reference tensors bit for bit.
        assert torch.equal(normalize_uint8(pixels), eval_transform(read_image(path)))


def test_cache_is_built_once_then_reused_without_decoding(dataset, tmp_path, monkeypatch):
    paths = train_paths(dataset)
    first = ImageCache.open(paths, SIZE, tmp_path)
    files = cache_files(tmp_path)
    assert [f.rsplit(".", 1)[-1] for f in files] == ["json", "npy"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt although nothing changed")

    monkeypatch.setattr(cache_module, "decode_resized", no_decoding)
    second = ImageCache.open(reversed(paths), SIZE, tmp_path)  # order and duplicates do not matter
    assert cache_files(tmp_path) == files
    assert np.array_equal(first.array, second.array)


def test_cache_is_rebuilt_when_an_image_changes(private_root, tmp_path):
    dataset = build_dataset("CUHK-PEDES", private_root)
    paths = train_paths(dataset)
    cache_dir = tmp_path / "cache"
    old = ImageCache.open(paths, SIZE, cache_dir)
    old_files = cache_files(cache_dir)
    changed = paths[3]
    with Image.open(changed) as image:
        Image.fromarray(255 - np.asarray(image.convert("RGB"))).save(changed)
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    new = ImageCache.open(paths, SIZE, cache_dir)
    assert torch.equal(new.get(changed), reference_resize(changed))
    assert not torch.equal(new.get(changed), old.get(changed))
    assert torch.equal(new.get(paths[0]), old.get(paths[0]))
    new_files = cache_files(cache_dir)
    assert len(new_files) == 2 and new_files[0] == old_files[0] and new_files[1] != old_files[1]  # same index file


def _dead_pid() -> int:
    pid = 2 ** 22 + 1  # above the default pid_max
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_a_build_killed_earlier_leaves_no_temporary_file_behind(dataset, tmp_path):
    """A SIGKILL during a build leaves images_*.npy.tmp.<host>.<pid>, the whole cache's
    size; the next open removes it once its process is gone, also when the cache itself
    is already valid. Another host's file is removed only after an hour untouched (its
    build, if alive, keeps writing it)."""
    paths = train_paths(dataset)
    ImageCache.open(paths, SIZE, tmp_path)  # a valid cache: the sweep must not need a rebuild
    host, dead = socket.gethostname(), _dead_pid()
    stale = tmp_path / f"images_8x4_abc_def.npy.tmp.{host}.{dead}"
    legacy = tmp_path / f"images_8x4_abc.json.tmp{dead}"
    live = tmp_path / f"images_8x4_abc_def.npy.tmp.{host}.{os.getppid()}"
    elsewhere_recent = tmp_path / f"images_8x4_abc_def.npy.tmp.other-node.{dead}"
    elsewhere_old = tmp_path / f"images_8x4_abc_xyz.npy.tmp.other-node.{dead}"
    unrelated = tmp_path / f"notes.npy.tmp.{host}.{dead}"
    for path in (stale, legacy, live, elsewhere_recent, elsewhere_old, unrelated):
        path.write_bytes(b"x" * 100)
    old = os.stat(elsewhere_old).st_mtime - cache_module._OTHER_HOST_STALE_S - 1
    os.utime(elsewhere_old, (old, old))
    ImageCache.open(paths, SIZE, tmp_path)
    assert not stale.exists() and not legacy.exists() and not elsewhere_old.exists()
    assert live.exists() and elsewhere_recent.exists() and unrelated.exists()


def test_cache_is_separate_per_image_size_and_image_set(dataset, tmp_path):
    paths = train_paths(dataset)
    small = ImageCache.open(paths, (32, 16), tmp_path)
    large = ImageCache.open(paths, SIZE, tmp_path)
    subset = ImageCache.open(paths[:5], SIZE, tmp_path)
    assert small.array.shape == (len(paths), 3, 32, 16)
    assert large.array.shape == (len(paths), 3, *SIZE)
    assert len(subset) == 5 and torch.equal(subset.get(paths[2]), large.get(paths[2]))
    assert len(cache_files(tmp_path)) == 6
    with pytest.raises(KeyError, match="not in the image cache"):
        subset.get(paths[7])


def test_cache_rebuilds_a_damaged_index(dataset, tmp_path):
    paths = train_paths(dataset)[:4]
    ImageCache.open(paths, SIZE, tmp_path)
    index = next(tmp_path.glob("*.json"))
    index.write_text("{not json")
    cache = ImageCache.open(paths, SIZE, tmp_path)
    assert json.loads(index.read_text())["paths"] == paths
    assert torch.equal(cache.get(paths[1]), reference_resize(paths[1]))


def test_building_with_worker_processes_gives_the_same_cache(dataset, tmp_path):
    paths = train_paths(dataset)
    serial = ImageCache.open(paths, SIZE, tmp_path / "serial")
    parallel = ImageCache.open(paths, SIZE, tmp_path / "parallel", num_workers=2)
    assert np.array_equal(serial.array, parallel.array)


def test_unreadable_image_stops_the_build_or_is_skipped(private_root, tmp_path):
    dataset = build_dataset("CUHK-PEDES", private_root)
    paths = train_paths(dataset)
    broken = paths[2]
    with open(broken, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BadImageError, match=f"1 unreadable image.*{os.path.basename(broken)}.*skip_bad_images"):
        ImageCache.open(paths, SIZE, tmp_path / "strict", num_workers=2)  # errors cross from the workers
    assert not list((tmp_path / "strict").glob("*.npy*"))  # no half-built file left behind

    cache = ImageCache.open(paths, SIZE, tmp_path / "lenient", skip_bad_images=True)
    with pytest.raises(BadImageError):
        cache.get(broken)
    # The training set replaces it by another image of the same identity, as the reference does.
    loader = build_train_loader(dataset, batch_size=len(dataset.train), image_size=SIZE,
                                cache_dir=tmp_path / "lenient", skip_bad_images=True)
    batch = next(iter(loader))
    assert int(batch["replaced_images"].sum()) == sum(item.path == broken for item in dataset.train) > 0


def test_cache_survives_pickling_without_the_pixels(dataset, tmp_path):
    import pickle
    paths = train_paths(dataset)
    cache = ImageCache.open(paths, SIZE, tmp_path)
    cache.get(paths[0])  # maps the file
    data = pickle.dumps(cache)
    assert len(data) < cache.array.nbytes / 10
    assert torch.equal(pickle.loads(data).get(paths[5]), cache.get(paths[5]))


# -- random numbers ------------------------------------------------------------------------------

def splitmix64_reference(seed: int, count: int) -> list[int]:
    out, state = [], seed % 2**64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) % 2**64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_matches_a_reference_implementation():
    seeds = [0, 1, 12345, 2**62 - 1, 3141592653589793238]
    got = splitmix64(torch.tensor(seeds), 5)
    for row, seed in zip(got.tolist(), seeds):
        assert [value % 2**64 for value in row] == splitmix64_reference(seed, 5)
    # Known first output of SplitMix64 seeded with 0.
    assert splitmix64(torch.tensor([0]), 1).item() % 2**64 == 0xE220A8397B1DCDAF
    u = uniform_from_seeds(torch.arange(1000), 8)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


# -- batch augmentation ------------------------------------------------------------------------

def reference_with_params(path, augment: ImageAugment, params, b: int) -> torch.Tensor:
    """The reference transforms of one sample, with BatchAugment's parameters instead of random ones."""
    image = TF.resize(read_image(path), list(SIZE), interpolation=InterpolationMode.BICUBIC)
    if params.flip[b]:
        image = TF.hflip(image)
    if augment.padding:
        image = TF.crop(TF.pad(image, augment.padding), int(params.top[b]), int(params.left[b]), *SIZE)
    x = T.Normalize(augment.mean, augment.std)(T.ToTensor()(image))
    if params.erase[b]:
        x = TF.erase(x, int(params.erase_top[b]), int(params.erase_left[b]), int(params.erase_height[b]),
                     int(params.erase_width[b]), torch.tensor(augment.mean)[:, None, None])
    return x


@pytest.mark.parametrize("augment", [ImageAugment(padding=3, erasing=1.0), ImageAugment(padding=5, erasing=0.5),
                                     ImageAugment(flip=False, padding=0, crop=False, erasing=0.0)])
def test_batch_augment_equals_the_reference_transforms_with_the_same_parameters(dataset, tmp_path, augment):
    paths = train_paths(dataset)
    cache = ImageCache.open(paths, SIZE, tmp_path)
    images = torch.stack([cache.get(p) for p in paths])
    batch_augment = BatchAugment(SIZE, augment)
    params = batch_augment.draw(torch.arange(len(paths)) * 7919 + 11)
    out = batch_augment.apply(images.clone(), params)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(images, torch.stack([cache.get(p) for p in paths]))  # the input is left as it was
    for b, path in enumerate(paths):
        assert torch.equal(out[b], reference_with_params(path, augment, params, b)), path
    if augment.erasing:
        assert params.erase.any() and params.flip.any() and (params.top != augment.padding).any()
        # The vectorised (device) and per-box (CPU) erasing agree.
        normalised = normalize_uint8(images)
        assert torch.equal(batch_augment._erase_masked(normalised.clone(), params),
                           batch_augment._erase_boxes(normalised.clone(), params))


def test_flip_only_gives_the_image_or_its_mirror(dataset, tmp_path):
    paths = train_paths(dataset)
    images = torch.stack([ImageCache.open(paths, SIZE, tmp_path).get(p) for p in paths])
    out = BatchAugment(SIZE, ImageAugment(flip=True, padding=0, erasing=0.0))(images, torch.arange(len(paths)))
    plain, mirrored = normalize_uint8(images), normalize_uint8(images.flip(-1))
    same = [torch.equal(o, p) for o, p in zip(out, plain)]
    mirror = [torch.equal(o, m) for o, m in zip(out, mirrored)]
    assert all(s or m for s, m in zip(same, mirror))
    assert any(same) and any(mirror)


def test_shift_fills_zeros_as_the_padding_does():
    image = torch.full((1, 3, *SIZE), 200, dtype=torch.uint8)
    augment = ImageAugment(flip=False, padding=4, erasing=0.0)
    batch_augment = BatchAugment(SIZE, augment)
    for seed in range(40):
        params = batch_augment.draw(torch.tensor([seed]))
        dy, dx = int(params.top) - 4, int(params.left) - 4
        if dy > 0 and dx < 0:
            break
    out = batch_augment.apply(image, params)
    zero = normalize_uint8(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0]
    value = normalize_uint8(torch.full((1, 3, 1, 1), 200, dtype=torch.uint8))[0]
    # Content moves up by dy and right by -dx: the bottom dy rows and the left -dx columns are padding.
    assert torch.equal(out[0, :, SIZE[0] - dy:, :], zero.expand(3, dy, SIZE[1]))
    assert torch.equal(out[0, :, :, :-dx], zero.expand(3, SIZE[0], -dx))
    assert torch.equal(out[0, :, :SIZE[0] - dy, -dx:], value.expand(3, SIZE[0] - dy, SIZE[1] + dx))


def test_augmentation_depends_only_on_each_sample_seed():
    batch_augment = BatchAugment((384, 128), ImageAugment())
    seeds = torch.randint(0, 2**62, (32,), generator=torch.Generator().manual_seed(0))
    images = torch.randint(0, 256, (32, 3, 384, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = batch_augment(images, seeds)
    assert torch.equal(out, batch_augment(images, seeds))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(batch_augment(images[perm], seeds[perm]), out[perm])  # not the batch's composition
    assert torch.equal(batch_augment(images[5:6], seeds[5:6]), out[5:6])
    assert not torch.equal(batch_augment(images, seeds + 1), out)


def test_augmentation_follows_the_reference_distribution():
    size, n = (384, 128), 4000
    augment = ImageAugment(padding=10, erasing=0.5)
    params = BatchAugment(size, augment).draw(torch.arange(n) + 10**12)
    assert abs(params.flip.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    for offsets in (params.top, params.left):
        counts = torch.bincount(offsets, minlength=21)
        assert counts.shape[0] == 21 and offsets.min() == 0 and offsets.max() == 20
        expected = n / 21
        assert ((counts - expected).abs() < 5 * math.sqrt(expected)).all()

    # Erasing boxes against torchvision's own parameter draws.
    erasing = T.RandomErasing(p=1.0, scale=augment.erasing_scale, value=list(augment.mean))
    image = torch.zeros(3, *size)
    torch.manual_seed(0)
    ref = torch.tensor([erasing.get_params(image, erasing.scale, erasing.ratio, [0.0, 0.0, 0.0])[:4]
                        for _ in range(n)], dtype=torch.float64)
    ref = ref[ref[:, 2] < size[0]]  # torchvision's "no box fitted" fallback returns the whole image
    mine = torch.stack([params.erase_top, params.erase_left, params.erase_height, params.erase_width],
                       dim=1)[params.erase].to(torch.float64)
    assert abs(params.erase.float().mean().item() - 0.5 * len(ref) / n) < 4 * math.sqrt(0.25 / n)
    for column in range(4):  # top, left, height, width: means within 4 standard errors
        a, b = ref[:, column], mine[:, column]
        se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
        assert abs(a.mean().item() - b.mean().item()) < 4 * se, column
    assert (mine[:, 0] + mine[:, 2] <= size[0]).all() and (mine[:, 1] + mine[:, 3] <= size[1]).all()
    area = mine[:, 2] * mine[:, 3] / (size[0] * size[1])
    assert area.min() > 0.015 and area.max() < 0.42


def test_batch_augment_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment(SIZE)(torch.zeros(2, 3, *SIZE), torch.arange(2))


# -- loaders -----------------------------------------------------------------------------------

def loader_args(**kwargs):
    return dict(batch_size=8, image_size=SIZE, augment=ImageAugment(padding=2), text_length=24, seed=3) | kwargs


def test_cached_train_loader_yields_the_same_batches_augmented_on_the_device(dataset, tmp_path):
    plain = build_train_loader(dataset, **loader_args())
    cached = build_train_loader(dataset, cache_dir=tmp_path, **loader_args())
    plain_batch = plain.prepare_batch(next(iter(plain)), torch.device("cpu"))
    raw = next(iter(cached))
    assert raw["images_uint8"].dtype == torch.uint8 and raw["images_uint8"].shape == (8, 3, *SIZE)
    batch = cached.prepare_batch(raw, torch.device("cpu"))
    assert set(batch) == set(plain_batch)
    for key in ("caption_ids", "pids", "image_ids"):
        assert torch.equal(batch[key], plain_batch[key])
    assert batch["images"].shape == plain_batch["images"].shape and batch["images"].dtype == torch.float32
    # Normalised as the reference: padding zeros map to -mean/std.
    assert batch["images"].min() >= -mean_over_std_max() - 1e-6

    model_inputs = cached.prepare_batch(raw, torch.device("cpu"), keys=("images", "caption_ids", "pids"))
    assert set(model_inputs) == {"images", "caption_ids", "pids"}
    assert torch.equal(model_inputs["images"], batch["images"])

    in_workers = build_train_loader(dataset, cache_dir=tmp_path, augment_in_workers=True, **loader_args())
    worker_batch = in_workers.prepare_batch(next(iter(in_workers)), torch.device("cpu"))
    assert torch.equal(worker_batch["images"], batch["images"])


def mean_over_std_max():
    from datasets import CLIP_MEAN, CLIP_STD
    return max(m / s for m, s in zip(CLIP_MEAN, CLIP_STD))


def test_cached_loader_resumes_mid_epoch_with_the_same_augmentation(dataset, tmp_path):
    cpu = torch.device("cpu")
    loader = build_train_loader(dataset, cache_dir=tmp_path, **loader_args())
    loader.batch_sampler.set_epoch(1)
    batches = [loader.prepare_batch(b, cpu)["images"] for b in loader]
    # A worker process that flips and crops (batches through shared memory), resumed mid-epoch.
    in_worker = build_train_loader(dataset, cache_dir=tmp_path, num_workers=1, augment_in_workers=True,
                                   **loader_args())
    in_worker.batch_sampler.set_epoch(1, start_batch=2)
    resumed = [in_worker.prepare_batch(b, cpu)["images"] for b in in_worker]
    assert len(resumed) == len(batches) - 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[2:]))
    loader.batch_sampler.set_epoch(2)
    assert not torch.equal(loader.prepare_batch(next(iter(loader)), cpu)["images"], batches[0])


def test_cached_eval_loader_gives_the_reference_tensors(dataset, tmp_path):
    plain_images, _ = build_eval_loaders(dataset.test, image_size=SIZE, batch_size=7)
    cached_images, _ = build_eval_loaders(dataset.test, image_size=SIZE, batch_size=7, cache_dir=tmp_path)
    for a, b in zip(plain_images, cached_images):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["pids"], b["pids"])
