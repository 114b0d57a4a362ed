"""A GPU that was asked for is never silently replaced by the CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_overrides
from utils.misc import DeviceUnavailableError, resolve_device

CONFIG = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where CUDA is not usable (also on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


@pytest.mark.parametrize("visible", [None, "", "-1", "NoDevFiles", "-1,0"])
def test_auto_falls_back_to_the_cpu_when_no_gpu_is_selected(no_cuda, visible):
    if visible is not None:
        no_cuda.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("visible", ["0", "1,0", "GPU-8f7d1c2e-0000", "MIG-3a5b"])
def test_auto_refuses_when_cuda_visible_devices_selects_a_gpu(no_cuda, visible):
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(DeviceUnavailableError,
                       match=rf"CUDA_VISIBLE_DEVICES={visible} asks for a GPU, but CUDA is not "
                             rf"usable here: .*set device=cpu or unset CUDA_VISIBLE_DEVICES"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # explicit CPU still works


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_explicit_cuda_is_refused_without_cuda(no_cuda, name):
    with pytest.raises(DeviceUnavailableError, match=rf"device={name} asks for a GPU"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_py_with_cuda_visible_devices_on_a_cpu_machine(synth_root, tmp_path):
    """The reported case, end to end: exit 1 with one line, no run folder; with device=cpu
    the same command trains."""
    overrides = [o for o in tiny_overrides(synth_root, tmp_path) if not o.startswith("device=")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "train.py", "--config_file", CONFIG, *overrides, "device=auto"]
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.startswith("error: CUDA_VISIBLE_DEVICES=0 asks for a GPU")
    assert "Traceback" not in refused.stderr and not any(tmp_path.iterdir())
    allowed = subprocess.run(cmd[:-1] + ["device=cpu", "solver.num_epoch=1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "device: cpu" in (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
