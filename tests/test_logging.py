"""What a run tells its user: one logging set-up for every module, progress bars that
never swallow a log line, and a train.log that holds the config, the data, every
validation, the checkpoints and the ETA."""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

import test as test_script
import train as train_script
from conftest import ROOT, tiny_overrides
from utils.logger import setup_logger

CONFIG = str(ROOT / "configs" / "demo.yaml")
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def reset_logging():
    yield
    setup_logger(None)


def test_every_module_logger_and_python_warnings_reach_console_and_file(tmp_path, capsys):
    modules = [f"{package}.{path.stem}" for package in PACKAGES
               for path in sorted((ROOT / package).glob("*.py")) if path.stem != "__init__"]
    assert len(modules) > 20
    setup_logger(tmp_path)
    for module in modules:
        logging.getLogger(module).info("hello from %s", module)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a python warning")
    logging.getLogger("some.library").info("library chatter")  # other libraries: WARNING+
    log = (tmp_path / "train.log").read_text()
    console = capsys.readouterr().out
    for text in (log, console):
        for module in modules:
            assert re.search(rf"^{TIMESTAMP} INFO: hello from {re.escape(module)}$", text, re.M), module
        assert re.search(rf"^{TIMESTAMP} WARNING: .*UserWarning: a python warning", text, re.M)
        assert "library chatter" not in text
        assert text.count("hello from utils.config") == 1  # once, not once per handler


def test_other_ranks_write_nothing(tmp_path):
    # A fresh interpreter: under pytest, its own handlers and warning recorder would
    # swallow what an unconfigured rank prints.
    code = ("import logging, warnings\n"
            "from utils.logger import setup_logger\n"
            f"setup_logger({str(tmp_path)!r}, rank=1)\n"
            "logging.getLogger('datasets.pedes').warning('a warning of rank 1')\n"
            "logging.getLogger('comoe').info('a line of rank 1')\n"
            "warnings.warn('a python warning of rank 1')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    assert not (tmp_path / "train.log").exists()


def _train_one_epoch(synth_root, tmp_path, *extra):
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.num_epoch=1", "solver.log_period=1", *extra])


def test_log_lines_do_not_glue_to_a_live_progress_bar(synth_root, tmp_path, monkeypatch):
    terminal = FakeTerminal()  # stdout and stderr are one terminal, as in a shell
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    _train_one_epoch(synth_root, tmp_path)
    text = terminal.getvalue()
    assert "\r" in text and "epoch 1/1:" in text  # a bar was drawn
    assert len(re.findall(rf"{TIMESTAMP} INFO: epoch 1 \[", text)) >= 4
    glued = re.findall(rf".{{0,30}}[^\r\n]{TIMESTAMP} ", text)
    assert not glued, glued


def test_no_bar_frames_when_stderr_is_not_a_terminal(synth_root, tmp_path, capfd):
    _train_one_epoch(synth_root, tmp_path)
    captured = capfd.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert re.search(rf"^{TIMESTAMP} INFO: epoch 1 \[9/9\] step 9 ", captured.out, re.M)


def test_train_log_holds_config_data_validations_checkpoints_accuracies_and_eta(synth_root,
                                                                               tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "loss.names=sdm+itc+coar+id+mlm", "model.cmt_depth=1", "eval.period=1"])
    run = tmp_path / "CUHK-PEDES" / "tiny"
    log = (run / "train.log").read_text()
    assert (run / "configs.yaml").read_text().rstrip() in log  # the resolved config
    assert log.count("| split | ids | images | captions |") == 1  # the dataset table
    assert log.count("run folder:") == 1
    # Every validation: a progress line and a table; the test split likewise.
    assert len(re.findall(r"epoch \d validation: encoding \d+ images and \d+ captions", log)) == 2
    assert len(re.findall(r"epoch \d validation \(.*\):\n\+-+.*\n\| task .*\n\+.*\n\| t2i ", log)) == 2
    assert re.search(r"test: encoding \d+ images and \d+ captions", log)
    # last.pth at each epoch end, before and after its validation.
    assert log.count("/last.pth at step ") == 4 and "/best.pth at step " in log
    # Step lines: loss terms | accuracies | speed and ETA; the loss sums the terms only.
    steps = re.findall(r" step \d+ lr \S+ (.*) \| (.*) \| .* eta \d+:\d\d:\d\d$", log, re.M)
    assert len(steps) >= 4
    for losses, accuracies in steps:
        terms = dict(part.split("=") for part in losses.split())
        total = float(terms.pop("loss"))
        assert set(terms) == {"sdm", "itc", "coar", "id", "mlm"}
        assert total == pytest.approx(sum(float(v) for v in terms.values()), abs=1e-3)
        values = dict(part.split("=") for part in accuracies.split())
        assert set(values) == {"img_acc", "txt_acc", "mlm_acc"}
        assert all(0 <= float(v) <= 1 for v in values.values())
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/img_acc", "train/txt_acc", "train/mlm_acc", "train/loss", "val/R1",
            "test/R1", "test/mAP", "test/mINP"} <= tags
    # Layers numbered from 1, as in the figures.
    assert "val/experts/image_entropy_layer1" in tags
    assert not any("layer0" in tag for tag in tags)


def test_test_py_never_generates_data_and_runs_from_another_folder(tmp_path, monkeypatch):
    from datasets import DatasetError
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    overrides = tiny_overrides(tmp_path, tmp_path / "runs") + [
        "dataset.root_dir=gen", "dataset.generate=true", "dataset.generate_num_ids=12",
        "solver.num_epoch=1"]
    result = train_script.main(["--config_file", CONFIG, *overrides])
    config = tmp_path / "runs" / "CUHK-PEDES" / "tiny" / "configs.yaml"
    monkeypatch.chdir(tmp_path / "b")  # the saved paths are absolute
    assert test_script.main(["--config_file", str(config)])["t2i"] == \
        pytest.approx(result["t2i"], abs=1e-6)
    shutil.rmtree(tmp_path / "a" / "gen")
    with pytest.raises(DatasetError, match=r"Evaluation and resumed training never generate data"
                                           r".*python -m datasets\.synth .*--num_ids 12 --seed 1"):
        test_script.main(["--config_file", str(config)])
    assert not (tmp_path / "a" / "gen").exists() and not (tmp_path / "b" / "gen").exists()


def test_start_up_records_reach_train_log(tmp_path, capsys):
    """What happens before the run folder exists (config warnings, data generation,
    CLIP loading) is kept and written to train.log once it does."""
    import torch
    from model.clip_model import build_clip
    from conftest import TINY_MODEL
    clip = tmp_path / "clip.pt"
    torch.save(build_clip("none", image_size=(32, 16), stride=16, embed_dim=32, patch_size=16,
                          vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
                          text_layers=1, text_heads=2, context_length=24).state_dict(), clip)
    overrides = tiny_overrides(tmp_path / "data", tmp_path) + [
        "dataset.generate=true", "dataset.generate_num_ids=12", "solver.num_epoch=1",
        f"model.pretrain={clip}", "moe.num_experts=2"]
    assert "model.pretrain=none" in TINY_MODEL
    train_script.main(["--config_file", CONFIG, *overrides])
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert re.search(rf"^{TIMESTAMP} WARNING: ConfigWarning: moe\.topk = moe\.num_experts = 2",
                     log, re.M), log[:2000]
    assert "cli.py" not in log and "config.py" not in log
    assert re.search(rf"^{TIMESTAMP} INFO: generating a synthetic CUHK-PEDES dataset", log, re.M)
    assert re.search(rf"^{TIMESTAMP} INFO: Loaded CLIP weights from {re.escape(str(clip))}", log,
                     re.M)
    assert log.index("ConfigWarning") < log.index("run folder:") < log.index("generating")
    assert log.count("ConfigWarning") == 1 and log.count("run folder:") == 1
    assert "ConfigWarning" in capsys.readouterr().out  # the console has them as they happen



def test_step_lines_show_the_lr_the_step_used(synth_root, tmp_path):
    """With 9 steps of warm-up from 0.1 x 1e-3, step k (1-based) uses lr 1e-3 x (0.1 + 0.1 (k-1))."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _train_one_epoch(synth_root, tmp_path, "solver.warmup_epochs=1")
    run = tmp_path / "CUHK-PEDES" / "tiny"
    lines = re.findall(r" step (\d+) lr (\S+) ", (run / "train.log").read_text())
    assert len(lines) == 9
    for step, lr in lines:
        assert float(lr) == pytest.approx(1e-3 * (0.1 + 0.1 * (int(step) - 1)), rel=1e-2), step
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/lr")][0] == pytest.approx(1e-4)
