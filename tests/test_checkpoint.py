import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from utils import checkpoint as ckpt_mod
from utils.checkpoint import (CheckpointError, atomic_save, capture_rng_state, load_checkpoint,
                              load_model_state, restore_rng_state)


def test_atomic_save_keeps_previous_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no temporary file left behind


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_non_plain_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(path)


def test_truncated_and_missing_checkpoint(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="t.pth"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_mismatch_reports_config_keys_and_parameters():
    model = nn.Sequential(nn.Linear(4, 3))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "extra": torch.zeros(1)}
    ckpt = {"model": state, "config": {"moe": {"topk": 2}, "seed": 1}}
    with pytest.raises(CheckpointError) as err:
        load_model_state(model, ckpt, {"moe": {"topk": 1}, "seed": 1}, source="best.pth")
    message = str(err.value)
    assert "moe.topk: 2 != 1" in message
    assert "0.weight: checkpoint (5, 4) vs model (3, 4)" in message
    assert "unexpected in checkpoint (1): extra" in message


def test_module_prefix_is_stripped():
    model = nn.Linear(2, 2)
    state = {f"module.{k}": v + 1 for k, v in model.state_dict().items()}
    load_model_state(model, {"model": state})
    assert torch.equal(model.weight, state["module.weight"])


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    atomic_save({"model": {}, "rng": capture_rng_state()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
