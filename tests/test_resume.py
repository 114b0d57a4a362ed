"""Nothing lost: a killed run resumes to the same weights and metrics; bad input stops cleanly."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train as train_script
from conftest import ROOT, tiny_overrides
from datasets import BadImageError
from processor.trainer import NonFiniteLossError
from utils.checkpoint import load_checkpoint

CONFIG = str(ROOT / "configs" / "demo.yaml")
# Dropout on, MLM masking on: every random stream the trainer uses is exercised.
RESUME_OVERRIDES = ["solver.num_epoch=3", "checkpoint.every_n_steps=2", "eval.period=1",
                    "moe.expert_dropout=0.2", "loss.names=sdm+itc+coar+mlm+id",
                    "model.cmt_depth=1", "input.text_aug=true"]


def _command(synth_root: Path, out: Path, name: str) -> list[str]:
    return [sys.executable, "train.py", "--config_file", CONFIG,
            *tiny_overrides(synth_root, out, name), *RESUME_OVERRIDES]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _interrupt_after_mid_epoch_checkpoint(cmd: list[str], last: Path, sig: int):
    """Start a run and send `sig` right after its first mid-epoch checkpoint appears."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


def _weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def uninterrupted(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = _run(_command(synth_root, out, "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    return out / "CUHK-PEDES" / "run"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_resume_after_interrupt_is_bit_identical(synth_root, tmp_path, uninterrupted, sig):
    run = tmp_path / "CUHK-PEDES" / "run"
    code, output = _interrupt_after_mid_epoch_checkpoint(_command(synth_root, tmp_path, "run"),
                                                         run / "last.pth", sig)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, output
    else:
        assert code == 128 + signal.SIGTERM, output  # a scheduler sees an interrupted run
        assert "resume=true" in output  # the message says how to resume
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["global_step"] < 27, "the run finished before it could be interrupted"
    assert not (run / "test_metrics.json").exists()

    resumed = _run([sys.executable, "train.py", "--config_file", str(run / "configs.yaml"),
                    "resume=true"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for name in ("last.pth", "best.pth"):
        expected, actual = _weights(uninterrupted / name), _weights(run / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key} differs"
    expected = json.loads((uninterrupted / "test_metrics.json").read_text())
    actual = json.loads((run / "test_metrics.json").read_text())
    assert actual["t2i"] == expected["t2i"]
    full, again = load_checkpoint(uninterrupted / "last.pth"), load_checkpoint(run / "last.pth")
    assert (again["best_metric"], again["best_epoch"]) == (full["best_metric"], full["best_epoch"])


def test_resume_without_last_checkpoint_is_refused(synth_root, tmp_path):
    from processor.runner import RunFolderError
    with pytest.raises(RunFolderError, match="nothing to resume"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                           "resume=true"])


def _corrupt_one_training_image(root: Path) -> Path:
    entries = json.loads((root / "CUHK-PEDES" / "reid_raw.json").read_text())
    path = root / "CUHK-PEDES" / "imgs" / next(e for e in entries
                                               if e["split"] == "train")["file_path"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # a truncated file
    return path


@pytest.fixture
def damaged_root(tmp_path):
    from datasets.synth import generate
    root = tmp_path / "data"
    generate(str(root), "cuhk", num_ids=16, seed=0)
    return root, _corrupt_one_training_image(root)


def test_unreadable_image_stops_with_its_path_and_a_checkpoint(damaged_root, tmp_path):
    root, bad = damaged_root
    with pytest.raises(BadImageError) as err:
        train_script.main(["--config_file", CONFIG, *tiny_overrides(root, tmp_path)])
    assert str(bad) in str(err.value) and "resume=true" in str(err.value)
    assert (tmp_path / "CUHK-PEDES" / "tiny" / "last.pth").is_file()


def test_unreadable_image_is_skipped_and_counted_when_allowed(damaged_root, tmp_path):
    root, bad = damaged_root
    result = train_script.main(["--config_file", CONFIG, *tiny_overrides(root, tmp_path),
                                "dataset.skip_bad_images=true", "solver.num_epoch=1"])
    assert 0 <= result["t2i"]["R1"] <= 100
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert "unreadable training images were skipped" in log


def _nan_after(model_cls, calls: int):
    original = model_cls.forward
    counter = {"n": 0}

    def forward(self, batch, **kwargs):
        counter["n"] += 1
        out = original(self, batch, **kwargs)
        losses = out[0] if isinstance(out, tuple) else out
        if counter["n"] >= calls:
            losses["sdm"] = losses["sdm"] * float("nan")
        return out
    return forward


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_non_finite_loss_stops_with_step_terms_and_last_good_state(synth_root, tmp_path,
                                                                     monkeypatch, kernel):
    """foreach checks each step on the host; fused skips on the device and reports at the
    next log point (log_period=2 here), so its checkpoint is from a later step."""
    from model.build import RetrievalModel
    monkeypatch.setattr(RetrievalModel, "forward", _nan_after(RetrievalModel, 3))
    with pytest.raises(NonFiniteLossError, match=r"step 2: sdm=nan, itc="):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                           f"solver.optimizer_kernel={kernel}", "solver.log_period=2"])
    ckpt = load_checkpoint(tmp_path / "CUHK-PEDES" / "tiny" / "last.pth")
    assert ckpt["global_step"] == (2 if kernel == "foreach" else 4)
    assert ckpt["nonfinite_steps"] == (1 if kernel == "foreach" else 2)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _spoil_forward(monkeypatch, spoil) -> list:
    """Wrap the training forward: `spoil(model, losses, call)` may change the losses of
    call 1, 2, ...; returns the list of a weight as each call saw it."""
    from model.build import RetrievalModel
    original = RetrievalModel.forward
    params_seen = []

    def forward(self, batch, **kwargs):
        params_seen.append(self.backbone.visual.proj.detach().clone())
        out = original(self, batch, **kwargs)
        spoil(self, out[0] if isinstance(out, tuple) else out, len(params_seen))
        return out
    monkeypatch.setattr(RetrievalModel, "forward", forward)
    return params_seen


@pytest.mark.parametrize("kernel,precision", [("foreach", "fp32"), ("fused", "fp32"),
                                              ("fused", "fp16")])
def test_non_finite_steps_are_skipped_up_to_the_limit(synth_root, tmp_path, monkeypatch, kernel,
                                                      precision):
    """Steps 2 and 4 have an infinite loss: both are skipped (no update, counted), the run
    finishes, and the logged averages leave them out. (fp16: the grad scaler skips them.)"""
    def spoil(model, losses, call):
        if call in (2, 4):
            losses["itc"] = losses["itc"] * float("inf")
    params_seen = _spoil_forward(monkeypatch, spoil)
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.max_nonfinite_steps=2", "solver.num_epoch=1",
                       f"solver.optimizer_kernel={kernel}", "solver.log_period=3",
                       f"solver.precision={precision}"])
    ckpt = load_checkpoint(tmp_path / "CUHK-PEDES" / "tiny" / "last.pth")
    assert ckpt["nonfinite_steps"] == 2
    assert ckpt["global_step"] == 9  # every batch counts, skipped ones included
    # Forward i sees the weights after step i-1: steps 2 and 4 made no update.
    assert torch.equal(params_seen[1], params_seen[2]) and torch.equal(params_seen[3], params_seen[4])
    assert not torch.equal(params_seen[4], params_seen[-1])  # the others did update
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert "skipped (2 of 2 allowed)" in log
    averages = re.search(r"epoch 1/1 done in [0-9.]+s \([0-9.]+ samples/s\): (.*)", log).group(1)
    assert re.fullmatch(r"(\w+=[0-9.]+ ?)+", averages), averages  # no nan or inf


@pytest.mark.parametrize("kernel,clip", [("foreach", 0.0), ("fused", 0.0), ("foreach", 1.0),
                                         ("fused", 1.0)])
def test_finite_loss_with_non_finite_gradient_is_skipped(synth_root, tmp_path, monkeypatch,
                                                         kernel, clip):
    """A loss that is finite but whose gradient is not (an overflow in backward) must not
    reach the weights: the step is skipped and counted like a non-finite loss, with or
    without gradient clipping, on the host and on the device path."""
    def spoil(model, losses, call):
        if call == 2:  # sqrt at 0: value 0, gradient inf
            total = model.backbone.visual.proj.sum()
            losses["itc"] = losses["itc"] + torch.sqrt(total - total.detach())
    params_seen = _spoil_forward(monkeypatch, spoil)
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.max_nonfinite_steps=1", "solver.num_epoch=1",
                       f"solver.optimizer_kernel={kernel}", f"solver.grad_clip={clip}",
                       "solver.log_period=3"])
    ckpt = load_checkpoint(tmp_path / "CUHK-PEDES" / "tiny" / "last.pth")
    assert ckpt["nonfinite_steps"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert torch.equal(params_seen[1], params_seen[2])  # step 2 made no update
    assert not torch.equal(params_seen[2], params_seen[-1])  # the others did
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert "non-finite loss or gradient at step 1 (" in log and "skipped (1 of 1 allowed)" in log


def test_gradient_accumulation_matches_the_full_batch_for_per_sample_losses(synth_root, tmp_path):
    """With a per-sample loss (ID), 2 micro-batches of 4 make the same update as one batch of 8.

    (atol 1e-4: attention key biases have an exactly zero true gradient, so Adam turns
    float rounding noise in them into steps of up to ~1e-5.)
    """
    common = ["model.head=none", "model.embed=global", "loss.names=id", "solver.num_epoch=1",
              "input.flip=false", "input.padding=0", "input.erasing=0", "eval.period=5"]
    runs = {}
    for steps in (1, 2):
        name = f"acc{steps}"
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, name),
                           *common, f"solver.accumulation_steps={steps}"])
        runs[steps] = load_checkpoint(tmp_path / "CUHK-PEDES" / name / "last.pth")
    assert runs[1]["global_step"] == runs[2]["global_step"] > 0
    for key, value in runs[1]["model"].items():
        torch.testing.assert_close(runs[2]["model"][key], value, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{key}: {m}")


def test_accumulation_over_the_last_partial_batch_matches_the_full_batch(synth_root, tmp_path):
    """dataset.drop_last=false: 76 samples give 9 batches of 8 and one of 4, which 8
    micro-batches split into 4 of one sample; each counts by its size, so the step is
    still the whole batch's (a per-sample loss, ID)."""
    common = ["model.head=none", "model.embed=global", "loss.names=id", "solver.num_epoch=1",
              "input.flip=false", "input.padding=0", "input.erasing=0", "eval.period=5",
              "dataset.drop_last=false"]
    runs = {}
    for steps in (1, 8):
        name = f"acc{steps}"
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, name),
                           *common, f"solver.accumulation_steps={steps}"])
        runs[steps] = load_checkpoint(tmp_path / "CUHK-PEDES" / name / "last.pth")
    assert runs[1]["global_step"] == runs[8]["global_step"] == 10
    for key, value in runs[1]["model"].items():
        torch.testing.assert_close(runs[8]["model"][key], value, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{key}: {m}")


def test_drop_last_false_is_refused_with_the_identity_sampler():
    from utils.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"dataset\.drop_last=false .* identity sampler has none"):
        load_config(CONFIG, ["dataset.drop_last=false", "dataset.sampler=identity"])
    load_config(CONFIG, ["dataset.drop_last=false"])


def test_accumulation_must_divide_the_batch(synth_root, tmp_path):
    from utils.config import ConfigError
    with pytest.raises(ConfigError, match="accumulation_steps=3"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                           "solver.accumulation_steps=3"])


def test_truncated_jpeg_is_reported_with_its_path(tmp_path):
    from PIL import Image

    from datasets import read_image
    path = tmp_path / "crop.jpg"
    Image.new("RGB", (64, 160), (200, 30, 30)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="crop.jpg"):
        read_image(str(path))


def test_empty_and_overlong_captions_train(tmp_path, caplog):
    """An empty caption is warned about and trains as SOT+EOT; a caption longer than
    the context is truncated with end-of-text kept last."""
    from datasets.synth import generate
    from utils.tokenizer import EOT_TOKEN_ID, tokenize
    root = tmp_path / "data"
    generate(str(root), "cuhk", num_ids=16, seed=0)
    annotation = root / "CUHK-PEDES" / "reid_raw.json"
    entries = json.loads(annotation.read_text())
    train = [e for e in entries if e["split"] == "train"]
    train[0]["captions"][0] = ""
    train[1]["captions"][0] = "a man in a red coat " * 40
    annotation.write_text(json.dumps(entries))
    ids = tokenize(train[1]["captions"][0], context_length=24)
    assert ids[0, -1] == EOT_TOKEN_ID
    with caplog.at_level("WARNING"):
        result = train_script.main(["--config_file", CONFIG, *tiny_overrides(root, tmp_path),
                                    "solver.num_epoch=1"])
    assert "empty caption" in caplog.text
    assert 0 <= result["t2i"]["R1"] <= 100


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fused_step_reads_nothing_back_from_the_device(synth_root, tmp_path, monkeypatch,
                                                       precision):
    """With a fused optimizer a training step never asks for a tensor's value on the host
    (an .item(), bool() or .tolist() would wait for a GPU). C++-side syncs are checked by
    the CUDA tests (tests/test_cuda.py)."""
    from processor.trainer import Trainer
    reads, active = [], [False]
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        def wrapper(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            if active[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    original_step = Trainer._step

    def watched(self, batch):
        active[0] = True
        try:
            return original_step(self, batch)
        finally:
            active[0] = False
    monkeypatch.setattr(Trainer, "_step", watched)
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.optimizer_kernel=fused", f"solver.precision={precision}",
                       "solver.grad_clip=1.0", "solver.num_epoch=1", "eval.period=5"])
    assert reads == []
    # The same watch sees the host path's read, so it is not blind.
    reads.clear()
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "host"),
                       "solver.optimizer_kernel=foreach", "solver.num_epoch=1", "eval.period=5"])
    assert "__bool__" in reads


def _group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` still running (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_sigterm_to_the_process_group_with_loader_workers(synth_root, tmp_path, uninterrupted):
    """How Slurm and systemd stop a job: SIGTERM to every process of the group, the
    DataLoader workers included. The workers ignore it; the run finishes its step,
    saves, says how to resume, exits 143, and resumes to the same weights as a run
    that was never stopped (the data do not depend on the number of workers)."""
    run = tmp_path / "CUHK-PEDES" / "run"
    cmd = _command(synth_root, tmp_path, "run") + ["dataset.num_workers=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    # Mid-epoch (the first checkpoint is at step 2), with both workers running.
    while proc.poll() is None and time.time() < deadline and not (
            (run / "last.pth").exists() and len(_group_members(proc.pid)) >= 3):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the workers could be signalled"
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "resume=true" in output and "DataLoader worker" not in output
    deadline = time.time() + 60
    while _group_members(proc.pid) and time.time() < deadline:  # the workers end too
        time.sleep(0.1)
    assert _group_members(proc.pid) == []
    assert "stopped by SIGTERM" in (run / "train.log").read_text()

    resumed = _run([sys.executable, "train.py", "--config_file", str(run / "configs.yaml"),
                    "resume=true"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for name in ("last.pth", "best.pth"):
        expected, actual = _weights(uninterrupted / name), _weights(run / name)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key} differs"


def _damage_one_validation_image(root: Path) -> tuple[Path, bytes]:
    entries = json.loads((root / "CUHK-PEDES" / "reid_raw.json").read_text())
    path = root / "CUHK-PEDES" / "imgs" / next(e for e in entries
                                               if e["split"] == "val")["file_path"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path, data


def test_crash_in_validation_loses_no_training_and_resume_validates_that_epoch(synth_root,
                                                                               tmp_path):
    """last.pth is written before validation: an unreadable validation image stops the
    run with epoch 1 saved, and the resumed run validates epoch 1 before going on, so
    best.pth is chosen exactly as in a run that never crashed."""
    from datasets.synth import generate
    root = tmp_path / "data"
    generate(str(root), "cuhk", num_ids=16, seed=0)  # the same data as synth_root
    bad, data = _damage_one_validation_image(root)
    common = ["solver.num_epoch=2", "eval.period=1"]
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(root, tmp_path), *common])
    run = tmp_path / "CUHK-PEDES" / "tiny"
    saved = load_checkpoint(run / "last.pth")
    assert (saved["epoch"], saved["global_step"], saved["validation_pending"]) == (1, 9, True)
    assert not (run / "best.pth").exists()
    log = (run / "train.log").read_text()
    assert str(bad) in log and "resume=true" in log  # the error and how to resume

    bad.write_bytes(data)
    train_script.main(["--config_file", str(run / "configs.yaml"), "resume=true"])
    log = (run / "train.log").read_text()
    assert log.count("epoch 1 validation (") == 1 and log.count("epoch 2 validation (") == 1
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "whole"),
                       *common])
    whole = tmp_path / "CUHK-PEDES" / "whole"
    for name, keys in (("best.pth", ("epoch", "metrics")), ("last.pth", ("best_epoch",
                                                                       "best_metric"))):
        expected, actual = load_checkpoint(whole / name), load_checkpoint(run / name)
        assert [actual[k] for k in keys] == [expected[k] for k in keys]
        for key, value in expected["model"].items():
            assert torch.equal(actual["model"][key], value), f"{name}: {key} differs"


def test_unexpected_error_goes_to_train_log_with_its_traceback(synth_root, tmp_path,
                                                                 monkeypatch):
    import processor.trainer

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in validation")
    monkeypatch.setattr(processor.trainer, "evaluate", broken)
    with pytest.raises(RuntimeError, match="a bug in validation"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path)])
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: a bug in validation" in log
    assert re.search(r"the last saved state is in .*last\.pth; after fixing the cause, resume "
                     r"with: python train.py --config_file .*configs\.yaml resume=true", log)


def test_resume_applies_what_it_can_and_refuses_the_rest(synth_root, tmp_path):
    """More epochs are applied (the cosine schedule is recomputed for the new length),
    logged, recorded in resumes.yaml and configs.yaml; a new lr or head is refused
    before anything is written."""
    import yaml
    from utils.config import ConfigError
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.num_epoch=1"])
    run = tmp_path / "CUHK-PEDES" / "tiny"
    config = str(run / "configs.yaml")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for changes, refused in ((["solver.lr=0.5", "moe.reduction=2", "solver.num_epoch=2"],
                              [r"moe\.reduction: 4 -> 2 \(it changes the model",
                               r"solver\.lr: 0\.001 -> 0\.5 \(the optimizer's settings"]),
                             (["solver.num_epoch=0"], [r"'solver\.num_epoch' must be >= 1"])):
        with pytest.raises(ConfigError) as err:
            train_script.main(["--config_file", config, "resume=true", *changes])
        for pattern in refused:
            assert re.search(pattern, str(err.value)), str(err.value)
        assert "solver.num_epoch: 1 -> 2" not in str(err.value)  # that one is allowed
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    train_script.main(["--config_file", config, "resume=true", "solver.num_epoch=2",
                       "solver.log_period=3"])
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["epoch"] == 2 and ckpt["config"]["solver"]["num_epoch"] == 2
    assert ckpt["scheduler"]["total_steps"] == 2 * 9
    saved = yaml.safe_load((run / "configs.yaml").read_text())
    assert saved["solver"]["num_epoch"] == 2 and saved["resume"] is False
    (entry,) = yaml.safe_load((run / "resumes.yaml").read_text())
    assert entry["from"] == {"epoch": 1, "batch_in_epoch": 0, "global_step": 9}
    assert {k: (v["from"], v["to"]) for k, v in entry["changes"].items()} == {
        "solver.num_epoch": (1, 2), "solver.log_period": (2, 3)}
    log = (run / "train.log").read_text()
    assert "resume: solver.num_epoch: 1 -> 2" in log and "resume: solver.log_period: 2 -> 3" in log
    assert re.search(r"now ends at step 18; at step 9 the lr .* is 0\.0005, 0 on the old", log)


def test_resume_refuses_fewer_epochs_than_already_trained():
    from processor.resume import compare_for_resume
    from utils.config import ConfigError, load_config, to_plain
    saved = to_plain(load_config(None, ["solver.num_epoch=5"]))
    with pytest.raises(ConfigError, match=r"solver\.num_epoch: 5 -> 2 \(the run has already "
                                          r"trained 3 epochs"):
        compare_for_resume(saved, to_plain(load_config(None, ["solver.num_epoch=2"])), 3, "x")
    (more,) = compare_for_resume(saved, to_plain(load_config(None, ["solver.num_epoch=8"])), 3,
                                 "x")
    assert (more.key, more.saved, more.requested) == ("solver.num_epoch", 5, 8)


def test_every_key_of_the_defaults_has_a_resume_rule():
    """Each key is applied, ignored or refused by a rule written for it, with its reason."""
    from processor.resume import APPLY, IGNORE, REFUSE, RULES, default_values
    assert set(RULES) == set(default_values())
    assert all(action in (APPLY, IGNORE, REFUSE) and why for action, why in RULES.values())


def _resume_with(saved: dict, *overrides: str):
    from processor.resume import compare_for_resume
    from utils.config import load_config, to_plain
    return compare_for_resume(saved, to_plain(load_config(None, list(overrides))), 1, "x")


def test_resume_applies_every_eval_setting_and_names_why_it_refuses_optimizer_groups():
    from utils.config import ConfigError, load_config, to_plain
    saved = to_plain(load_config(None))
    changes = ["eval.audit=true", "eval.audit_samples=64", "eval.audit_tolerance=0.01",
               "eval.i2t=true", "eval.batch_size=8", "eval.period=3"]
    assert sorted(d.key for d in _resume_with(saved, *changes)) == sorted(
        c.split("=")[0] for c in changes)
    for change, why in (("solver.param_rules=irra", "which lr and weight decay each parameter"),
                        ("solver.module_lr_factors={head: 2.0}", "which lr and weight decay"),
                        ("solver.lr_update=epoch", "lr schedule of the steps already taken"),
                        ("solver.fp16_weights=true", "weights' dtype")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            _resume_with(saved, change)


def test_a_key_added_since_the_run_started_takes_only_its_default():
    """An older run's config lacks newer keys: it trained as their defaults behave, so
    only the default is accepted, except for keys that are applied anyway."""
    from utils.config import ConfigError, load_config, to_plain
    saved = to_plain(load_config(None))
    for section, key in (("moe", "combine"), ("solver", "fp16_weights"), ("eval", "audit")):
        del saved[section][key]
    listed = _resume_with(saved)  # their defaults: accepted, and listed
    assert [(d.key, d.saved, d.requested) for d in listed] == [
        ("eval.audit", None, False), ("moe.combine", None, "renorm"),
        ("solver.fp16_weights", None, False)]
    for change in ("moe.combine=prob", "solver.fp16_weights=true"):
        with pytest.raises(ConfigError, match=r"not a setting when the run started, which "
                                              r"trained as .* does; it changes"):
            _resume_with(saved, change)
    assert "eval.audit" in [d.key for d in _resume_with(saved, "eval.audit=true")]


def test_non_finite_weights_are_never_saved(synth_root, tmp_path, monkeypatch):
    """A step that makes the weights inf (e.g. an infinite lr) must not turn last.pth
    into a 'last good state' of garbage: the save is refused, last.pth keeps step 2."""
    from processor.trainer import NonFiniteWeightsError, Trainer
    original = Trainer._optimizer_step

    def diverging(self, finite):
        original(self, finite)
        if self.global_step == 2:  # the update of the third step
            self.core.backbone.visual.proj.data.fill_(float("inf"))
    monkeypatch.setattr(Trainer, "_optimizer_step", diverging)
    with pytest.raises(NonFiniteWeightsError, match=r"last\.pth still holds the state of epoch "
                                                    r"1, batch 2, step 2.*solver\.lr"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                           "checkpoint.every_n_steps=2", "solver.optimizer_kernel=foreach"])
    ckpt = load_checkpoint(tmp_path / "CUHK-PEDES" / "tiny" / "last.pth")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("lr_update,old", [("step", 0.5), ("epoch", 0.75)])
def test_a_new_run_length_logs_the_old_schedules_lr_in_its_own_units(caplog, lr_update, old):
    """At step 25 of 10-step epochs (epoch 2), 4 epochs with 1 of warm-up: stepped per
    step the cosine is half-way (0.5); stepped per epoch it is a third of the way (0.75)."""
    from processor.runner import _log_schedule_change
    from solver import WarmupCosineSchedule, schedule_from_config
    from utils.config import load_config
    solver = load_config(None, ["solver.num_epoch=8", "solver.warmup_epochs=1",
                                f"solver.lr_update={lr_update}", "solver.lr=1.0"]).solver
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    WarmupCosineSchedule(optimizer, **schedule_from_config(solver, 10))
    with caplog.at_level("WARNING"):
        _log_schedule_change({**solver, "num_epoch": 4}, solver, 25, 10, optimizer)
    assert re.search(rf"solver\.num_epoch 4 -> 8: .* at step 25 the lr .* is \S+, {old:g} on the "
                     rf"old schedule", caplog.text), caplog.text
