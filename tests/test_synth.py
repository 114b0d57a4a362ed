"""The synthetic data generator: formats, determinism, truthful captions, ensure_synthetic."""
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from datasets import synth
from datasets.synth import FORMATS, draw_identity, ensure_synthetic, generate

FIELDS = {"cuhk": {"split", "captions", "file_path", "processed_tokens", "id"},
          "icfg": {"split", "captions", "file_path", "processed_tokens", "id"},
          "rstp": {"split", "captions", "img_path", "id"}}


def load(folder, fmt):
    with open(os.path.join(folder, FORMATS[fmt].annotation)) as f:
        return json.load(f)


def all_files(folder):
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_generated_files_follow_the_real_format(tmp_path, fmt):
    spec = FORMATS[fmt]
    folder = generate(str(tmp_path), fmt, num_ids=10, seed=1)
    assert folder == os.path.join(str(tmp_path), spec.folder)
    entries = load(folder, fmt)
    ids = {}
    sizes = set()
    for entry in entries:
        assert set(entry) == FIELDS[fmt]
        assert entry["split"] in spec.splits and isinstance(entry["id"], int) and entry["id"] >= 1
        assert len(entry["captions"]) == spec.captions_per_image
        path = os.path.join(folder, "imgs", entry[spec.path_field])
        assert path.endswith(spec.image_ext)
        with Image.open(path) as image:
            assert image.format == ("PNG" if fmt == "cuhk" else "JPEG") and image.mode == "RGB"
            width, height = image.size
        assert 56 <= width <= 160 and 2.2 <= height / width <= 3.1
        sizes.add(image.size)
        if spec.processed_tokens:
            assert entry["processed_tokens"] == [synth.processed_tokens(c) for c in entry["captions"]]
            assert all(t == t.lower() for tokens in entry["processed_tokens"] for t in tokens)
        ids.setdefault(entry["split"], set()).add(entry["id"])
    assert set(ids) == set(spec.splits)
    assert set.union(*ids.values()) == set(range(1, 11))
    assert sum(len(v) for v in ids.values()) == 10            # splits are disjoint by identity
    assert len(sizes) > len(entries) // 2                      # varied crop sizes
    if fmt == "icfg":
        assert all(e["file_path"].startswith(f"{e['split']}/{e['id']:04d}/") for e in entries)


def test_generation_is_deterministic_by_seed(tmp_path):
    a = all_files(generate(str(tmp_path / "a"), "rstp", num_ids=5, seed=3))
    b = all_files(generate(str(tmp_path / "b"), "rstp", num_ids=5, seed=3))
    c = all_files(generate(str(tmp_path / "c"), "rstp", num_ids=5, seed=4))
    assert a == b
    assert a["data_captions.json"] != c["data_captions.json"]
    # Regenerating in place (smaller) leaves no stale files behind.
    again = all_files(generate(str(tmp_path / "a"), "rstp", num_ids=3, seed=3))
    assert len(load(str(tmp_path / "a" / "RSTPReid"), "rstp")) == 15 and len(again) == 15 + 2


def test_captions_name_the_drawn_attributes(tmp_path):
    folder = generate(str(tmp_path), "cuhk", num_ids=30, seed=0)
    captions = {}
    for entry in load(folder, "cuhk"):
        captions.setdefault(entry["id"], []).extend(entry["captions"])
    varied = set()
    for pid, texts in captions.items():
        person = draw_identity(0, pid)
        upper_colours = synth.COLOURS[person.upper_colour][1]
        upper_words = synth.UPPER_TYPES[person.upper]
        for text in texts:
            lower = text.lower()
            assert any(f"{c} {w}" in lower or f"{w} that is {c}" in lower
                       for c in upper_colours for w in upper_words), (pid, text)
            if person.bag is None:
                assert not any(w in lower for b in synth.BAG_TYPES.values() for w in b), (pid, text)
            pronoun = "she" if person.gender == "woman" else "he"
            other = "he" if pronoun == "she" else "she"
            assert f" {other} " not in f" {lower} ", (pid, text)
            varied.add(text.split()[1] + " " + text.split()[2])
    assert len(varied) > 10  # wording varies


def test_clothing_colours_cover_large_areas():
    """Recolouring the upper (lower) garment changes a large part of the image: colours are learnable."""
    def changed_fraction(a, b):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        return float((np.abs(a - b).max(-1) > 30).mean())

    for pid in range(1, 21):
        person = draw_identity(5, pid)
        image, _ = synth.draw_image(person, seed=5, k=0, camera=1)
        other = "green" if person.upper_colour != "green" else "red"
        recoloured, _ = synth.draw_image(dataclasses.replace(person, upper_colour=other), seed=5, k=0, camera=1)
        assert changed_fraction(image, recoloured) > 0.06, (pid, person)
        if person.lower:
            other = "yellow" if person.lower_colour != "yellow" else "red"
            recoloured, _ = synth.draw_image(dataclasses.replace(person, lower_colour=other), seed=5, k=0, camera=1)
            assert changed_fraction(image, recoloured) > 0.03, (pid, person)


def test_ensure_synthetic_generates_once_and_never_overwrites(tmp_path):
    folder = ensure_synthetic(str(tmp_path), "ICFG-PEDES", num_ids=4, seed=0)
    annotation = os.path.join(folder, "ICFG_PEDES.json")
    stamp = os.stat(annotation).st_mtime_ns
    assert ensure_synthetic(str(tmp_path), "ICFG-PEDES", num_ids=4, seed=0) == folder
    assert os.stat(annotation).st_mtime_ns == stamp
    os.remove(annotation)                                  # an interrupted generation
    ensure_synthetic(str(tmp_path), "ICFG-PEDES", num_ids=4, seed=0)
    assert os.path.isfile(annotation)

    foreign = tmp_path / "other" / "CUHK-PEDES"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("a real dataset folder missing its annotation file")
    with pytest.raises(FileExistsError, match="was not written by datasets.synth"):
        ensure_synthetic(str(tmp_path / "other"), "CUHK-PEDES", num_ids=4, seed=0)
    with pytest.raises(KeyError, match="CUHK-PEDES"):
        ensure_synthetic(str(tmp_path), "Market-1501", num_ids=4, seed=0)


def test_cli_writes_a_dataset(tmp_path, capsys):
    assert synth.main(["--root", str(tmp_path), "--format", "cuhk", "--num_ids", "4", "--seed", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "CUHK-PEDES" / "reid_raw.json")
    assert synth.main(["--root", str(tmp_path), "--format", "cuhk", "--num_ids", "2", "--seed", "2"]) == 2
    assert "at least one identity" in capsys.readouterr().err
