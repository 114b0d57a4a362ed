"""Loaders, their error messages, the val hold-out, datasets.check, transforms and loaders."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import (CLIP_MEAN, CLIP_STD, DATASETS, BadImageError, DatasetError, ImageAugment, TextAugment,
                      augment_caption, build_dataset, build_eval_loaders, build_eval_transform,
                      build_train_loader, build_train_transform)
from datasets import check
from datasets.synth import FORMATS, generate
from utils.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, tokenize

NAMES = {"cuhk": "CUHK-PEDES", "icfg": "ICFG-PEDES", "rstp": "RSTPReid"}
NUM_IDS = 12


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pedes")
    for fmt in FORMATS:
        generate(str(root), fmt, NUM_IDS, seed=0)
    return str(root)


def copy_dataset(data_root, tmp_path, fmt="cuhk"):
    """A private copy of one generated dataset that a test may break."""
    folder = FORMATS[fmt].folder
    shutil.copytree(os.path.join(data_root, folder), tmp_path / folder)
    return str(tmp_path), tmp_path / folder / FORMATS[fmt].annotation


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)


# -- loaders on generated data ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_loader_reads_generated_data_of_its_format(data_root, fmt):
    spec = FORMATS[fmt]
    entries = read_json(os.path.join(data_root, spec.folder, spec.annotation))
    ds = build_dataset(NAMES[fmt], data_root, val_ids=2 if fmt == "icfg" else None)
    by_split = {s: [e for e in entries if e["split"] == s] for s in spec.splits}

    # Test split: every image once, every caption once, original ids, file order.
    test = by_split["test"]
    assert ds.test.image_pids == [e["id"] for e in test]
    assert ds.test.image_paths == [os.path.abspath(os.path.join(data_root, spec.folder, "imgs", e[spec.path_field]))
                                   for e in test]
    assert ds.test.captions == [c for e in test for c in e["captions"]]
    assert ds.test.caption_pids == [e["id"] for e in test for _ in e["captions"]]
    assert all(os.path.isfile(p) for p in ds.test.image_paths)

    # Train: one item per caption, pids remapped to 0..N-1, captions of an image share image_id.
    train_ids = {e["id"] for e in by_split["train"]} - set(ds.val_pids)
    assert ds.num_train_pids == len(train_ids)
    assert sorted({item.pid for item in ds.train}) == list(range(ds.num_train_pids))
    assert sorted(ds.train_pid_map) == sorted(train_ids)
    num_images = len({item.path for item in ds.train})
    assert sorted({item.image_id for item in ds.train}) == list(range(num_images))
    per_image = {}
    for item in ds.train:
        per_image.setdefault(item.image_id, set()).add((item.path, item.pid))
    assert all(len(v) == 1 for v in per_image.values())
    assert len(ds.train) == num_images * spec.captions_per_image
    assert not train_ids & set(ds.test.image_pids)

    if fmt == "icfg":  # no val split in the file: held out of train
        assert ds.val is not None and len(set(ds.val.image_pids)) == 2
        assert set(ds.val.image_pids) <= {e["id"] for e in by_split["train"]}
    else:              # the file's own val split
        assert ds.val.image_pids == [e["id"] for e in by_split["val"]]


def test_icfg_accepts_dashed_annotation_name(data_root, tmp_path):
    root, annotation = copy_dataset(data_root, tmp_path, "icfg")
    os.rename(annotation, annotation.with_name("ICFG-PEDES.json"))
    ds = build_dataset("ICFG-PEDES", root, val_ids=2)
    assert len(ds.test.image_paths) > 0


def test_unknown_dataset_name_lists_known_names(data_root):
    with pytest.raises(DatasetError) as err:
        build_dataset("Market-1501", data_root)
    assert all(name in str(err.value) for name in DATASETS)


# -- error paths ------------------------------------------------------------------------------

def test_missing_root_says_where_and_layout(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="does not exist") as err:
        build_dataset("CUHK-PEDES", missing)
    assert missing in str(err.value) and "reid_raw.json" in str(err.value) and "imgs/" in str(err.value)


def test_missing_annotation_file_says_where_it_looked(tmp_path):
    (tmp_path / "ICFG-PEDES").mkdir()
    with pytest.raises(DatasetError) as err:
        build_dataset("ICFG-PEDES", str(tmp_path))
    message = str(err.value)
    assert os.path.join(str(tmp_path), "ICFG-PEDES", "ICFG_PEDES.json") in message
    assert "ICFG-PEDES.json" in message and "file_path" in message and "imgs/" in message


def test_dataset_folder_given_as_root_gets_a_hint(data_root):
    with pytest.raises(DatasetError, match="pass the folder that contains RSTPReid/"):
        build_dataset("RSTPReid", os.path.join(data_root, "RSTPReid"))


def test_malformed_json_names_file_and_entry(data_root, tmp_path):
    root, annotation = copy_dataset(data_root, tmp_path)
    write_json(annotation, read_json(annotation))  # one entry per block of lines
    text = annotation.read_text()
    starts = [i for i in range(len(text)) if text.startswith('\n {\n  "split"', i)]
    broken = text[:starts[3]] + text[starts[3]:].replace('"captions":', '"captions"', 1)
    annotation.write_text(broken)
    with pytest.raises(DatasetError) as err:
        build_dataset("CUHK-PEDES", root)
    assert "reid_raw.json is not valid JSON" in str(err.value) and "entry 3 " in str(err.value)


def test_entry_problems_name_entry_and_field(data_root, tmp_path):
    root, annotation = copy_dataset(data_root, tmp_path)
    entries = read_json(annotation)
    del entries[5]["captions"]
    entries[7]["id"] = "seven"
    entries[8]["split"] = "dev"
    entries[9] = ["not", "an", "object"]
    write_json(annotation, entries)
    with pytest.raises(DatasetError) as err:
        build_dataset("CUHK-PEDES", root)
    message = str(err.value)
    assert "4 problem(s)" in message
    assert "reid_raw.json entry 5: missing field 'captions'" in message
    assert "entry 7: field 'id' must be an integer, got 'seven'" in message
    assert "entry 8: field 'split' is 'dev'" in message
    assert "entry 9: expected an object" in message


def test_rstp_missing_img_path_field_is_named(data_root, tmp_path):
    root, annotation = copy_dataset(data_root, tmp_path, "rstp")
    entries = read_json(annotation)
    entries[2]["file_path"] = entries[2].pop("img_path")  # the CUHK field name in an RSTPReid file
    write_json(annotation, entries)
    with pytest.raises(DatasetError, match="data_captions.json entry 2: missing field 'img_path'"):
        build_dataset("RSTPReid", root)


def test_identities_shared_between_train_and_test_are_reported(data_root, tmp_path):
    root, annotation = copy_dataset(data_root, tmp_path)
    entries = read_json(annotation)
    test_id = next(e["id"] for e in entries if e["split"] == "test")
    next(e for e in entries if e["split"] == "train")["id"] = test_id
    write_json(annotation, entries)
    with pytest.raises(DatasetError) as err:
        build_dataset("CUHK-PEDES", root)
    assert f"1 identity is in both train and test (ids {test_id})" in str(err.value)


@pytest.mark.parametrize("escape", [
    "CUHK01/../../../outside/secret.png", "../../outside/secret.png",
    "CUHK01\\..\\..\\..\\outside\\secret.png", "{outside}"])
def test_image_paths_leading_outside_the_image_folder_are_refused(data_root, tmp_path, capsys,
                                                                  escape):
    root, annotation = copy_dataset(data_root, tmp_path)
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    images = tmp_path / "CUHK-PEDES" / "imgs"
    shutil.copyfile(images / read_json(annotation)[0]["file_path"], secret)
    escape = escape.format(outside=secret)
    entries = read_json(annotation)
    entries[3]["file_path"] = escape
    # Inside after normalisation: accepted, and opened at the normalised path.
    inside = entries[4]["file_path"]
    entries[4]["file_path"] = f"CUHK01/../{inside}"
    write_json(annotation, entries)
    expected = (f"reid_raw.json entry 3: field 'file_path' is {escape!r}, which points outside "
                f"CUHK-PEDES/imgs/")
    for check_images in (True, False):
        with pytest.raises(DatasetError) as err:
            build_dataset("CUHK-PEDES", root, check_images=check_images)
        assert expected in str(err.value) and "1 problem(s)" in str(err.value)
    assert check.main(["--root", root, "--dataset", "CUHK-PEDES"]) == 1
    assert expected in capsys.readouterr().out

    entries[3]["file_path"] = read_json(annotation)[2]["file_path"]
    write_json(annotation, entries)
    ds = build_dataset("CUHK-PEDES", root)
    paths = ds.test.image_paths + ds.val.image_paths + [item.path for item in ds.train]
    assert os.path.abspath(images / inside) in paths
    assert not any(".." in p for p in paths)


def test_missing_images_counted_with_first_paths(data_root, tmp_path):
    root, annotation = copy_dataset(data_root, tmp_path)
    entries = read_json(annotation)
    for e in entries[:7]:
        os.remove(tmp_path / "CUHK-PEDES" / "imgs" / e["file_path"])
    with pytest.raises(DatasetError) as err:
        build_dataset("CUHK-PEDES", root)
    message = str(err.value)
    assert f"7 of {len(entries)} image files are missing" in message
    assert all(e["file_path"] in message for e in entries[:5])
    assert entries[5]["file_path"] not in message
    build_dataset("CUHK-PEDES", root, check_images=False)  # the check can be skipped


def test_corrupt_image_raises_bad_image_error_with_path(data_root, tmp_path):
    root, _ = copy_dataset(data_root, tmp_path)
    ds = build_dataset("CUHK-PEDES", root)
    bad = ds.train[0].path
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(data[:len(data) // 2])  # truncated PNG
    loader = build_train_loader(ds.train[:2], batch_size=2, image_size=(32, 16))
    with pytest.raises(BadImageError, match=bad):
        next(iter(loader))
    os.remove(bad)
    loader = build_train_loader(ds.train[:2], batch_size=2, image_size=(32, 16), num_workers=1)
    with pytest.raises(BadImageError, match="file not found"):  # raised in a worker, re-raised here
        next(iter(loader))
    # skip_bad_images substitutes another image of the same identity.
    same_pid = [t for t in ds.train if t.pid == ds.train[0].pid]
    loader = build_train_loader(same_pid, batch_size=len(same_pid), image_size=(32, 16), skip_bad_images=True)
    assert next(iter(loader))["images"].shape[0] == len(same_pid)


# -- val hold-out ------------------------------------------------------------------------------

def test_icfg_val_holdout_is_disjoint_and_deterministic(data_root):
    a = build_dataset("ICFG-PEDES", data_root, val_ids=3, seed=0)
    b = build_dataset("ICFG-PEDES", data_root, val_ids=3, seed=0)
    others = [build_dataset("ICFG-PEDES", data_root, val_ids=3, seed=s).val_pids for s in (1, 2, 3)]
    assert a.val_pids == b.val_pids and len(a.val_pids) == 3
    assert any(o != a.val_pids for o in others)
    train_ids = set(a.train_pid_map)
    assert not train_ids & set(a.val_pids)
    assert set(a.val.image_pids) == set(a.val.caption_pids) == set(a.val_pids)
    assert not set(a.val_pids) & set(a.test.image_pids)
    assert sorted({t.pid for t in a.train}) == list(range(a.num_train_pids))
    full = build_dataset("ICFG-PEDES", data_root, val_ids=0)
    assert full.val is None and full.num_train_pids == a.num_train_pids + 3
    assert full.test.image_paths == a.test.image_paths


def test_icfg_default_holdout_needs_enough_identities(data_root):
    with pytest.raises(DatasetError, match="200 training identities are held out.*val_ids"):
        build_dataset("ICFG-PEDES", data_root)


def test_holdout_replaces_native_val_and_keeps_one_training_id(data_root):
    native = build_dataset("CUHK-PEDES", data_root)
    held = build_dataset("CUHK-PEDES", data_root, val_ids=2, seed=5)
    assert not set(held.val_pids) & set(native.val_pids)
    assert set(held.val_pids) <= set(native.train_pid_map)
    with pytest.raises(DatasetError, match="at least one must stay for training"):
        build_dataset("CUHK-PEDES", data_root, val_ids=native.num_train_pids)


# -- datasets.check ---------------------------------------------------------------------------

def test_check_passes_a_good_dataset(data_root, capsys):
    assert check.main(["--root", data_root, "--dataset", "RSTPReid", "--verify_images"]) == 0
    out = capsys.readouterr().out
    assert "No problems found" in out and "captions" in out and re.search(r"\|\s+train\s+\|", out)


def test_check_shows_the_validation_split_a_default_run_holds_out(data_root, capsys):
    from datasets.build import statistics_table
    from utils.config import load_config
    seed = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml")).seed
    assert check.main(["--root", data_root, "--dataset", "CUHK-PEDES", "--val_ids", "3"]) == 0
    out = capsys.readouterr().out
    run_split = statistics_table(build_dataset("CUHK-PEDES", data_root, val_ids=3, seed=seed))
    assert f"seed {seed}" in out and str(run_split) in out


def test_check_flags_a_deleted_image(data_root, tmp_path, capsys):
    root, annotation = copy_dataset(data_root, tmp_path)
    path = read_json(annotation)[4]["file_path"]
    os.remove(tmp_path / "CUHK-PEDES" / "imgs" / path)
    assert check.main(["--root", root, "--dataset", "CUHK-PEDES"]) == 1
    out = capsys.readouterr().out
    assert "1 of" in out and "missing" in out and path in out and re.search(r"\|\s+test\s+\|", out)


def test_check_flags_a_broken_json(data_root, tmp_path, capsys):
    root, annotation = copy_dataset(data_root, tmp_path, "icfg")
    annotation.write_text(annotation.read_text()[:-10])
    assert check.main(["--root", root, "--dataset", "ICFG-PEDES", "--val_ids", "2"]) == 1
    assert "ICFG_PEDES.json is not valid JSON" in capsys.readouterr().out


def test_check_flags_a_corrupt_image_with_verify(data_root, tmp_path, capsys):
    root, annotation = copy_dataset(data_root, tmp_path, "rstp")
    path = tmp_path / "RSTPReid" / "imgs" / read_json(annotation)[0]["img_path"]
    path.write_bytes(path.read_bytes()[:200])
    assert check.main(["--root", root, "--dataset", "RSTPReid"]) == 0  # exists: fine without decoding
    assert check.main(["--root", root, "--dataset", "RSTPReid", "--verify_images"]) == 1
    assert str(path) in capsys.readouterr().out


# -- transforms and text augmentation ---------------------------------------------------------

def test_transforms_give_configured_size_and_clip_normalisation():
    mean_rgb = tuple(int(round(m * 255)) for m in CLIP_MEAN)
    image = Image.new("RGB", (70, 190), mean_rgb)
    out = build_eval_transform((48, 24))(image)
    assert out.shape == (3, 48, 24) and out.abs().max() < 0.01
    white = build_eval_transform((48, 24))(Image.new("RGB", (70, 190), (255, 255, 255)))
    assert torch.allclose(white[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-4)
    train = build_train_transform((40, 20), ImageAugment(padding=4, erasing=1.0))(image)
    assert train.shape == (3, 40, 20)
    assert (train.abs() > 0.3).any()  # padding (black) and/or erasing show up
    plain = build_train_transform((48, 24), ImageAugment(flip=False, crop=False, erasing=0.0))
    gradient = Image.fromarray(np.tile(np.arange(70, dtype=np.uint8)[None, :, None], (190, 1, 3)))
    assert torch.equal(plain(gradient), build_eval_transform((48, 24))(gradient))


def _content(row):
    eot = int((row == EOT_TOKEN_ID).nonzero()[0, 0])
    return row[1:eot].tolist(), eot


def test_text_augmentation_never_touches_special_tokens_or_padding():
    captions = ["A woman wearing a red coat and black trousers, carrying a blue backpack.",
                "a man " + "in a gray shirt " * 30]  # truncated: EOT in the last position
    aug = TextAugment(enabled=True, mask_prob=0.3, replace_prob=0.3, delete_prob=0.3)
    changed = 0
    for ids in tokenize(captions, context_length=32):
        original, _ = _content(ids)
        for seed in range(50):
            out = augment_caption(ids, aug, torch.Generator().manual_seed(seed))
            tokens, eot = _content(out)
            assert out.shape == ids.shape and out[0] == SOT_TOKEN_ID
            assert (out == EOT_TOKEN_ID).sum() == 1 and (out[eot + 1:] == 0).all()
            assert 1 <= len(tokens) <= len(original)
            assert all(t < 49405 or t == MASK_TOKEN_ID for t in tokens)
            changed += tokens != original
    assert changed > 90
    ids = tokenize(captions[0], context_length=32)[0]
    assert torch.equal(augment_caption(ids, TextAugment(enabled=False), torch.Generator()), ids)
    deleted = augment_caption(ids, TextAugment(True, 0.0, 0.0, 0.5), torch.Generator().manual_seed(0))
    kept, original = _content(deleted)[0], _content(ids)[0]
    it = iter(original)
    assert len(kept) < len(original) and all(t in it for t in kept)  # an ordered subsequence


# -- DataLoaders ------------------------------------------------------------------------------

def _batches(loader, epoch, start_batch=0):
    loader.batch_sampler.set_epoch(epoch, start_batch=start_batch)
    return list(loader)


def test_train_loader_batches_are_reproducible_and_resumable(data_root):
    ds = build_dataset("RSTPReid", data_root)
    kwargs = dict(batch_size=4, sampler="identity", num_instances=2, image_size=(32, 16),
                  text_aug=TextAugment(enabled=True), seed=3)
    loader = build_train_loader(ds, **kwargs)
    state = torch.get_rng_state()
    epoch1 = _batches(loader, 1)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is untouched
    batch = epoch1[0]
    assert batch["images"].shape == (4, 3, 32, 16) and batch["images"].dtype == torch.float32
    assert batch["caption_ids"].shape == (4, 77) and batch["caption_ids"].dtype == torch.long
    assert batch["pids"].tolist()[::2] == batch["pids"].tolist()[1::2]
    assert len(loader) == len(epoch1) == -(-ds.num_train_pids // 2) >= 3

    workers = build_train_loader(ds, **kwargs, num_workers=2, persistent_workers=True)
    resumed = _batches(workers, 1, start_batch=2)
    assert len(resumed) == len(epoch1) - 2
    for a, b in zip(epoch1[2:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_epoch = _batches(loader, 2)[0]
    assert not torch.equal(other_epoch["images"], batch["images"])


def test_train_loader_shards_the_global_batch_across_ranks(data_root):
    ds = build_dataset("CUHK-PEDES", data_root)
    kwargs = dict(batch_size=8, image_size=(32, 16), seed=0, augment=ImageAugment())
    single = _batches(build_train_loader(ds, **kwargs), 0)
    ranks = [_batches(build_train_loader(ds, **kwargs, rank=r, world_size=2), 0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):
        for key in batch:
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])


def test_eval_loaders_keep_split_order(data_root):
    ds = build_dataset("CUHK-PEDES", data_root)
    images, texts = build_eval_loaders(ds.test, image_size=(32, 16), batch_size=3, text_length=40,
                                       num_workers=0, pin_memory=False)
    image_batches, text_batches = list(images), list(texts)
    assert torch.cat([b["pids"] for b in image_batches]).tolist() == ds.test.image_pids
    assert torch.cat([b["pids"] for b in text_batches]).tolist() == ds.test.caption_pids
    assert len(image_batches) >= 2 and image_batches[0]["images"].shape == (3, 3, 32, 16)
    ids = torch.cat([b["caption_ids"] for b in text_batches])
    assert ids.shape == (len(ds.test.captions), 40) and torch.equal(ids, tokenize(ds.test.captions, 40))
