"""train.py and test.py through their main(argv) on generated data."""
from __future__ import annotations

import json
import re

import pytest
import torch

import test as test_script
import train as train_script
from conftest import ROOT, tiny_overrides
from processor.runner import RunFolderError
from utils.config import ConfigError
from utils.checkpoint import CheckpointError, load_checkpoint

CONFIG = str(ROOT / "configs" / "demo.yaml")


def _check_metrics(metrics: dict) -> None:
    for key in ("R1", "R5", "R10", "mAP", "mINP"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["R1"] <= metrics["R5"] <= metrics["R10"]


def test_train_then_test_writes_outputs_and_sane_metrics(synth_root, tmp_path):
    overrides = tiny_overrides(synth_root, tmp_path) + ["eval.i2t=true"]
    result = train_script.main(["--config_file", CONFIG, *overrides])
    run = tmp_path / "CUHK-PEDES" / "tiny"
    for name in ("configs.yaml", "train.log", "best.pth", "last.pth", "test_metrics.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "test_metrics.json").read_text())
    assert saved["split"] == "test" and saved["checkpoint"].endswith("best.pth")
    _check_metrics(saved["t2i"])
    _check_metrics(saved["i2t"])
    assert saved["num_queries"] == 2 * saved["num_gallery"]  # two captions per image
    experts = saved["experts"]
    assert set(experts) == {"image", "text"}
    assert len(experts["image"]["usage"]) == 1 and len(experts["image"]["usage"][0]) == 4
    assert sum(experts["text"]["usage"][0]) == pytest.approx(1.0, abs=1e-4)
    assert result["t2i"] == saved["t2i"]
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())
    # Every log line and epoch summary reports the throughput (no GPU memory on the CPU);
    # log lines end with the run's ETA.
    log = (run / "train.log").read_text()
    steps = re.findall(r" step \d+ lr \S+ .*loss=[0-9.]+ \| ([0-9.]+) samples/s, data wait \d+%, "
                       r"eta \d+:\d\d:\d\d$", log, re.M)
    epochs = re.findall(r"done in [0-9.]+s \(([0-9.]+) samples/s\)", log)
    assert len(steps) >= 4 and len(epochs) == 2, log
    assert all(float(rate) > 0 for rate in steps + epochs)
    assert "GiB peak" not in log

    # test.py rebuilds everything from the saved config alone and agrees.
    again = test_script.main(["--config_file", str(run / "configs.yaml"), "eval.i2t=true"])
    assert again["t2i"] == pytest.approx(saved["t2i"], abs=1e-6)

    # Checkpoints carry plain data only and the config they were made with.
    ckpt = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert ckpt["config"]["name"] == "tiny" and ckpt["num_classes"] > 0
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_refuses_to_overwrite_run_folder(synth_root, tmp_path):
    run = tmp_path / "CUHK-PEDES" / "taken"
    run.mkdir(parents=True)
    (run / "train.log").write_text("an earlier run\n")
    with pytest.raises(RunFolderError, match="resume=true"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "taken")])
    assert (run / "train.log").read_text() == "an earlier run\n"


def test_test_py_without_best_checkpoint_says_what_is_there(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"")
    from utils.config import load_config, save_config
    save_config(load_config(CONFIG), run / "configs.yaml")
    with pytest.raises(CheckpointError, match=r"best\.pth not found.*last\.pth"):
        test_script.main(["--config_file", str(run / "configs.yaml")])


def test_checkpoint_from_another_config_is_reported(synth_root, tmp_path):
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "a"),
                       "solver.num_epoch=1"])
    run = tmp_path / "CUHK-PEDES" / "a"
    with pytest.raises(CheckpointError, match=r"moe\.num_experts: 4 != 2"):
        test_script.main(["--config_file", str(run / "configs.yaml"), "moe.num_experts=2"])


def test_image_cache_path_trains_and_evaluates(synth_root, tmp_path):
    cache = tmp_path / "cache"
    result = train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                                "solver.num_epoch=1", "dataset.image_cache=true",
                                f"dataset.cache_dir={cache}", "solver.accumulation_steps=2"])
    _check_metrics(result["t2i"])
    assert any(p.suffix == ".npy" for p in cache.rglob("*")), "no cache file was written"


def test_solver_compile_compiles_the_training_model_in_place(synth_root, tmp_path, monkeypatch):
    """solver.compile=true calls nn.Module.compile on the training model (in place, so the
    checkpoint keys are unchanged). Compiling itself is left out here: it takes minutes on
    a CPU; benchmarks/bench_train_step.py --compile on runs it."""
    from model.build import RetrievalModel
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled.append((type(self), k.get("mode"))))
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.num_epoch=1", "solver.compile=true"])
    assert compiled == [(RetrievalModel, None)]
    compiled.clear()
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "graphs"),
                       "solver.num_epoch=1", "solver.compile=true",
                       "solver.compile_mode=reduce-overhead"])
    assert compiled == [(RetrievalModel, "reduce-overhead")]
    ckpt = load_checkpoint(tmp_path / "CUHK-PEDES" / "tiny" / "last.pth")
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])

    # CUDA graphs lose accumulated gradients (pytorch#169545): refused before any work.
    with pytest.raises(ConfigError, match="solver.accumulation_steps=2"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "acc"),
                           "solver.compile=true", "solver.compile_mode=reduce-overhead",
                           "solver.accumulation_steps=2"])
    assert not (tmp_path / "CUHK-PEDES" / "acc").exists()


@pytest.mark.parametrize("slow", ["data", "step"])
def test_log_lines_tell_a_slow_loader_from_a_slow_step(synth_root, tmp_path, monkeypatch, slow):
    """The "data wait" of a log line is the share of time spent waiting for the loader:
    high when the loader is the bottleneck, low when the step is."""
    import time

    from datasets.bases import ImageTextDataset
    from processor.trainer import Trainer
    target, name = (ImageTextDataset, "__getitem__") if slow == "data" else (Trainer, "_step")
    original = getattr(target, name)

    def slowed(*args, **kwargs):
        time.sleep(0.05 if slow == "data" else 0.3)  # 8 items or 1 step: 0.4 s vs 0.3 s
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, slowed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steady step times on a busy machine
    try:
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                           "solver.num_epoch=1", "solver.log_period=1", "eval.period=5"])
    finally:
        torch.set_num_threads(threads)
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    waits = sorted(int(w) for w in re.findall(r"data wait (\d+)%", log))
    assert len(waits) >= 4, log
    median = waits[len(waits) // 2]  # robust to a busy machine's outliers
    if slow == "data":
        assert median >= 50, waits
    else:
        assert median <= 30, waits
