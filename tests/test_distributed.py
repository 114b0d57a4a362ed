"""Multi-process training and evaluation on CPU with Gloo.

Two ranks with half of a batch each must compute the same losses and, after
DDP's averaging, the same gradients as one process with the whole batch; a
sharded evaluation must give the single-process metrics; and a two-process
`torchrun train.py` must write one set of outputs that `test.py` reproduces.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import test as test_script
from conftest import ROOT, TINY_MODEL, tiny_overrides
from utils import comm

CONFIG = str(ROOT / "configs" / "demo.yaml")
WORLD_SIZE = 2
BATCH = 8
# No dropout, so that both computations are the same function. cmpm and id cover
# the baselines' losses; mlm masks with the process's random stream and is left out.
EXACT = TINY_MODEL + ["moe.dropout=0", "moe.expert_dropout=0", "moe.layers=2",
                      "loss.names=sdm+itc+coar+cmpm+id"]
GATHERED_TERMS = ("sdm", "itc", "coar", "cmpm")  # computed on the whole global batch
LOCAL_TERMS = ("id",)  # a per-sample mean over the rank's slice; DDP averages the ranks
NUM_CLASSES = 4


def _tiny_model():
    from model import build_model
    from utils.config import load_config
    cfg = load_config(CONFIG, EXACT)
    torch.manual_seed(0)
    return build_model(cfg, num_classes=NUM_CLASSES)


def _caption_ids(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random captions of different lengths: SOT, words, EOT, zero padding. # n, length"""
    from utils.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
    ids = torch.zeros(n, length, dtype=torch.long)
    for row in range(n):
        words = int(torch.randint(3, length - 1, (1,), generator=generator))
        ids[row, 0] = SOT_TOKEN_ID
        ids[row, 1:words + 1] = torch.randint(1, 40000, (words,), generator=generator)
        ids[row, words + 1] = EOT_TOKEN_ID
    return ids


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "images": torch.randn(BATCH, 3, 32, 16, generator=g),
        "caption_ids": _caption_ids(BATCH, 24, g),
        # Every identity has one sample on each rank: SDM's positives cross ranks.
        "pids": torch.tensor([0, 1, 2, 3, 1, 0, 3, 2]),
        "image_ids": torch.arange(BATCH),
    }


def _eval_loaders(num_images: int, num_captions: int):
    """In-memory eval loaders (same batch layout as datasets.build_eval_loaders)."""
    g = torch.Generator().manual_seed(2)
    num_ids = min(3, num_images)  # every caption's identity has an image
    images = [{"images": torch.randn(3, 32, 16, generator=g), "pids": i % num_ids}
              for i in range(num_images)]
    captions = [{"caption_ids": ids, "pids": i % num_ids}
                for i, ids in enumerate(_caption_ids(num_captions, 24, g))]
    return (torch.utils.data.DataLoader(images, batch_size=3),
            torch.utils.data.DataLoader(captions, batch_size=3))


class _CountCollectives:
    """Records (name, tensor shape) of every all_gather / all_reduce made inside it."""

    NAMES = ("all_gather", "all_reduce")

    def __enter__(self):
        self.calls, self._real = [], {name: getattr(dist, name) for name in self.NAMES}

        def counting(name):
            def call(*args, **kwargs):
                tensor = args[1] if name == "all_gather" else args[0]  # (outputs, input) / (tensor)
                self.calls.append((name, tuple(tensor.shape)))
                return self._real[name](*args, **kwargs)
            return call
        for name in self.NAMES:
            setattr(dist, name, counting(name))
        return self

    def __exit__(self, *exc):
        for name, real in self._real.items():
            setattr(dist, name, real)


def _step_and_evaluate(model, ddp_model, batch: dict) -> dict:
    from processor.evaluator import evaluate
    with _CountCollectives() as forward_collectives:
        losses = ddp_model(batch)
    sum(losses.values()).backward()
    cpu = torch.device("cpu")
    return {
        "losses": {k: v.detach() for k, v in losses.items()},
        "forward_collectives": forward_collectives.calls,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        # 7 images / 11 captions split unevenly; 1 image leaves rank 1 an empty shard.
        "eval": evaluate(model, *_eval_loaders(7, 11), cpu, i2t=True, audit_samples=5),
        "eval_tiny": evaluate(model, *_eval_loaders(1, 3), cpu),
    }


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        model = _tiny_model()
        b = BATCH // world_size
        local = {k: v[rank * b:(rank + 1) * b] for k, v in _global_batch().items()}
        out = _step_and_evaluate(model, DistributedDataParallel(model), local)
        # Rows of different counts (rank 0 has none, and a shape-less empty tensor).
        rows = torch.zeros(0) if rank == 0 else torch.full((3, 2), float(rank))
        out["rows"] = comm.all_gather_rows(rows)
        out["any_rank"] = torch.tensor(comm.any_rank(rank == 1, False, rank == 0))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _scaled_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the tensor's scale (float32 sums of terms up to ~1e2)."""
    return _max_diff(got, want) / max(1.0, want.abs().max().item())


def _assert_same_eval(got: dict, want: dict) -> None:
    assert got["num_queries"] == want["num_queries"]
    assert got["num_gallery"] == want["num_gallery"]
    for task in ("t2i", "i2t"):
        assert (task in got) == (task in want)
        if task in want:
            assert got[task] == pytest.approx(want[task], abs=1e-4), task
    assert got["experts"] == want["experts"]
    assert (got.get("audit") or {}).get("samples") == (want.get("audit") or {}).get("samples")
    assert "audit" not in got or got["audit"]["passed"]


def test_two_ranks_match_one_process(tmp_path):
    """2 ranks x 4 samples == 1 process x 8 samples: losses, gradients, evaluation."""
    ctx = mp.spawn(_worker, args=(WORLD_SIZE, str(tmp_path / "store"), str(tmp_path)),
                   nprocs=WORLD_SIZE, join=True)
    assert ctx is None
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    for out in ranks:  # host flags OR-ed over the ranks
        assert out.pop("any_rank").tolist() == [True, False, True]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _tiny_model()
        ref = _step_and_evaluate(model, model, _global_batch())
    finally:
        torch.set_num_threads(threads)

    # Three collectives in the forward: the image and text features (4 samples a rank,
    # width 32) in one all-gather, the identities, and the routing statistics of every
    # MoE layer (2 layers x 2 modalities, 4 experts: 2E + 1 values each) in one all-reduce.
    assert ref["forward_collectives"] == []
    for out in ranks:
        assert out["forward_collectives"] == [("all_gather", (4, 2, 32)), ("all_gather", (4,)),
                                              ("all_reduce", (4, 9))]
    assert set(ranks[0]["losses"]) == set(GATHERED_TERMS + LOCAL_TERMS)
    for out in ranks:
        for term in GATHERED_TERMS:
            assert _max_diff(out["losses"][term], ref["losses"][term]) <= 1e-5, term
    for term in LOCAL_TERMS:
        mean = sum(out["losses"][term] for out in ranks) / WORLD_SIZE
        assert _max_diff(mean, ref["losses"][term]) <= 1e-5, term

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ref["grads"]) == trainable
    for out in ranks:
        assert set(out["grads"]) == trainable
        worst = max(_scaled_diff(out["grads"][n], ref["grads"][n]) for n in trainable)
        assert worst <= 1e-5, worst
    # The check has teeth: the gradients are far from zero.
    assert max(ref["grads"][n].abs().max().item() for n in trainable) > 1e-2

    for out in ranks:
        _assert_same_eval(out["eval"], ref["eval"])
        _assert_same_eval(out["eval_tiny"], ref["eval_tiny"])
        assert torch.equal(out["rows"], torch.ones(3, 2))


def _compiled_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        b = BATCH // world_size
        local = {k: v[rank * b:(rank + 1) * b] for k, v in _global_batch().items()}
        results = []
        for compiled in (False, True):
            model = _tiny_model()
            ddp_model = DistributedDataParallel(model)
            if compiled:  # AOTAutograd traces forward and backward; no code generation
                ddp_model = torch.compile(ddp_model, backend="aot_eager")
            losses = ddp_model(local)
            sum(losses.values()).backward()
            results.append(({k: v.detach() for k, v in losses.items()},
                            {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}))
        torch.save(results, os.path.join(out_dir, f"compiled{rank}.pt"))
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()


def test_two_ranks_compiled_match_eager(tmp_path):
    """torchrun with solver.compile: DDP's compiled forward and backward, collectives
    of the losses included, give the eager losses and gradients."""
    mp.spawn(_compiled_worker, args=(WORLD_SIZE, str(tmp_path / "store"), str(tmp_path)),
             nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        (eager_losses, eager_grads), (losses, grads) = torch.load(tmp_path / f"compiled{rank}.pt",
                                                                  weights_only=True)
        assert losses.keys() == eager_losses.keys()
        for key in losses:
            assert _max_diff(losses[key], eager_losses[key]) <= 1e-5, key
        assert grads.keys() == eager_grads.keys() and len(grads) > 80
        assert max(_scaled_diff(grads[n], eager_grads[n]) for n in grads) <= 1e-5


def test_single_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    comm.init_distributed(torch.device("cpu"))
    assert not comm.is_dist() and comm.get_world_size() == 1 and comm.is_main_process()
    x = torch.arange(6).view(3, 2)
    assert comm.all_gather_rows(x) is x
    assert comm.all_gather_object("a") == ["a"] and comm.broadcast_object("a") == "a"
    assert comm.backend_for(torch.device("cpu")) == "gloo"
    assert comm.backend_for(torch.device("cuda", 0)) == "nccl"


@pytest.mark.parametrize("num_items,world_size", [(7, 2), (11, 3), (1, 2), (0, 2), (64, 8)])
def test_shards_cover_items_in_order(num_items, world_size):
    bounds = [comm.shard_bounds(num_items, r, world_size) for r in range(world_size)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(num_items))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def _train_command(synth_root, out, name: str, nproc: int) -> list[str]:
    # Expert dropout off: the one- and two-process runs then follow the same function.
    # ID is a per-rank loss: the log must still show the whole batch's value.
    overrides = tiny_overrides(synth_root, out, name) + ["eval.i2t=true", "moe.expert_dropout=0",
                                                          "loss.names=sdm+itc+coar+id"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    return [*launcher, str(ROOT / "train.py"), "--config_file", CONFIG, *overrides]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _logged_values(log: str) -> list[tuple[str, list[float]]]:
    """(line prefix, numbers) of every step line and metrics-table row of a train.log."""
    out = []
    for line in log.splitlines():
        if line.startswith(("| t2i ", "| i2t ")):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            out.append((cells[0], [float(cell) for cell in cells[1:]]))
        elif re.search(r"\] step \d+ lr ", line):
            text = line.split("INFO: ", 1)[1]
            head, _, tail = text.partition(" step ")
            values = [float(part.split("=")[1]) for part in tail.split() if "=" in part]
            out.append((head + " step " + tail.split()[0], values))
    return out


def test_torchrun_two_processes_write_one_run_that_test_py_reproduces(synth_root, tmp_path):
    out = tmp_path / "out"
    proc = _run(_train_command(synth_root, out, "ddp", nproc=WORLD_SIZE))

    run = out / "CUHK-PEDES" / "ddp"
    assert [p for p in out.rglob("configs.yaml")] == [run / "configs.yaml"]
    assert sorted(p.name for p in run.iterdir()) == [
        "best.pth", "configs.yaml", "last.pth", "tb", "test_metrics.json", "train.log"]
    assert len([p for p in (run / "tb").iterdir() if p.name.startswith("events")]) == 1
    log = (run / "train.log").read_text()
    assert log.count("run folder:") == 1 and "processes: 2" in log
    assert log.count("test results of") == 1
    assert proc.stdout.count("test results of") == 1  # rank 1 prints nothing
    for name in ("best.pth", "last.pth"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert not any(k.startswith("module.") for k in ckpt["model"]), name
    # last.pth keeps each rank's random state (own dropout and MLM masks), rank 0's as "rng".
    states = ckpt["rng_ranks"]
    assert len(states) == WORLD_SIZE and torch.equal(ckpt["rng"]["torch"], states[0]["torch"])
    assert not torch.equal(states[0]["torch"], states[1]["torch"])

    # test.py, one process, on the saved config: the sharded evaluation's numbers.
    saved = json.loads((run / "test_metrics.json").read_text())
    again = test_script.main(["--config_file", str(run / "configs.yaml"), "eval.i2t=true"])
    _assert_same_eval(again, saved)
    assert saved["num_queries"] == 2 * saved["num_gallery"]

    # One process with the whole batch logs the same losses and validation metrics.
    _run(_train_command(synth_root, out, "single", nproc=1))
    ddp_values = _logged_values(log)
    single_values = _logged_values((out / "CUHK-PEDES" / "single" / "train.log").read_text())
    assert [head for head, _ in ddp_values] == [head for head, _ in single_values]
    assert len(ddp_values) >= 10
    for (head, got), (_, want) in zip(ddp_values, single_values):
        assert got == pytest.approx(want, abs=2e-3), head
