"""Shared fixtures: a small generated dataset and tiny-model config overrides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Without a usable GPU, an exported CUDA_VISIBLE_DEVICES=0 makes device=auto refuse to
# start (utils.misc.resolve_device); here it would only stop the tests, and every
# process they start inherits this environment. tests/test_device.py sets it itself.
if not torch.cuda.is_available():
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)

# A CLIP small enough to train for a few steps on CPU in seconds.
TINY_MODEL = [
    "model.pretrain=none", "model.stride=16", "input.size=[32,16]", "input.padding=2",
    "model.arch={embed_dim: 32, patch_size: 16, vision_width: 32, vision_layers: 1, "
    "vision_heads: 2, text_width: 32, text_layers: 1, text_heads: 2, context_length: 24}",
    "dataset.text_length=24", "moe.layers=1", "moe.heads=2", "moe.reduction=4",
]


@pytest.fixture(autouse=True)
def _close_logging():
    """Each test starts without the console handler a previous run installed: it would
    still write to that test's (by then closed) captured stdout."""
    yield
    from utils.logger import close_logger
    close_logger()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A generated CUHK-PEDES-format dataset of 16 identities."""
    from datasets.synth import generate
    root = tmp_path_factory.mktemp("synth")
    generate(str(root), "cuhk", num_ids=16, seed=0)
    return root


def tiny_overrides(synth_root: Path, out_dir: Path, name: str = "tiny") -> list[str]:
    return TINY_MODEL + [
        f"dataset.root_dir={synth_root}", f"output_dir={out_dir}", f"name={name}",
        "dataset.num_workers=0", "solver.batch_size=8", "solver.num_epoch=2",
        "solver.lr=1e-3", "solver.warmup_epochs=0", "solver.log_period=2", "eval.batch_size=16",
        "device=cpu",
    ]
