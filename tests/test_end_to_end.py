"""train.py and test.py through their main(argv) on generated data."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import retrieve
import test as test_script
import train as train_script
import visualize
from conftest import ROOT, tiny_overrides
from processor.runner import RunFolderError
from processor.trainer import Trainer
from utils.config import ConfigError
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.misc import UnsupportedTorchError, require_torch

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


MODEL_ONLY = {"model", "config", "epoch", "num_classes", "metrics"}


def test_best_pth_holds_the_model_only_and_full_files_still_load(synth_root, tmp_path):
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "slim"),
                       "solver.num_epoch=1"])
    run = tmp_path / "CUHK-PEDES" / "slim"
    best = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    last = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert set(best) == MODEL_ONLY
    assert best["metrics"]["split"] == "val" and 0 <= best["metrics"]["t2i"]["R1"] <= 100
    assert best["epoch"] == 1 and best["num_classes"] == last["num_classes"] > 0
    assert {"optimizer", "scheduler", "rng"} <= set(last)
    assert (run / "best.pth").stat().st_size < 0.5 * (run / "last.pth").stat().st_size
    saved = json.loads((run / "test_metrics.json").read_text())
    # One epoch: best and last hold the same weights; a full-state best.pth, as earlier
    # versions wrote it, scores the same.
    shutil.copyfile(run / "last.pth", run / "best.pth")
    again = test_script.main(["--config_file", str(run / "configs.yaml")])
    assert again["t2i"] == pytest.approx(saved["t2i"], abs=1e-6)


def test_runs_without_validation_and_resumes_leave_no_stale_temporaries(synth_root, tmp_path,
                                                                        monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = [f".last.pth.tmp-{gone.pid}", f".best.pth.tmp-{gone.pid}"]
    train_epoch = Trainer._train_epoch

    def epoch_then_leftovers(self, sampler):  # what a writer killed mid-save leaves behind
        train_epoch(self, sampler)
        for name in stale:
            (self.run_dir / name).write_bytes(b"\0" * 4096)

    monkeypatch.setattr(Trainer, "_train_epoch", epoch_then_leftovers)
    overrides = tiny_overrides(synth_root, tmp_path, "noval") + ["dataset.val_ids=0",
                                                                 "solver.num_epoch=1"]
    train_script.main(["--config_file", CONFIG, *overrides])
    run = tmp_path / "CUHK-PEDES" / "noval"
    assert not list(run.glob(".*.tmp-*"))  # swept after the epoch's save
    best = torch.load(run / "best.pth", map_location="cpu", weights_only=True)
    assert set(best) == MODEL_ONLY and best["metrics"] is None and best["epoch"] == 1

    monkeypatch.undo()
    for name in stale:
        (run / name).write_bytes(b"\0" * 4096)
    train_script.main(["--config_file", str(run / "configs.yaml"), "resume=true"])
    assert not list(run.glob(".*.tmp-*"))  # swept at the start


def test_refuses_to_overwrite_run_folder(synth_root, tmp_path):
    """The refusal suggests resume=true only when the folder has the configs.yaml it names."""
    run = tmp_path / "CUHK-PEDES" / "taken"
    run.mkdir(parents=True)
    (run / "train.log").write_text("an earlier run\n")
    with pytest.raises(RunFolderError, match="already exists and holds train.log: no configs.yaml") as err:
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path, "taken")])
    assert "resume=true" not in str(err.value)
    assert (run / "train.log").read_text() == "an earlier run\n"


@pytest.mark.parametrize("bad", [
    ["dataset.root_dir=MISSING", "dataset.generate=false"], ["moe.topk=8"], ["loss.names=sdm+foo"],
    ["dataset.sampler=identity", "solver.batch_size=30"], ["dataset.name=FOO"],
    ["dataset.name=FOO", "dataset.generate=true"], ["solver.module_lr_factors={head.blocks.*.moee: 2.0}"],
    ["moe.num_experts=0"]],
    ids=["no-dataset", "topk", "loss", "sampler", "name", "name-generate", "lr-pattern",
         "coar-without-experts"])
def test_failed_start_leaves_nothing_and_can_be_rerun(synth_root, tmp_path, bad):
    """Config values, dataset and model are checked before the run folder exists: a
    failed start leaves no folder, so the same command fails the same way again (not
    with "already exists")."""
    from utils.errors import UserError
    bad = [b.replace("MISSING", str(tmp_path / "nowhere")) for b in bad]
    out = tmp_path / "out"
    argv = ["--config_file", CONFIG, *tiny_overrides(synth_root, out), *bad]
    messages = []
    for _ in range(2):
        with pytest.raises(UserError) as err:
            train_script.main(argv)
        messages.append(str(err.value))
        assert not out.exists()
    assert messages[0] == messages[1] and not isinstance(err.value, RunFolderError)


def test_unavailable_fused_optimizer_leaves_nothing(synth_root, tmp_path, monkeypatch):
    adamw = torch.optim.AdamW

    def without_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("fused=True requires all the params to be on a supported device")
        return adamw(params, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", without_fused)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="solver.optimizer_kernel=fused is not available"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, out),
                           "solver.optimizer_kernel=fused"])
    assert not out.exists()


def test_folder_of_a_start_that_never_saved(synth_root, tmp_path):
    """A start killed before its first checkpoint leaves configs.yaml and train.log:
    the same command is refused (the folder is taken), resume=true starts it again there."""
    run = tmp_path / "CUHK-PEDES" / "tiny"
    run.mkdir(parents=True)
    from utils.config import load_config, save_config
    save_config(load_config(CONFIG, tiny_overrides(synth_root, tmp_path)), run / "configs.yaml")
    (run / "train.log").write_text("killed while loading the dataset\n")
    with pytest.raises(RunFolderError, match="holds no checkpoint.*resume=true"):
        train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path)])
    result = train_script.main(["--config_file", str(run / "configs.yaml"), "resume=true",
                                "solver.num_epoch=1"])
    _check_metrics(result["t2i"])
    assert load_checkpoint(run / "last.pth")["epoch"] == 1
    assert "starts from the beginning" in (run / "train.log").read_text()


def test_other_checkpoints_get_their_own_metrics_file(synth_root, tmp_path):
    """test.py checkpoint=OTHER never overwrites test_metrics.json (best.pth's, which
    visualize.py reads)."""
    import shutil
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                       "solver.num_epoch=1"])
    run = tmp_path / "CUHK-PEDES" / "tiny"
    best = (run / "test_metrics.json").read_bytes()
    config = str(run / "configs.yaml")
    test_script.main(["--config_file", config, f"checkpoint={run / 'last.pth'}"])
    elsewhere = tmp_path / "kept" / "epoch1.pth"
    elsewhere.parent.mkdir()
    shutil.copy(run / "last.pth", elsewhere)
    test_script.main(["--config_file", config, f"checkpoint={elsewhere}"])
    test_script.main(["--config_file", config, f"checkpoint={run / 'best.pth'}"])
    assert (run / "test_metrics.json").read_bytes() == best
    other = sorted(p.name for p in run.glob("test_metrics_*.json"))
    assert len(other) == 2 and "test_metrics_last.json" in other
    assert re.fullmatch(r"test_metrics_epoch1_[0-9a-f]{8}\.json", next(
        name for name in other if name != "test_metrics_last.json"))
    assert json.loads((run / "test_metrics_last.json").read_text())["checkpoint"].endswith(
        "last.pth")


def test_scoring_and_resuming_need_no_clip_file(synth_root, tmp_path):
    """A run trained from a CLIP weights file is scored (test.py, visualize.py,
    retrieve.py) and resumed after the file is gone: the checkpoint holds every weight."""
    import retrieve
    import visualize
    from model import build_model
    from utils.config import load_config
    clip = tmp_path / "clip.pt"
    torch.manual_seed(0)
    torch.save(build_model(load_config(CONFIG, tiny_overrides(synth_root, tmp_path))
                           ).backbone.state_dict(), clip)
    result = train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path),
                                f"model.pretrain={clip}", "solver.num_epoch=1"])
    clip.unlink()
    run = tmp_path / "CUHK-PEDES" / "tiny"
    config = str(run / "configs.yaml")
    assert test_script.main(["--config_file", config])["t2i"] == result["t2i"]
    visualize.main(["--config_file", config, "--indices", "0", "--out", str(tmp_path / "vis")])
    found = retrieve.main(["--config_file", config, "--gallery", str(synth_root / "CUHK-PEDES"),
                           "--query", "a man in a red coat", "--topk", "3",
                           "--out", str(tmp_path / "vis")])
    assert len(found["queries"][0]["matches"]) == 3
    train_script.main(["--config_file", config, "resume=true", "solver.num_epoch=2"])
    assert load_checkpoint(run / "last.pth")["epoch"] == 2


def test_a_moved_run_folder_resumes_where_it_is_now(synth_root, tmp_path):
    """configs.yaml holds the absolute output_dir of training; resuming from the file after
    the run folder was moved continues in the new place and leaves the old one alone."""
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path / "old"),
                       "solver.num_epoch=1"])
    shutil.move(tmp_path / "old", tmp_path / "new")
    run = tmp_path / "new" / "CUHK-PEDES" / "tiny"
    train_script.main(["--config_file", str(run / "configs.yaml"), "resume=true", "solver.num_epoch=2"])
    assert not (tmp_path / "old").exists()
    assert load_checkpoint(run / "last.pth")["epoch"] == 2
    assert "output_dir" in (run / "resumes.yaml").read_text()
    assert f"output_dir: {tmp_path / 'new'}" in (run / "configs.yaml").read_text()
    assert "the run folder was moved from" in (run / "train.log").read_text()

    # A folder whose name cannot be the run's is refused, naming both places.
    shutil.move(run, tmp_path / "new" / "CUHK-PEDES" / "renamed")
    with pytest.raises(RunFolderError, match=r"does not end in CUHK-PEDES/tiny"):
        train_script.main(["--config_file", str(tmp_path / "new" / "CUHK-PEDES" / "renamed" / "configs.yaml"),
                           "resume=true", "solver.num_epoch=3"])
    assert not run.exists()

    # A symlink named like the run is the run's folder where it stands.
    link = tmp_path / "linked" / "CUHK-PEDES" / "tiny"
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "new" / "CUHK-PEDES" / "renamed")
    train_script.main(["--config_file", str(link / "configs.yaml"), "resume=true", "solver.num_epoch=3"])
    assert load_checkpoint(link / "last.pth")["epoch"] == 3
    assert f"output_dir: {tmp_path / 'linked'}" in (link / "configs.yaml").read_text()


def test_a_resume_never_generates_data_and_warns_of_another_process_count(synth_root, tmp_path):
    """Generated data belongs to the start of a run: a resume whose data is gone is an error
    that gives the command recreating it, instead of generating data (possibly at the old
    place of a moved project). A run resumed by another number of processes says so."""
    data = tmp_path / "data"
    overrides = tiny_overrides(synth_root, tmp_path) + [f"dataset.root_dir={data}", "solver.num_epoch=1",
                                                       "dataset.generate_num_ids=40"]
    train_script.main(["--config_file", CONFIG, *overrides])
    run = tmp_path / "CUHK-PEDES" / "tiny"
    generated = sorted(p.relative_to(data) for p in data.rglob("*"))
    shutil.rmtree(data)
    from datasets import DatasetError
    with pytest.raises(DatasetError, match=r"resumed training never generate data.*datasets\.synth"):
        train_script.main(["--config_file", str(run / "configs.yaml"), "resume=true", "solver.num_epoch=2"])
    assert not data.exists()

    subprocess.run([sys.executable, "-m", "datasets.synth", "--root", str(data), "--format", "cuhk",
                    "--num_ids", "40", "--seed", "1"], cwd=ROOT, check=True, capture_output=True)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == generated
    last = load_checkpoint(run / "last.pth")
    last["rng_ranks"] = [last["rng"], last["rng"]]  # as if two processes had trained it
    torch.save(last, run / "last.pth")
    train_script.main(["--config_file", str(run / "configs.yaml"), "resume=true", "solver.num_epoch=2"])
    assert "trained by 2 process(es), it continues with 1" in (run / "train.log").read_text()


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


@pytest.mark.parametrize("script", [train_script, test_script, visualize, retrieve])
def test_entry_points_refuse_torch_older_than_2_6(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    argv = ["--config_file", str(tmp_path / "configs.yaml")]
    if script is retrieve:
        argv += ["--gallery", str(tmp_path), "--query", "a man"]
    with pytest.raises(UnsupportedTorchError, match=r"torch 2\.5\.1\+cu124 is installed but this "
                                                    r"code needs torch>=2\.6.*CVE-2025-32434"):
        script.main(argv)
    monkeypatch.setattr("sys.argv", [f"{script.__name__}.py", *argv])
    assert cli.run_cli(script.main) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_torch_version_floor_compares_numbers():
    for version in ("2.6.0", "2.6.0+cu124", "2.10.1", "3.0.0a0"):
        require_torch(version)
    for version in ("2.5.1", "1.13.1+cpu", "2.1", "unknown"):
        with pytest.raises(UnsupportedTorchError, match=f"torch {re.escape(version)} is installed"):
            require_torch(version)


def _outside_checkpoint(cfg, path) -> None:
    """A model of `cfg` saved as a checkpoint from outside any run folder."""
    from model import build_model
    from processor.runner import load_dataset
    from utils.config import to_plain
    num_classes = load_dataset(cfg).num_train_pids
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg, num_classes).state_dict(), "num_classes": num_classes,
                "config": to_plain(cfg), "epoch": 3}, path)


def test_scoring_with_an_experiment_file_then_training_it(synth_root, tmp_path):
    """The README's "Reproducing IRRA" sequence: score a checkpoint from elsewhere with an
    experiment file (test.py, visualize.py and retrieve.py write into the folder that file
    trains into, never next to the file), then train that experiment there."""
    from utils.config import load_config
    experiment = tmp_path / "configs" / "irra.yaml"
    experiment.parent.mkdir()
    experiment.write_text(f"_BASE_: {ROOT / 'configs' / 'CUHK-PEDES' / 'irra.yaml'}\n")
    out = tmp_path / "logs"
    overrides = tiny_overrides(synth_root, out, "irra") + ["model.cmt_depth=1", "solver.num_epoch=1"]
    outside = tmp_path / "released" / "best.pth"
    outside.parent.mkdir()
    _outside_checkpoint(load_config(experiment, overrides), outside)
    run = out / "CUHK-PEDES" / "irra"
    with pytest.raises(CheckpointError, match="holds no checkpoint"):  # nothing trained yet
        test_script.main(["--config_file", str(experiment), *overrides])
    assert not out.exists()  # a test that cannot start writes nothing

    scored = test_script.main(["--config_file", str(experiment), f"checkpoint={outside}", *overrides])
    assert scored["epoch"] == 3
    shown = visualize.main(["--config_file", str(experiment), "--checkpoint", str(outside),
                            "--indices", "0", *overrides])
    found = retrieve.main(["--config_file", str(experiment), "--checkpoint", str(outside),
                           "--gallery", str(synth_root / "CUHK-PEDES" / "imgs"), "--query",
                           "a man in a red coat", "--topk", "2", *overrides])
    assert [p.parent for p in shown["figures"]] == [run / "vis"]
    assert Path(found["queries"][0]["figure"]).parent == run / "vis"
    assert sorted(p.name for p in experiment.parent.iterdir()) == ["irra.yaml"]
    evaluated = sorted(p.name for p in run.iterdir())
    assert evaluated[:2] == ["gallery_cache", "test.log"] and len(evaluated) == 4
    assert re.fullmatch(r"test_metrics_best_[0-9a-f]{8}\.json", evaluated[2])

    train_script.main(["--config_file", str(experiment), *overrides])  # the folder is free
    assert {"configs.yaml", "train.log", "tb", "best.pth", "last.pth", "test_metrics.json",
            *evaluated} == {p.name for p in run.iterdir()}
    with pytest.raises(RunFolderError, match=rf"To continue it: python train.py --config_file "
                                             rf"{re.escape(str(run / 'configs.yaml'))} resume=true"):
        train_script.main(["--config_file", str(experiment), *overrides])
    ours = test_script.main(["--config_file", str(experiment), *overrides])
    assert ours["checkpoint"] == str(run / "best.pth") and ours["epoch"] == 1


def test_run_folder_hints_name_only_files_that_exist(synth_root, tmp_path):
    from utils.config import load_config, save_config
    run = tmp_path / "CUHK-PEDES" / "tiny"
    run.mkdir(parents=True)
    save_config(load_config(CONFIG, tiny_overrides(synth_root, tmp_path)), run / "configs.yaml")
    argv = ["--config_file", CONFIG, *tiny_overrides(synth_root, tmp_path)]
    with pytest.raises(RunFolderError, match=r"holds no checkpoint \(a start that never saved "
                                             r"one\)\. To start it again") as err:
        train_script.main(argv)
    assert "train.log" not in str(err.value)
    (run / "train.log").write_text("killed while loading the dataset\n")
    with pytest.raises(RunFolderError, match=r"never saved one; its train.log says why"):
        train_script.main(argv)


def test_test_visualize_and_retrieve_apply_solver_tf32(synth_root, tmp_path, monkeypatch):
    """Every script that computes with a model sets the math backends as training does."""
    from utils.config import load_config
    overrides = tiny_overrides(synth_root, tmp_path) + ["solver.tf32=true"]
    outside = tmp_path / "model.pth"
    _outside_checkpoint(load_config(CONFIG, overrides), outside)
    scripts = [
        (test_script.main, ["--config_file", CONFIG, f"checkpoint={outside}", *overrides]),
        (visualize.main, ["--config_file", CONFIG, "--checkpoint", str(outside), "--indices", "0",
                          *overrides]),
        (retrieve.main, ["--config_file", CONFIG, "--checkpoint", str(outside), "--gallery",
                         str(synth_root / "CUHK-PEDES" / "imgs"), "--query", "a red coat",
                         *overrides])]
    for main, argv in scripts:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        main(argv)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32, main
