import errno
import io
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from utils import checkpoint as ckpt_mod
from utils.checkpoint import (CheckpointError, atomic_save, capture_rng_state, load_checkpoint,
                              load_model_state, payload_bytes, restore_rng_state, rng_state_for_rank,
                              sweep_temporaries)


def test_atomic_save_keeps_previous_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="disk full at"):
        atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]  # no temporary file left behind


def fills_up_after(limit: int, error: int):
    """An `open` whose files raise OSError(`error`) once `limit` bytes were written, as a
    full disk (ENOSPC) or an exhausted quota (EDQUOT) does."""
    class Full(io.FileIO):
        written = 0

        def write(self, data):
            self.written += len(data)
            if self.written > limit:
                raise OSError(error, os.strerror(error))
            return super().write(data)

    return lambda path, mode: Full(path, mode)


@pytest.mark.parametrize("error, reason", [(errno.ENOSPC, "disk full"),
                                           (errno.EDQUOT, "disk quota exceeded")])
def test_full_disk_says_where_and_how_much_space_is_needed(tmp_path, monkeypatch, error, reason):
    path = tmp_path / "last.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    big = {"model": {"w": torch.zeros(2_500_000), "view": torch.zeros(2_500_000)[:10]}, "epoch": 2}
    assert payload_bytes(big) == 2 * 10_000_000
    monkeypatch.setattr(ckpt_mod, "open", fills_up_after(1 << 20, error), raising=False)
    with pytest.raises(CheckpointError) as info:
        atomic_save(big, path)
    message = str(info.value)
    assert message.startswith(f"{reason} at {path}: 20.0 MB needed, ") and " free" in message
    assert "the previous last.pth is unchanged" in message and "\n" not in message
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


def test_write_failure_without_errno_is_disk_full_only_when_space_is_short(tmp_path, monkeypatch):
    def broken_save(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="unexpected pos") as info:
        atomic_save({"model": {"w": torch.ones(1000)}}, tmp_path / "best.pth")
    assert not isinstance(info.value, CheckpointError)  # plenty of space: the error as it was
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(
        10**12, 10**12 - 100, 100))
    with pytest.raises(CheckpointError, match=r"disk full at .*best\.pth: 1\.0 MB needed, 0\.0 MB "
                                              r"free\. Free some space"):
        atomic_save({"model": {"w": torch.ones(250_000)}}, tmp_path / "best.pth")
    assert os.listdir(tmp_path) == []


def test_sweep_removes_temporaries_of_writers_that_are_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".last.pth.tmp-{gone.pid}": True, f".best.pth.tmp-{os.getpid()}": True,
                 f".last.pth.tmp-{alive.pid}": False, "last.pth": False, ".hidden": False,
                 f"last.pth.tmp-{gone.pid}": False, f".last.pth.tmp-{gone.pid}x": False}
        for name in names:
            (tmp_path / name).write_bytes(b"partial")
        removed = sweep_temporaries(tmp_path)
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, stale in names.items() if not stale)


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


def _draws_after(state) -> tuple:
    restore_rng_state(state)
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_each_rank_resumes_its_own_random_state(tmp_path):
    """Under torchrun each rank draws its own dropout and MLM masks; last.pth keeps
    every rank's state and each rank continues its own, not rank 0's."""
    states = []
    for rank in range(3):
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        states.append(capture_rng_state())
    atomic_save({"model": {}, "rng": states[0], "rng_ranks": states, "global_step": 5}, tmp_path / "r.pth")
    ckpt = load_checkpoint(tmp_path / "r.pth")
    for rank in range(3):
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        expected = (random.random(), np.random.rand(), torch.rand(1).item())
        assert _draws_after(rng_state_for_rank(ckpt, rank, 3, seed=1)) == expected


def test_ranks_seed_streams_of_their_own_when_the_process_count_changed(caplog):
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    saved = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    for ckpt in ({"rng": saved, "global_step": 7}, {"rng": saved, "rng_ranks": [saved] * 2, "global_step": 7}):
        assert _draws_after(rng_state_for_rank(ckpt, 0, 4, seed=1)) == expected  # rank 0 continues
        draws = [_draws_after(rng_state_for_rank(ckpt, rank, 4, seed=1)) for rank in range(1, 4)]
        assert len({d for per_rank in draws for d in per_rank} | set(expected)) == 12  # all distinct
        assert draws[0] == _draws_after(rng_state_for_rank(ckpt, 1, 4, seed=1))  # deterministic
        assert draws[0] != _draws_after(rng_state_for_rank(dict(ckpt, global_step=8), 1, 4, seed=1))
    assert "rank 1 seeds its random streams afresh" in caplog.text
