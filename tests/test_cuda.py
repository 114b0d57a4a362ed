"""CUDA paths: skipped without a GPU (CI has none); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``."""
from __future__ import annotations

import pytest
import torch

import test as test_script
import train as train_script
from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CONFIG = str(ROOT / "configs" / "demo.yaml")


def cuda_overrides(synth_root, tmp_path, name="tiny"):
    return [o for o in tiny_overrides(synth_root, tmp_path, name) if o != "device=cpu"] + ["device=cuda"]


@pytest.mark.parametrize("precision,cache,losses", [
    ("fp32", False, "sdm+itc+coar"), ("bf16", False, "sdm+itc+coar"), ("fp16", False, "sdm+itc+coar"),
    ("fp32", True, "sdm+itc+coar"), ("bf16", True, "sdm+itc+coar"), ("fp16", True, "sdm+itc+coar"),
    ("bf16", False, "sdm+itc+coar+mlm+id+cmpm")])
def test_training_step_never_waits_for_the_gpu(synth_root, tmp_path, monkeypatch, precision, cache,
                                               losses):
    """Every Trainer._step runs under torch.cuda's sync debug mode "error": any host-device
    sync (an .item(), a data-dependent shape, a blocking copy back) raises."""
    from processor.trainer import Trainer
    original_step = Trainer._step
    steps = []

    def strict(self, batch):
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = original_step(self, batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        steps.append(self.skip_on_device)
        return result
    monkeypatch.setattr(Trainer, "_step", strict)
    extra = [f"dataset.image_cache={str(cache).lower()}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    train_script.main(["--config_file", CONFIG, *cuda_overrides(synth_root, tmp_path),
                       f"solver.precision={precision}", "solver.grad_clip=1.0",
                       f"loss.names={losses}", "model.cmt_depth=1",
                       "solver.num_epoch=1", "eval.period=5", "dataset.pin_memory=true", *extra])
    assert steps and all(steps)  # fused AdamW by default on CUDA


def test_cuda_run_trains_tests_and_its_checkpoint_evaluates_on_cpu(synth_root, tmp_path):
    result = train_script.main(["--config_file", CONFIG, *cuda_overrides(synth_root, tmp_path),
                                "solver.precision=bf16"])
    assert 0 <= result["t2i"]["R1"] <= 100
    run = tmp_path / "CUHK-PEDES" / "tiny"
    on_cpu = test_script.main(["--config_file", str(run / "configs.yaml"), "device=cpu",
                               "solver.precision=fp32"])
    # bf16 autocast on the GPU vs fp32 on the CPU: close, not identical.
    assert abs(on_cpu["t2i"]["mAP"] - result["t2i"]["mAP"]) < 5.0


def test_batch_augment_on_cuda_matches_cpu():
    from datasets.cache import BatchAugment
    from datasets.transforms import ImageAugment
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 64, 32), dtype=torch.uint8, generator=g)
    seeds = torch.randint(0, 2**62, (16,), generator=g)
    augment = BatchAugment((64, 32), ImageAugment(padding=4))
    expected = augment(images, seeds)
    actual = augment(images.cuda(), seeds.cuda()).cpu()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
