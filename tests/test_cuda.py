"""CUDA paths: skipped without a GPU (CI has none); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``."""
from __future__ import annotations

import re

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


def _steps_losses(tmp_path, compile_mode: str | None, accumulation: int, batches: list,
                  device: str = "cuda") -> tuple[list[float], dict]:
    """Loss of each Trainer._step over `batches`, eager or compiled with `compile_mode`,
    and the gradients the first step hands to the optimizer."""
    from conftest import TINY_MODEL
    from model import build_model
    from processor.runner import compile_training_model, configure_backends
    from processor.trainer import Trainer
    from solver import build_scheduler, optimizer_from_config
    from utils.config import load_config
    cfg = load_config(CONFIG, TINY_MODEL + [
        f"device={device}", "moe.dropout=0", "moe.expert_dropout=0", "solver.batch_size=8",
        f"solver.accumulation_steps={accumulation}", "solver.lr=1e-4",
        f"solver.compile={str(compile_mode is not None).lower()}",
        f"solver.compile_mode={compile_mode or 'default'}"])
    configure_backends(cfg)
    torch.manual_seed(0)
    device = torch.device(device)
    model = build_model(cfg).to(device).train()
    optimizer = optimizer_from_config(model, cfg.solver)
    scheduler = build_scheduler(optimizer, steps_per_epoch=100, num_epoch=1, warmup_epochs=0,
                                warmup_factor=1.0, min_lr_factor=1.0)
    compile_training_model(model, cfg)
    trainer = Trainer(cfg, model, None, None, optimizer, scheduler, None, device, tmp_path)
    first_grads = {}
    optimizer_step = trainer._optimizer_step

    def snapshot(finite):
        if not first_grads:
            first_grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                                if p.grad is not None})
        return optimizer_step(finite)
    trainer._optimizer_step = snapshot
    losses = [trainer._step(batch)[0]["loss"].item() for batch in batches]
    return losses, first_grads


@pytest.mark.parametrize("mode,accumulation", [("reduce-overhead", 1), ("default", 2)])
def test_compiled_training_matches_eager(tmp_path, mode, accumulation):
    """solver.compile on CUDA: the step's gradients (accumulated over micro-batches too)
    and the losses of the following steps are the eager ones; with CUDA graphs
    (reduce-overhead) every step replays (no skip) and fresh batches are copied in."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from test_fixed_shapes import _batch
    batches = []
    for seed in range(4):
        batch = _batch()
        g = torch.Generator().manual_seed(seed)
        batch["images"] = torch.randn(batch["images"].shape, generator=g)
        batches.append(batch)
    eager, eager_grads = _steps_losses(tmp_path / "eager", None, accumulation, batches)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled, grads = _steps_losses(tmp_path / "compiled", mode, accumulation, batches)
        skips = counters["inductor"]["cudagraph_skips"]
    finally:
        torch._dynamo.reset()
    assert skips == 0
    assert grads.keys() == eager_grads.keys() and len(grads) > 50
    for name, want in eager_grads.items():
        scale = max(1.0, want.abs().max().item())
        assert (grads[name] - want).abs().max().item() / scale <= 1e-4, name
    assert compiled[0] == pytest.approx(eager[0], rel=1e-4)  # before any update
    assert compiled == pytest.approx(eager, rel=1e-2)
    assert len(set(compiled)) == len(compiled)  # each step saw its own batch


def test_train_py_with_cuda_graphs_trains_validates_and_logs_memory(synth_root, tmp_path):
    """train.py end to end with solver.compile=true and CUDA graphs: training steps
    between validations (uncompiled encoders), checkpoints, then the test split."""
    result = train_script.main(["--config_file", CONFIG, *cuda_overrides(synth_root, tmp_path),
                                "solver.precision=bf16", "solver.compile=true",
                                "solver.compile_mode=reduce-overhead", "eval.period=1"])
    assert 0 <= result["t2i"]["R1"] <= 100
    log = (tmp_path / "CUHK-PEDES" / "tiny" / "train.log").read_text()
    assert len(re.findall(r"validation \(.*\):\n.*\n\| task .*\n.*\n\| t2i ", log)) == 2
    assert "samples/s, " in log and "GiB peak" in log


def test_irra_fp16_weights_train_on_cuda_and_match_the_cpu(synth_root, tmp_path):
    """IRRA's legacy fp16 weights (configs/*/irra.yaml) on the GPU: one batch's losses are
    the CPU's up to fp16 rounding, and train.py trains and tests with them."""
    from conftest import TINY_MODEL
    from model import build_model
    from utils.config import load_config
    irra = ROOT / "configs" / "CUHK-PEDES" / "irra.yaml"
    # SDM + ID on clean captions: MLM masks come from each device's own generator.
    cfg = load_config(irra, TINY_MODEL + ["loss.names=sdm+id", "loss.mlm_masks_captions=false"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4)
    ids = torch.zeros(4, cfg.dataset.text_length, dtype=torch.long)
    ids[:, 0], ids[:, 1:6], ids[:, 6] = 49406, torch.randint(1, 40000, (4, 5)), 49407
    batch = {"images": torch.randn(4, 3, *cfg.input.size), "caption_ids": ids,
             "pids": torch.tensor([0, 0, 1, 2])}
    on_cpu = model(batch)
    on_gpu = model.cuda()({k: v.cuda() for k, v in batch.items()})
    assert model.backbone.visual.conv1.weight.dtype == torch.float16
    for key, value in on_cpu.items():
        assert on_gpu[key].item() == pytest.approx(value.item(), rel=1e-2), key
    result = train_script.main(["--config_file", str(irra), *cuda_overrides(synth_root, tmp_path),
                                "model.cmt_depth=1", "solver.num_epoch=1"])
    assert 0 <= result["t2i"]["R1"] <= 100


@pytest.fixture(scope="module")
def vit_b16_comoe():
    """A CoMoE ViT-B/16 on the GPU: random weights, experts switched on."""
    from model import build_model
    from utils.config import load_config
    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.pretrain=none", "input.size=[384,128]"])).cuda()
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if "expert_pool.up" in name:
                p.normal_(0.0, 0.02)
    return model


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("fp32", True), ("bf16", True),
                                            ("fp16", True)])
def test_leak_audit_tolerances_hold_the_gpu_rounding_at_vit_b16_size(vit_b16_comoe, monkeypatch,
                                                                      precision, tf32):
    """Samples embedded alone and in other batches stay within the audit's tolerance for
    the arithmetic; a failure's message gives the measured differences."""
    from processor.evaluator import evaluate
    from utils.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    g = torch.Generator().manual_seed(1)
    images = [{"images": torch.randn(3, 384, 128, generator=g), "pids": i % 4} for i in range(24)]
    captions = []
    for i in range(24):
        ids = torch.zeros(77, dtype=torch.long)
        words = 5 + 2 * i
        ids[0], ids[words + 1] = SOT_TOKEN_ID, EOT_TOKEN_ID
        ids[1:words + 1] = torch.randint(1, 40000, (words,), generator=g)
        captions.append({"caption_ids": ids, "pids": i % 4})
    loaders = [torch.utils.data.DataLoader(items, batch_size=16) for items in (images, captions)]
    result = evaluate(vit_b16_comoe, *loaders, torch.device("cuda"), precision, audit_samples=24)
    assert result["audit"]["passed"] and result["audit"]["samples"] == {"text": 24, "image": 24}
    assert result["audit"]["arithmetic"] == ("tf32" if precision == "fp32" and tf32 else precision)
