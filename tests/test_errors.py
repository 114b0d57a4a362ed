"""Bad input of every kind ends in one `error: ...` line and exit code 1, not a traceback."""
from __future__ import annotations

import json
import signal
import sys

import pytest
import torch

import test as test_script
import train as train_script
import visualize
from cli import run_cli
from conftest import ROOT, tiny_overrides
from utils.errors import StopRequested, UserError

CONFIG = str(ROOT / "configs" / "demo.yaml")


def _cli(main, argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Exit code and stderr of an entry point run as from the shell."""
    monkeypatch.setattr(sys, "argv", ["script.py", *argv])
    code = run_cli(main)
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_any_user_error_is_one_line_and_other_exceptions_keep_their_traceback(monkeypatch,
                                                                             capsys):
    class SomeNewError(UserError):  # defined anywhere: cli.py needs no list of names
        pass

    def fails(argv):
        raise SomeNewError("what to fix")
    assert _cli(fails, [], monkeypatch, capsys) == (1, "error: what to fix\n")

    def bug(argv):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        _cli(bug, [], monkeypatch, capsys)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopped_run_exits_with_128_plus_the_signal(monkeypatch, capsys, signum):
    def stopped(argv):
        raise StopRequested("stopped; resume with ...", signum)
    code, err = _cli(stopped, [], monkeypatch, capsys)
    assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[signum]
    assert err == "stopped; resume with ...\n"


@pytest.mark.parametrize("env, command", [
    ({}, "python train.py"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, "torchrun --nproc_per_node=4 train.py"),
    ({"RANK": "0", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"},
     "torchrun --nnodes=2 --nproc_per_node=8 <your rendezvous options> train.py"),
])
def test_resume_commands_name_the_launcher_of_the_run(monkeypatch, env, command):
    from utils.comm import train_command
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert train_command() == command


def test_a_stop_under_torchrun_is_reported_once(monkeypatch, capsys):
    def stopped(argv):
        raise StopRequested("stopped; resume with ...", signal.SIGTERM)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, expected in (("1", ""), ("0", "stopped; resume with ...\n")):
        monkeypatch.setenv("RANK", rank)
        code, err = _cli(stopped, [], monkeypatch, capsys)
        assert code == 143 and err == expected


def test_error_classes_share_one_base():
    from datasets.pedes import BadImageError, DatasetError
    from model.clip_model import CheckpointMismatchError, PretrainedWeightsUnavailable
    from processor.runner import RunFolderError
    from processor.trainer import NonFiniteLossError, NonFiniteWeightsError
    from utils.checkpoint import CheckpointError
    from utils.config import ConfigError
    from utils.misc import DeviceUnavailableError
    for cls in (BadImageError, DatasetError, CheckpointMismatchError,
                PretrainedWeightsUnavailable, RunFolderError, NonFiniteLossError,
                NonFiniteWeightsError, CheckpointError, ConfigError, DeviceUnavailableError):
        assert issubclass(cls, UserError), cls


def test_non_utf8_yaml(tmp_path, monkeypatch, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("_BASE_: defaults.yaml\nname: caf\u00e9\n".encode("latin-1"))
    code, err = _cli(train_script.main, ["--config_file", str(path)], monkeypatch, capsys)
    assert code == 1 and "latin1.yaml is not UTF-8" in _one_line(err) and "0xe9" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(synth_root, tmp_path, monkeypatch, capsys):
    code, err = _cli(train_script.main, ["--config_file", CONFIG,
                                         *tiny_overrides(synth_root, tmp_path), "device=cuda"],
                     monkeypatch, capsys)
    assert code == 1 and "device=cuda asks for a GPU" in _one_line(err)
    assert "device=cpu" in err and not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def finished_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train_script.main(["--config_file", CONFIG, *tiny_overrides(synth_root, out, "done"),
                       "solver.num_epoch=1"])
    return out / "CUHK-PEDES" / "done"


def test_a_failing_test_py_writes_its_error_to_test_log(finished_run, monkeypatch, capsys):
    import processor.runner
    from processor.evaluator import LeakAuditError

    def leaky(*args, **kwargs):
        raise LeakAuditError("embeddings depend on other samples in the batch")

    monkeypatch.setattr(processor.runner, "evaluate", leaky)
    code, err = _cli(test_script.main, ["--config_file", str(finished_run / "configs.yaml")],
                     monkeypatch, capsys)
    assert code == 1 and "embeddings depend on other samples" in _one_line(err)
    log = (finished_run / "test.log").read_text()
    assert "LeakAuditError: embeddings depend on other samples in the batch" in log


def test_checkpoint_whose_model_entry_is_not_a_state_dict(finished_run, tmp_path, monkeypatch,
                                                         capsys):
    ckpt = torch.load(finished_run / "best.pth", weights_only=True)
    ckpt["model"] = 5
    torch.save(ckpt, tmp_path / "odd.pth")
    code, err = _cli(test_script.main, ["--config_file", str(finished_run / "configs.yaml"),
                                        f"checkpoint={tmp_path / 'odd.pth'}"], monkeypatch, capsys)
    assert code == 1 and "odd.pth" in _one_line(err) and "'model' entry is int 5" in err


def test_resume_from_a_checkpoint_without_optimizer_state(finished_run, tmp_path, monkeypatch,
                                                          capsys):
    run = tmp_path / "CUHK-PEDES" / "done"
    run.mkdir(parents=True)
    (run / "configs.yaml").write_bytes((finished_run / "configs.yaml").read_bytes())
    ckpt = torch.load(finished_run / "last.pth", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, run / "last.pth")
    before = sorted(p.name for p in run.iterdir())
    code, err = _cli(train_script.main, ["--config_file", str(run / "configs.yaml"),
                                         f"output_dir={tmp_path}", "resume=true"],
                     monkeypatch, capsys)
    assert code == 1 and "cannot continue a run: it has no optimizer" in _one_line(err)
    assert sorted(p.name for p in run.iterdir()) == before


def test_identity_beyond_64_bits(tmp_path, monkeypatch, capsys):
    from datasets.synth import generate
    root = tmp_path / "data"
    generate(str(root), "cuhk", num_ids=16, seed=0)
    annotation = root / "CUHK-PEDES" / "reid_raw.json"
    entries = json.loads(annotation.read_text())
    test_pid = next(e["id"] for e in entries if e["split"] == "test")
    for entry in entries:
        if entry["id"] == test_pid:
            entry["id"] = 2**70
    annotation.write_text(json.dumps(entries))
    code, err = _cli(train_script.main, ["--config_file", CONFIG,
                                         *tiny_overrides(root, tmp_path / "out")],
                     monkeypatch, capsys)
    assert code == 1 and f"field 'id' is {2**70}, outside the 64-bit" in _one_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("experts,problem", [
    ({"image": 5}, "'experts.image' must hold 'usage' and 'entropy'"),
    ({"image": {"usage": "many", "entropy": [1.0]}}, "'experts.image.usage' must be a list"),
    ({"text": {"usage": [[0.5, 0.5]], "entropy": [1.0, 0.5]}},
     "'experts.text.entropy' must be a list of 1 numbers"),
    ([1, 2], "'experts' must map image/text"),
])
def test_wrongly_typed_routing_statistics(finished_run, tmp_path, monkeypatch, capsys, experts,
                                          problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / "configs.yaml").write_bytes((finished_run / "configs.yaml").read_bytes())
    (run / "test_metrics.json").write_text(json.dumps({"t2i": {}, "experts": experts}))
    code, err = _cli(visualize.main, ["--config_file", str(run / "configs.yaml"), "--routing"],
                     monkeypatch, capsys)
    assert code == 1 and problem in _one_line(err) and "test_metrics.json" in err


@pytest.mark.parametrize("override,message", [
    ("model.arch.vision_layer=2", "unknown key 'model.arch.vision_layer'; did you mean "
                                  "model.arch.vision_layers?"),
    ("model.arch.vision_layers=two", "key 'model.arch.vision_layers' must be an integer >= 1; "
                                     "got 'two'"),
    ("model.pretrain=/missing/clip.pt", "pretrain='/missing/clip.pt' is neither a file nor a "
                                        "known model"),
])
def test_model_settings_that_build_no_model_give_one_line(synth_root, tmp_path, monkeypatch,
                                                          capsys, override, message):
    code, err = _cli(train_script.main, ["--config_file", CONFIG,
                                         *tiny_overrides(synth_root, tmp_path / "out"), override],
                     monkeypatch, capsys)
    assert code == 1 and message in _one_line(err) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
