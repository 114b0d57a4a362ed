"""visualize.py: ranking figures of test queries, routing and comparison figures."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image, ImageColor

import train as train_script
import visualize
from conftest import ROOT, tiny_overrides
from processor.runner import RunFolderError
from utils import visualization as vis
from utils.arguments import split_overrides
from utils.config import ConfigError

CONFIG = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    """A one-epoch tiny run: configs.yaml, best.pth and test_metrics.json."""
    out = tmp_path_factory.mktemp("runs")
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, out, "vis"),
                       "solver.num_epoch=1"])
    return out / "CUHK-PEDES" / "vis"


def _pixels_of(path, colour: str) -> int:
    """How many pixels of the PNG have exactly `colour` (a border colour)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    return int((pixels == np.array(ImageColor.getrgb(colour))).all(axis=1).sum())


def test_query_figures_have_fixed_size_borders_and_first_correct_rank(tiny_run, capsys):
    config = str(tiny_run / "configs.yaml")
    result = visualize.main(["--config_file", config, "--indices", "0", "5",
                             "--query", "a woman in a red dress", "--topk", "10"])
    dataset_queries, free = result["queries"][:2], result["queries"][2]
    assert [q.index for q in dataset_queries] == [0, 5] and free.index is None
    assert [p.name for p in result["figures"]] == [
        "query_0.png", "query_5.png", f"text_{vis.slugify('a woman in a red dress')}.png"]
    printed = capsys.readouterr().out.split()
    for path in result["figures"]:
        assert path.parent == tiny_run / "vis" and str(path) in printed
        with Image.open(path) as image:
            assert image.size == vis.ranking_figure_size(10) == (1550, 500)
    for query, path in zip(dataset_queries, result["figures"]):
        # The tiny test split has fewer than 10 images: every one is shown,
        # so the first match in the figure is the first match overall.
        matches = query.matches
        assert 0 < len(matches) <= 10 and any(matches)
        assert query.first_correct == matches.index(True) + 1
        assert query.scores == sorted(query.scores, reverse=True)
        assert (_pixels_of(path, vis.MATCH_COLOUR) > 500) == any(matches)
        assert (_pixels_of(path, vis.MISMATCH_COLOUR) > 500) == (not all(matches))
        assert _pixels_of(path, vis.NEUTRAL_COLOUR) < 50
    assert free.first_correct is None and free.matches is None
    free_path = result["figures"][2]
    assert _pixels_of(free_path, vis.MATCH_COLOUR) == 0
    assert _pixels_of(free_path, vis.MISMATCH_COLOUR) == 0
    assert _pixels_of(free_path, vis.NEUTRAL_COLOUR) > 500


def test_random_queries_follow_the_seed_and_overrides_go_anywhere(tiny_run, tmp_path):
    config = str(tiny_run / "configs.yaml")
    first = visualize.main(["--config_file", config, "--num_queries", "3", "--seed", "7",
                            "device=cpu", "--out", str(tmp_path / "a")])
    again = visualize.main(["--config_file", config, "--seed", "7", "--num_queries", "3",
                            "--out", str(tmp_path / "b"), "eval.batch_size=4"])
    other = visualize.main(["--config_file", config, "--seed", "8", "--out", str(tmp_path / "c")])
    indices = [q.index for q in first["queries"]]
    assert len(set(indices)) == 3 and indices == [q.index for q in again["queries"]]
    assert len(other["queries"]) == visualize.DEFAULT_NUM_QUERIES
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        f"query_{i}.png" for i in indices)
    with pytest.raises(ConfigError, match=r"--indices 999: the test split .* captions 0\.\.11"):
        visualize.main(["--config_file", config, "--indices", "1", "999", "device=cpu"])


def test_routing_figure_and_its_errors(tiny_run, tmp_path):
    result = visualize.main(["--config_file", str(tiny_run / "configs.yaml"), "--routing"])
    assert result["queries"] == [] and result["routing"] == tiny_run / "vis" / "routing.png"
    with Image.open(result["routing"]) as image:
        assert image.size == (640, 360)  # one CoMoE layer: usage panel + entropy panel

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "configs.yaml", bare / "configs.yaml")
    with pytest.raises(RunFolderError, match=r"bare/test_metrics\.json not found"):
        visualize.main(["--config_file", str(bare / "configs.yaml"), "--routing"])
    (bare / "test_metrics.json").write_text(json.dumps({"t2i": {"R1": 1.0}}))
    with pytest.raises(RunFolderError, match=r"test_metrics\.json has no 'experts' entry"):
        visualize.main(["--config_file", str(bare / "configs.yaml"), "--routing"])


def test_comparison_figure_across_runs(tiny_run, tmp_path):
    metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    other = tmp_path / "no_coar"
    other.mkdir()
    metrics["experts"] = {m: {"usage": [[0.25] * 4, [0.7, 0.1, 0.1, 0.1]],
                              "entropy": [1.0, 0.68]} for m in ("image", "text")}
    (other / "test_metrics.json").write_text(json.dumps(metrics))
    result = visualize.main(["--config_file", str(tiny_run / "configs.yaml"),
                             "--compare", str(other)])
    assert result["compare"] == tiny_run / "vis" / "routing_compare.png"
    with Image.open(result["compare"]) as image:
        assert image.size == (960, 640)  # up to 2 layers + entropy; image and text rows
    out = tmp_path / "figs"
    alone = visualize.main(["--compare", str(tiny_run), str(other / "test_metrics.json"),
                            "--out", str(out)])
    assert alone["compare"] == out / "routing_compare.png" and alone["compare"].is_file()
    with pytest.raises(SystemExit):
        visualize.main(["--compare", str(other)])  # nothing to compare with


def test_plots_accept_any_number_of_layers_and_experts(tmp_path):
    experts = {"image": {"usage": [[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]], "entropy": [1, 0.47, 0]},
               "text": {"usage": [[0.2, 0.8], [0.5, 0.5], [0.5, 0.5]], "entropy": [0.72, 1, 1]}}
    path = vis.plot_routing(experts, tmp_path / "r.png", title="three layers")
    with Image.open(path) as image:
        assert image.size == (1280, 360)
    runs = [("a", experts), ("b", {"image": {"usage": [[0.1, 0.2, 0.3, 0.4]], "entropy": [0.9]}})]
    with Image.open(vis.plot_routing_comparison(runs, tmp_path / "c.png")) as image:
        assert image.size == (1280, 640)


def test_split_overrides_keeps_query_text_with_equals_signs():
    own, overrides = split_overrides(
        ["--indices", "1", "2", "device=cpu", "--query", "size=large coat", "eval.batch_size=8"],
        ("--query",))
    assert own == ["--indices", "1", "2", "--query", "size=large coat"]
    assert overrides == ["device=cpu", "eval.batch_size=8"]


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_query_without_words_is_refused(tiny_run, query):
    with pytest.raises(ConfigError, match="has no words to rank images by"):
        visualize.main(["--config_file", str(tiny_run / "configs.yaml"), "--query", query])


def test_query_longer_than_the_context_is_used_with_a_warning(tiny_run, tmp_path, caplog):
    query = "a man in a red coat with a black backpack " * 6  # 60 tokens; the model reads 24
    with caplog.at_level("WARNING"):
        result = visualize.main(["--config_file", str(tiny_run / "configs.yaml"), "--query",
                                 query, "--out", str(tmp_path)])
    assert len(result["queries"]) == 1
    assert re.search(r"--query has 62 tokens but the model reads 24 \(dataset\.text_length\): "
                     r"only \"a man in a red coat with a black backpack a man in a red coat "
                     r"with a black backpack a man\" is used", caplog.text), caplog.text
