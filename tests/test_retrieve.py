"""retrieve.py and utils/gallery.py: ranking a folder of crops, the embedding cache, bad input."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieve
import utils.visualization as vis
from conftest import ROOT, TINY_MODEL
from datasets.pedes import DatasetError
from datasets.synth import COLOURS, draw_identity, draw_image
from datasets.transforms import CLIP_MEAN, CLIP_STD
from utils.config import ConfigError
from utils.gallery import KEY_PATTERN, GalleryIndex
from utils.tokenizer import EOT_TOKEN_ID, get_tokenizer

CONFIG = str(ROOT / "configs" / "demo.yaml")
# Identities of datasets.synth (seed 0) whose tops have well separated colours
# and no backpack over the torso: pid -> upper colour.
PIDS = {27: "red", 10: "green", 11: "yellow", 26: "blue", 34: "white", 0: "purple"}
IMAGES_PER_ID = 3
COLOUR_NAMES = list(COLOURS)
PALETTE = torch.tensor([COLOURS[n][0] for n in COLOUR_NAMES], dtype=torch.float32) / 255
COLOUR_WORDS = sorted(((w, i) for i, n in enumerate(COLOUR_NAMES) for w in COLOURS[n][1]),
                      key=lambda item: -len(item[0]))  # "light blue" before "blue"


class ColourModel:
    """A deterministic stand-in for a trained model: both encoders map to the
    synthetic palette. An image becomes a soft assignment of the median colour
    of its torso to the palette colours; a caption becomes the one-hot of the
    first colour word it names (the top's colour in the captions used here)."""

    def __init__(self):
        self.images_encoded = 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # B,3,H,W -> B,C
        self.images_encoded += len(images)
        std, mean = torch.tensor(CLIP_STD)[:, None, None], torch.tensor(CLIP_MEAN)[:, None, None]
        rgb = images * std + mean  # B, 3, H, W in [0, 1]
        height, width = rgb.shape[-2:]
        torso = rgb[:, :, int(0.25 * height):int(0.45 * height),
                    int(0.38 * width):int(0.62 * width)]
        colour = torso.flatten(2).median(dim=2).values  # B, 3
        distance = ((colour[:, None, :] - PALETTE[None]) ** 2).sum(-1)  # B, C
        return torch.softmax(-distance / 0.01, dim=-1)

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor:  # B,L -> B,C
        tokenizer = get_tokenizer()
        out = torch.zeros(len(caption_ids), len(COLOUR_NAMES))
        for row, ids in enumerate(caption_ids.tolist()):
            text = tokenizer.decode([t for t in ids if 0 < t < EOT_TOKEN_ID - 2])
            for word, index in COLOUR_WORDS:
                if re.search(rf"\b{word}\b", text):
                    out[row, index] = 1.0
                    break
        return out


def caption_of(pid: int) -> str:
    person = draw_identity(0, pid)
    return f"a {person.gender} wearing a {person.upper_colour} {person.upper}"


def write_gallery(folder) -> dict[int, list[str]]:
    """Synthetic crops of PIDS in nested folders, as jpg and png; pid -> relative paths."""
    paths: dict[int, list[str]] = {}
    for n, pid in enumerate(PIDS):
        person = draw_identity(0, pid)
        for k in range(IMAGES_PER_ID):
            image, _ = draw_image(person, 0, k, camera=1 + k)
            rel = f"cam{k}/{'day' if n % 2 else 'night'}/p{pid:03d}_{k}.{'png' if k % 2 else 'jpg'}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(folder / rel, quality=95)
            paths.setdefault(pid, []).append(rel)
    return paths


@pytest.fixture
def gallery(tmp_path):
    folder = tmp_path / "crops"
    return folder, write_gallery(folder)


@pytest.fixture
def colour_run(tmp_path, monkeypatch):
    """retrieve.main with the colour model in place of a trained checkpoint."""
    from utils.config import load_config, save_config
    cfg = load_config(CONFIG, ["device=cpu", "dataset.num_workers=0", "eval.batch_size=4"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "configs.yaml")
    checkpoint = run_dir / "best.pth"
    checkpoint.write_bytes(b"weights")  # only its path, mtime and size matter (cache key)
    model = ColourModel()
    monkeypatch.setattr(vis, "load_run", lambda cfg, run_dir, checkpoint_path=None:
                        vis.LoadedRun(cfg, model, torch.device("cpu"), run_dir,
                                      Path(checkpoint_path) if checkpoint_path else checkpoint))
    return run_dir, model


def cache_folders(base) -> list:
    """The per-checkpoint cache folders under a cache base (base/<gallery>-<hash>/<key>)."""
    return sorted(p for p in Path(base).glob("*/*") if KEY_PATTERN.fullmatch(p.name))


def _retrieve(run_dir, folder, *args) -> dict:
    return retrieve.main(["--config_file", str(run_dir / "configs.yaml"), "--gallery", str(folder),
                          *args])


def _pids_of(matches) -> list[int]:
    return [int(re.search(r"p(\d{3})_", os.path.basename(path)).group(1)) for path, _ in matches]


def test_caption_of_an_identity_ranks_its_images_first(colour_run, gallery, capsys):
    run_dir, _ = colour_run
    folder, _ = gallery
    queries = [caption_of(pid) for pid in PIDS]
    args = [a for q in queries for a in ("--query", q)]
    result = _retrieve(run_dir, folder, *args, "--topk", "5")
    assert len(result["queries"]) == len(PIDS)
    for pid, query in zip(PIDS, result["queries"]):
        matches = query["matches"]
        assert len(matches) == 5
        assert _pids_of(matches)[:IMAGES_PER_ID] == [pid] * IMAGES_PER_ID, query["query"]
        assert pid not in _pids_of(matches)[IMAGES_PER_ID:]
        scores = [s for _, s in matches]
        assert scores == sorted(scores, reverse=True)
        assert all(os.path.isfile(p) for p, _ in matches)
        figure = query["figure"]
        assert figure.startswith(str(run_dir / "vis" / "retrieval_"))
        with Image.open(figure) as image:
            assert image.size == vis.ranking_figure_size(5) == (800, 500)
    printed = capsys.readouterr().out
    first_path, first_score = result["queries"][0]["matches"][0]
    assert f"   1  {first_score:.4f}  {first_path}" in printed
    assert f"figure: {result['queries'][0]['figure']}" in printed
    assert len(list(folder.glob("*.png"))) == 0  # figures never land in the gallery


def test_cache_is_reused_and_follows_file_changes(colour_run, gallery, tmp_path):
    run_dir, model = colour_run
    folder, paths = gallery
    total = len(PIDS) * IMAGES_PER_ID
    query = ["--query", caption_of(27)]
    first = _retrieve(run_dir, folder, *query)["gallery"]
    assert (first["embedded"], first["reused"], model.images_encoded) == (total, 0, total)
    caches = cache_folders(run_dir / "gallery_cache")
    assert len(caches) == 1 and (caches[0] / "index.pt").is_file()
    assert not list(folder.glob(".*"))  # nothing is written into the gallery

    again = _retrieve(run_dir, folder, *query)
    assert (again["gallery"]["embedded"], again["gallery"]["reused"]) == (0, total)
    assert model.images_encoded == total  # nothing was embedded again

    # Overwrite one red crop with a green one: exactly that file is embedded again,
    # and its new content is what the search sees.
    changed = paths[27][0]
    shutil.copyfile(folder / paths[10][1], folder / changed)
    stat = os.stat(folder / changed)
    os.utime(folder / changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    updated = _retrieve(run_dir, folder, "--query", caption_of(10), "--topk", "4")
    assert (updated["gallery"]["embedded"], updated["gallery"]["reused"]) == (1, total - 1)
    assert model.images_encoded == total + 1
    top = {os.path.relpath(p, folder) for p, _ in updated["queries"][0]["matches"]}
    assert top == set(paths[10]) | {changed}

    # A deleted file leaves the index, a new one is embedded, the rest is reused.
    (folder / paths[11][0]).unlink()
    shutil.copyfile(folder / paths[26][0], folder / "cam0" / "new_p026_9.jpg")
    changed_set = _retrieve(run_dir, folder, *query)["gallery"]
    assert (changed_set["embedded"], changed_set["removed"], changed_set["images"]) == (1, 1, total)
    assert len(list(caches[0].glob("emb-*.npy"))) == 1  # the superseded embedding file is gone


def test_another_precision_gets_its_own_cache(colour_run, gallery):
    """Embeddings computed under bf16 autocast are not those of fp32: never mixed up."""
    run_dir, model = colour_run
    folder, _ = gallery
    total = len(PIDS) * IMAGES_PER_ID
    _retrieve(run_dir, folder, "--query", caption_of(27))
    bf16 = _retrieve(run_dir, folder, "--query", caption_of(27), "solver.precision=bf16")
    assert (bf16["gallery"]["embedded"], bf16["gallery"]["reused"]) == (total, 0)
    assert len(cache_folders(run_dir / "gallery_cache")) == 2
    again = _retrieve(run_dir, folder, "--query", caption_of(27))["gallery"]
    assert (again["embedded"], again["reused"]) == (0, total)


def test_cache_can_live_elsewhere_and_a_damaged_cache_is_rebuilt(colour_run, gallery, tmp_path,
                                                                 caplog):
    run_dir, model = colour_run
    folder, _ = gallery
    total = len(PIDS) * IMAGES_PER_ID
    elsewhere = tmp_path / "cache"
    _retrieve(run_dir, folder, "--query", caption_of(0), "--cache_dir", str(elsewhere))
    assert not list(folder.glob(".*")) and not (run_dir / "gallery_cache").exists()
    (index_file,) = elsewhere.glob("*/*/index.pt")
    index_file.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        result = _retrieve(run_dir, folder, "--query", caption_of(0), "--cache_dir", str(elsewhere))
    assert result["gallery"]["embedded"] == total and model.images_encoded == 2 * total
    assert "cannot be used" in caplog.text
    assert _pids_of(result["queries"][0]["matches"])[:IMAGES_PER_ID] == [0] * IMAGES_PER_ID


def test_caches_of_current_checkpoints_are_kept_and_of_changed_ones_removed(colour_run, gallery,
                                                                           caplog):
    run_dir, _ = colour_run
    folder, _ = gallery
    last = run_dir / "last.pth"
    last.write_bytes(b"other weights")
    (folder / ".comoe_gallery_cache_0123456789abcdef").mkdir()  # where earlier versions cached
    query = ["--query", caption_of(27)]
    with caplog.at_level(logging.WARNING):
        _retrieve(run_dir, folder, *query)
    assert f"rm -r {folder}/.comoe_gallery_cache_*" in caplog.text
    _retrieve(run_dir, folder, *query, "--checkpoint", str(last))
    best_cache, last_cache = sorted(cache_folders(run_dir / "gallery_cache"),
                                    key=lambda p: json.loads((p / "source.json").read_text())[
                                        "checkpoint"])
    again = _retrieve(run_dir, folder, *query)  # both checkpoints unchanged: both caches stay
    assert again["gallery"]["embedded"] == 0
    assert cache_folders(run_dir / "gallery_cache") == sorted([best_cache, last_cache])
    last.write_bytes(b"retrained weights")
    _retrieve(run_dir, folder, *query)
    assert cache_folders(run_dir / "gallery_cache") == [best_cache]
    last.unlink()
    other = folder.parent / "other_crops"
    shutil.copytree(folder, other)
    _retrieve(run_dir, other, *query)  # another gallery: a folder of its own
    assert len(cache_folders(run_dir / "gallery_cache")) == 2


def _edit_index(cache, edit) -> None:
    index = torch.load(cache / "index.pt", weights_only=True)
    edit(index, cache)
    torch.save(index, cache / "index.pt")


def _rewrite_embeddings(transform):
    def edit(index, cache):
        path = cache / index["embeddings"]
        rows = transform(np.load(path).astype(np.float32))
        np.save(path, rows)
    return edit


def _outside_embeddings(index, cache):
    outside = cache.parent.parent.parent / "outside.npy"
    rows = np.zeros((index["count"], len(COLOUR_NAMES)), dtype=np.float16)
    rows[:, 0] = 1  # unit vectors, all "purple": they would rank every image alike
    np.save(outside, rows)
    index["embeddings"] = "../../../outside.npy"


def _poisoned_row(rows):
    rows[0] = 30.0  # finite, and first for every query
    return rows


TAMPERINGS = {
    "embeddings outside the cache": (_outside_embeddings, "is not a file name of this cache"),
    "wider embeddings": (_rewrite_embeddings(lambda r: np.pad(r, ((0, 0), (0, 1)))
                                             .astype(np.float16)),
                         f"{len(COLOUR_NAMES) + 1} wide, the model's are {len(COLOUR_NAMES)}"),
    "float32 embeddings": (_rewrite_embeddings(lambda r: r), "not float16"),
    "a NaN row": (_rewrite_embeddings(lambda r: np.where(np.arange(len(r))[:, None] == 2, np.nan, r)
                                      .astype(np.float16)), "non-finite"),
    "a poisoned row": (_rewrite_embeddings(lambda r: _poisoned_row(r).astype(np.float16)),
                       "not unit vectors"),
    "paths of the wrong type": (lambda index, cache: index.update(paths="cam0/a.jpg"),
                                "paths is a str, not a list"),
    "a path leaving the gallery": (lambda index, cache: index["paths"].__setitem__(0, "../x.jpg"),
                                   "'../x.jpg', which is not a path inside the gallery"),
    "mtimes as a list": (lambda index, cache: index.update(mtimes=index["mtimes"].tolist()),
                         "mtimes is not 18 integers"),
    "another checkpoint's key": (lambda index, cache: index.update(key="0" * 16),
                                 "made for key '0000000000000000'"),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_a_cache_is_validated_as_a_whole_and_rebuilt_on_any_mismatch(colour_run, gallery, caplog,
                                                                     tampering):
    run_dir, model = colour_run
    folder, _ = gallery
    total = len(PIDS) * IMAGES_PER_ID
    query = ["--query", caption_of(26), "--topk", str(IMAGES_PER_ID)]
    _retrieve(run_dir, folder, *query)
    (cache,) = cache_folders(run_dir / "gallery_cache")
    edit, reason = TAMPERINGS[tampering]
    _edit_index(cache, edit)
    with caplog.at_level(logging.WARNING):
        result = _retrieve(run_dir, folder, *query)
    assert f"gallery cache {cache} cannot be used" in caplog.text and reason in caplog.text
    assert result["gallery"]["embedded"] == total and model.images_encoded == 2 * total
    assert _pids_of(result["queries"][0]["matches"]) == [26] * IMAGES_PER_ID
    assert sorted(p.name for p in cache.glob("emb-*.npy")) == [
        torch.load(cache / "index.pt", weights_only=True)["embeddings"]]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _retrieve(run_dir, folder, *query)["gallery"]["embedded"] == 0  # valid again
    assert "cannot be used" not in caplog.text


def test_topk_beyond_one_row_draws_every_image_the_header_counts(colour_run, gallery, monkeypatch):
    run_dir, _ = colour_run
    folder, paths = gallery
    for k, rel in enumerate(p for rels in paths.values() for p in rels):
        shutil.copyfile(folder / rel, folder / f"copy{k}_{os.path.basename(rel)}")
    drawn = []
    thumbnail = vis._thumbnail
    monkeypatch.setattr(vis, "_thumbnail", lambda path: drawn.append(path) or thumbnail(path))
    result = _retrieve(run_dir, folder, "--query", caption_of(11), "--topk", "30")
    matches = result["queries"][0]["matches"]
    assert len(matches) == 30 and drawn == [path for path, _ in matches]
    with Image.open(result["queries"][0]["figure"]) as image:
        assert image.size == vis.ranking_figure_size(20, 2)


def test_empty_missing_and_unreadable_galleries_give_clear_messages(colour_run, gallery, tmp_path,
                                                                    caplog):
    run_dir, model = colour_run
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(empty))} holds no images"):
        _retrieve(run_dir, empty, "--query", "a man")
    with pytest.raises(DatasetError, match=r"missing does not exist"):
        _retrieve(run_dir, tmp_path / "missing", "--query", "a man")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"none of the 2 images under .*broken could be read"):
        _retrieve(run_dir, broken, "--query", "a man")

    # Unreadable files among readable ones are skipped with one warning naming them,
    # and are not retried until they change.
    folder, _ = gallery
    (folder / "cam1" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    total = len(PIDS) * IMAGES_PER_ID
    with caplog.at_level(logging.WARNING):
        result = _retrieve(run_dir, folder, "--query", caption_of(26))
    assert result["gallery"]["unreadable"] == ["cam1/corrupt.jpg"]
    assert result["gallery"]["embedded"] == total
    assert "1 unreadable image(s)" in caplog.text and "corrupt.jpg" in caplog.text
    assert all("corrupt" not in p for p, _ in result["queries"][0]["matches"])
    caplog.clear()
    encoded = model.images_encoded
    with caplog.at_level(logging.WARNING):
        again = _retrieve(run_dir, folder, "--query", caption_of(26))
    assert again["gallery"]["embedded"] == 0 and model.images_encoded == encoded
    assert "corrupt.jpg" in caplog.text


def test_streamed_search_equals_a_full_sort(tmp_path):
    generator = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(203, 16, generator=generator), dim=-1)
    embeddings = rows.numpy().astype(np.float16)
    index = GalleryIndex(tmp_path, tmp_path, [f"{i}.jpg" for i in range(203)], embeddings)
    queries = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=-1)
    full = queries @ torch.from_numpy(embeddings.astype(np.float32)).T  # 5, 203
    for chunk in (7, 64, 1000):
        scores, found = index.search(queries, k=9, chunk=chunk)
        assert found.shape == (5, 9)
        expected = full.sort(dim=1, descending=True).values[:, :9]
        torch.testing.assert_close(scores, expected)
        torch.testing.assert_close(full.gather(1, found), expected)
    scores, found = index.search(queries, k=500, chunk=50)  # k larger than the gallery
    assert found.shape == (5, 203) and sorted(found[0].tolist()) == list(range(203))


def test_real_checkpoint_end_to_end(gallery, tmp_path):
    """retrieve.main on a saved tiny model: figure, cache keyed by the checkpoint file."""
    from model import build_model
    from utils.checkpoint import atomic_save
    from utils.config import load_config, save_config, to_plain
    folder, _ = gallery
    cfg = load_config(CONFIG, TINY_MODEL + ["device=cpu", "dataset.num_workers=0",
                                            "eval.batch_size=8"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "configs.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    atomic_save({"model": model.state_dict(), "num_classes": None, "config": to_plain(cfg),
                 "epoch": 0}, run_dir / "last.pth")
    out = tmp_path / "figures"
    args = ["--query", "a woman in a red coat", "--topk", "12", "--out", str(out)]
    result = _retrieve(run_dir, folder, *args)  # falls back to last.pth
    matches = result["queries"][0]["matches"]
    assert len(matches) == 12 and all(-1.001 <= s <= 1.001 for _, s in matches)
    with Image.open(result["queries"][0]["figure"]) as image:
        assert image.size == vis.ranking_figure_size(12)
    assert os.path.dirname(result["queries"][0]["figure"]) == str(out)
    # The embeddings match a direct encoding (fp16 storage: ~1e-3).
    with torch.no_grad():
        from datasets.transforms import build_eval_transform, read_image
        from utils.tokenizer import tokenize
        image = build_eval_transform(tuple(cfg.input.size))(read_image(matches[0][0]))
        direct = torch.nn.functional.cosine_similarity(
            model.encode_image(image[None]),
            model.encode_text(tokenize(["a woman in a red coat"], cfg.dataset.text_length)))
    assert matches[0][1] == pytest.approx(float(direct), abs=5e-3)
    # A rewritten checkpoint file (another mtime) gets its own cache; the old one is removed.
    (first_cache,) = cache_folders(run_dir / "gallery_cache")
    stat = os.stat(run_dir / "last.pth")
    os.utime(run_dir / "last.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    again = _retrieve(run_dir, folder, *args)
    assert again["gallery"]["embedded"] == len(PIDS) * IMAGES_PER_ID
    (second_cache,) = cache_folders(run_dir / "gallery_cache")
    assert second_cache.name != first_cache.name


def test_queries_without_words_are_refused_and_long_ones_warned(colour_run, gallery, caplog):
    run_dir, model = colour_run
    folder, _ = gallery
    for blank in ("", "  "):
        with pytest.raises(ConfigError, match="has no words to rank images by"):
            _retrieve(run_dir, folder, "--query", "a man in red", "--query", blank)
    assert model.images_encoded == 0  # refused before the gallery is embedded
    with caplog.at_level(logging.WARNING):
        result = _retrieve(run_dir, folder, "--query", "a person in red " * 20)
    assert len(result["queries"][0]["matches"]) == 10
    assert "--query has 82 tokens but the model reads 40" in caplog.text
