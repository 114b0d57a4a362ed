"""The entry points' command lines: --help, IRRA-style flags, several config files,
and argument parsing before any heavy import."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

import test as test_script
import train as train_script
from conftest import ROOT, tiny_overrides
from utils.config import _dotted_keys, load_config

DEMO = str(ROOT / "configs" / "demo.yaml")
NO_COAR = str(ROOT / "configs" / "ablations" / "no_coar.yaml")

# Runs a script's --help in a fresh interpreter and reports whether torch got imported.
HELP_PROBE = """
import runpy, sys
sys.argv = [{name!r}, "--help"]
try:
    runpy.{runner}
except SystemExit:
    pass
sys.stderr.write("torch imported: %s" % ("torch" in sys.modules))
"""
SCRIPTS = {
    "train.py": "run_path('train.py', run_name='__main__')",
    "test.py": "run_path('test.py', run_name='__main__')",
    "visualize.py": "run_path('visualize.py', run_name='__main__')",
    "retrieve.py": "run_path('retrieve.py', run_name='__main__')",
    "datasets.check": "run_module('datasets.check', run_name='__main__', alter_sys=True)",
    "datasets.synth": "run_module('datasets.synth', run_name='__main__', alter_sys=True)",
}


def _help(name: str) -> subprocess.CompletedProcess:
    code = HELP_PROBE.format(name=name, runner=SCRIPTS[name])
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.mark.parametrize("name", ["visualize.py", "retrieve.py", "datasets.check",
                                  "datasets.synth"])
def test_help_parses_arguments_before_importing_torch(name):
    proc = _help(name)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    assert proc.stderr.endswith("torch imported: False"), proc.stderr


@pytest.mark.parametrize("name", ["train.py", "test.py"])
def test_help_lists_every_config_key_with_its_default(name):
    proc = _help(name)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.endswith("torch imported: False"), proc.stderr
    text = proc.stdout
    assert "configs/defaults.yaml" in text
    defaults = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())
    for key in _dotted_keys(defaults):
        if "." in key:  # sections are headers; every key is listed as key=default
            assert f"  {key}=" in text, key
    assert "  solver.batch_size=64 " in text and "global batch per optimizer step" in text


def test_irra_flags_are_answered_with_the_overrides_that_do_the_same(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_script.parse_args(["--config_file", DEMO, "--batch_size", "64", "--root_dir",
                                 "/data/x", "--dataset_name", "RSTPReid", "--lr=3e-6", "--MLM"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    for override in ("solver.batch_size=64", "dataset.root_dir=/data/x", "dataset.name=RSTPReid",
                     "solver.lr=3e-6", "loss.names=...+mlm"):
        assert override in error


def test_several_config_files_with_overrides_anywhere():
    args = train_script.parse_args(["seed=3", "--config_file", DEMO, NO_COAR, "solver.lr=1e-4"])
    assert args.config_file == [DEMO, NO_COAR]
    assert args.opts == ["seed=3", "solver.lr=1e-4"]
    assert test_script.parse_args(["--config_file", DEMO, "eval.i2t=true"]).config_file == [DEMO]


def test_train_py_runs_an_ablation_on_the_demo(synth_root, tmp_path):
    train_script.main(["--config_file", DEMO, NO_COAR, *tiny_overrides(synth_root, tmp_path),
                       "solver.num_epoch=1"])
    saved = load_config(tmp_path / "CUHK-PEDES" / "tiny" / "configs.yaml")
    assert saved.loss.names == "sdm+itc"  # the ablation's one change
    assert saved.moe.layers == 1 and saved.solver.lr == pytest.approx(1e-3)  # tiny_overrides
    # The demo's values where the ablation's base (comoe.yaml) has others.
    assert saved.dataset.generate and saved.solver.lr_factor == 1.0
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert " step " in log and "coar=" not in log
