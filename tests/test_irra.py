"""IRRA's recipe, exactly: the facts of IRRA's code (run_irra.sh, solver/build.py,
solver/lr_scheduler.py, model/clip_model.py convert_weights, datasets/bases.py) pinned
on tiny models, and IRRA checkpoints scored through test.py."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

import test as test_script
import train as train_script
from conftest import ROOT, TINY_MODEL, tiny_overrides
from model import build_model
from model.clip_model import CLIP, CheckpointMismatchError, QuickGELU, build_clip
from model.mlm import IGNORE_INDEX, MLMHead, mask_caption_tokens
from model.objectives import id_logits, id_loss, sdm_loss
from solver import build_scheduler, optimizer_from_config
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, load_config
from utils.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID

IRRA_CONFIG = ROOT / "configs" / "CUHK-PEDES" / "irra.yaml"
AUTHORS_CONFIG = ROOT / "configs" / "CUHK-PEDES" / "comoe_authors.yaml"
LR, WD = 1e-5, 4e-5


def _cfg(path=IRRA_CONFIG, *extra: str):
    return load_config(path, TINY_MODEL + ["model.cmt_depth=1", "device=cpu", *extra])


def _batch(cfg, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.input.size
    ids = torch.zeros(n, cfg.dataset.text_length, dtype=torch.long)
    for i in range(n):
        length = 4 + 2 * i
        ids[i, 0] = SOT_TOKEN_ID
        ids[i, 1:length] = torch.randint(1, 40000, (length - 1,), generator=g)
        ids[i, length] = EOT_TOKEN_ID
    return {"images": torch.randn(n, 3, h, w, generator=g), "caption_ids": ids,
            "pids": torch.tensor([0, 0, 1, 2][:n])}


def _lr_and_decay(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


# -- optimizer: IRRA's per-parameter rules ----------------------------------------

def _irra_rule_by_hand(name: str) -> tuple[float, float]:
    """(lr factor, weight decay) IRRA's build_optimizer gives the parameter of IRRA's
    model that this codebase calls `name`: "cross" -> x5; "bias" -> x2 and no decay,
    replacing; "classifier" / "mlm_head" -> x5, replacing. IRRA's model keeps
    ln_pre_t, ln_pre_i and ln_post outside its mlm_head, and its cross-modal
    transformer is called cross_modal_transformer."""
    bias = name.endswith("bias")  # in_proj_bias included
    part = name.removeprefix("mlm_head.").split(".")[0]
    if name.startswith("backbone.") or part in ("ln_pre_t", "ln_pre_i", "ln_post"):
        return (2.0, 0.0) if bias else (1.0, WD)
    if part in ("cross_attn", "blocks"):
        return (2.0, 0.0) if bias else (5.0, WD)
    return (5.0, 0.0) if bias else (5.0, WD)  # classifier, and IRRA's mlm_head: dense, ln, fc


def test_irra_rules_give_every_parameter_irras_lr_and_decay():
    cfg = _cfg()
    model = build_model(cfg, num_classes=5)
    got = _lr_and_decay(optimizer_from_config(model, cfg.solver))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(got) == len(trainable)
    for name, param in trainable:
        factor, decay = _irra_rule_by_hand(name)
        assert got[id(param)] == (pytest.approx(LR * factor), decay), name
    named = dict(trainable)
    # The facts where this codebase's own rules differ from IRRA's:
    assert got[id(named["backbone.transformer.resblocks.0.attn.in_proj_bias"])] == (
        pytest.approx(2 * LR), 0.0)                                       # a bias
    assert got[id(named["backbone.token_embedding.weight"])][1] == WD    # embeddings decay
    assert got[id(named["backbone.ln_final.weight"])][1] == WD           # norms decay
    assert got[id(named["classifier.bias"])] == (pytest.approx(5 * LR), 0.0)  # not 5 x 2
    assert got[id(named["mlm_head.ln_pre_t.weight"])][0] == pytest.approx(LR)


def test_module_lr_factors_under_irra_rules_give_the_authors_moe_and_head_factors():
    cfg = _cfg(AUTHORS_CONFIG)
    model = build_model(cfg)
    got = _lr_and_decay(optimizer_from_config(model, cfg.solver))
    lr = cfg.solver.lr
    assert lr == pytest.approx(3e-6)
    moe = [n for n, _ in model.named_parameters() if n.startswith("head.blocks.0.moe.")]
    assert moe and any("expert" in n for n in moe)
    for name, param in model.named_parameters():
        if not name.startswith("head."):
            continue
        if name.endswith("bias"):
            expected = (pytest.approx(2 * lr), 0.0)  # IRRA's bias rule, in and out of the MoE
        elif name in moe:
            expected = (pytest.approx(2 * lr), WD)
        else:
            expected = (pytest.approx(lr), WD)
        assert got[id(param)] == expected, name


def test_module_lr_factors_patterns_are_checked():
    model = build_model(_cfg(AUTHORS_CONFIG))
    cfg = _cfg(AUTHORS_CONFIG, "solver.module_lr_factors={head.blocks.*.moee: 2.0}")
    with pytest.raises(ConfigError, match=r"'head\.blocks\.\*\.moee'"):
        optimizer_from_config(model, cfg.solver)
    with pytest.raises(ConfigError, match="solver.module_lr_factors"):
        _cfg(AUTHORS_CONFIG, "solver.module_lr_factors={head: fast}")


# -- schedule: per epoch ----------------------------------------------------------

def _irra_multiplier(epoch: int) -> float:
    """IRRA's LRSchedulerWithWarmup (cosine, 5 linear warm-up epochs from 0.1, 60
    epochs, target 0) at its `last_epoch` = epoch."""
    if epoch < 5:
        return 0.1 + 0.9 * epoch / 5
    return 0.5 * (1 + math.cos(math.pi * (epoch - 5) / 55))


def test_per_epoch_schedule_gives_every_group_irras_lr_at_every_epoch():
    cfg = _cfg()
    optimizer = optimizer_from_config(build_model(cfg, num_classes=5), cfg.solver)
    base = [g["lr"] for g in optimizer.param_groups]
    assert len(base) >= 4 and base == [g["base_lr"] for g in optimizer.param_groups]
    steps_per_epoch = 3
    schedule = build_scheduler(optimizer, steps_per_epoch=steps_per_epoch, num_epoch=60,
                               warmup_epochs=5, warmup_factor=0.1, min_lr_factor=0.0,
                               per_epoch=cfg.solver.lr_update == "epoch")
    for epoch in range(61):
        for _ in range(steps_per_epoch):  # the same lr on every step of an epoch
            for group, lr in zip(optimizer.param_groups, base):
                assert group["lr"] == pytest.approx(lr * _irra_multiplier(epoch), rel=1e-12,
                                                    abs=1e-20), epoch
            schedule.step()
    assert _irra_multiplier(1) == pytest.approx(0.28) and _irra_multiplier(60) == pytest.approx(0)


# -- fp16 weights -------------------------------------------------------------------

def _stays_fp32(model: nn.Module) -> set[str]:
    """Parameters IRRA's convert_weights leaves in fp32: all but those of linear and
    convolution layers, the packed attention projection (in_proj_weight / _bias) and
    CLIP's output projections; here the experts (linear layers in the authors' code)
    are cast too."""
    from model.moe import ExpertPool
    experts = {f"{module_name}.{name}" for module_name, module in model.named_modules()
               if isinstance(module, ExpertPool) for name, _ in module.named_parameters()}
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            cast = isinstance(module, (nn.Linear, nn.Conv2d)) or full in experts or name in (
                "in_proj_weight", "in_proj_bias", "proj", "text_projection")
            if not cast:
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


@pytest.mark.parametrize("config", [IRRA_CONFIG, AUTHORS_CONFIG], ids=["irra", "comoe_authors"])
def test_fp16_weights_cast_what_irra_casts_and_the_model_runs_in_fp16(config):
    cfg = _cfg(config)
    model = build_model(cfg, num_classes=5)
    fp32 = _stays_fp32(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {n for n, d in dtypes.items() if d == torch.float32} == fp32
    assert all(d == torch.float16 for n, d in dtypes.items() if n not in fp32)
    assert {"backbone.ln_final.weight", "backbone.token_embedding.weight",
            "backbone.visual.positional_embedding", "backbone.visual.class_embedding"} <= fp32
    assert "backbone.visual.proj" not in fp32 and "backbone.text_projection" not in fp32
    batch = _batch(cfg)
    losses = model(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        if param.requires_grad and name != "backbone.logit_scale":
            assert param.grad is not None and param.grad.dtype == param.dtype, name
    with torch.no_grad():
        tokens, _ = model.backbone.encode_image(batch["images"])
    assert tokens.dtype == torch.float16


def test_fp16_adam_step_matches_a_hand_written_fp16_reference():
    """IRRA's update: torch's Adam on fp16 parameters, eps 1e-3, weight decay added to
    the gradient (L2), moments kept in the parameter's dtype; each operation computes in
    fp32 and rounds its result to that dtype."""
    cfg = _cfg(IRRA_CONFIG, "solver.lr=1e-2", "solver.weight_decay=0.5")
    model = build_model(cfg, num_classes=5)
    optimizer = optimizer_from_config(model, cfg.solver)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["eps"] == 1e-3
    settings = _lr_and_decay(optimizer)
    g = torch.Generator().manual_seed(0)
    before, grads = {}, {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            # Small gradients, where eps = 1e-3 shapes the update.
            param.grad = (1e-4 * torch.randn(param.shape, generator=g)).to(param.dtype)
            before[name], grads[name] = param.detach().clone(), param.grad.clone()
    optimizer.step()
    beta1, beta2, eps = 0.9, 0.999, 1e-3
    checked = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, decay = settings[id(param)]

        def rounded(x: torch.Tensor) -> torch.Tensor:  # one operation's result
            return x.to(param.dtype).float()
        p, grad = before[name].float(), grads[name].float()
        grad = rounded(grad + decay * p)  # L2: the decay joins the gradient
        exp_avg = rounded((1 - beta1) * grad)
        # Often subnormal in fp16 (0.001 * g^2): the reason for IRRA's eps of 1e-3.
        exp_avg_sq = rounded((1 - beta2) * grad * grad)
        denom = rounded(rounded(rounded(exp_avg_sq.sqrt()) / math.sqrt(1 - beta2)) + eps)
        expected = rounded(p - lr / (1 - beta1) * (exp_avg / denom))
        assert param.dtype == optimizer.state[param]["exp_avg"].dtype, name
        # Bit for bit in fp16; fp32 parameters round in another order: a few ulps.
        ulps = 0.0 if param.dtype == torch.float16 else 4 * torch.finfo(param.dtype).eps
        assert ((param.detach().float() - expected).abs() <= ulps * (expected.abs() + lr)).all(), name
        assert not torch.equal(param.detach().float(), p), name
        checked += param.dtype == torch.float16
    assert checked > 10


def test_fp16_weights_are_refused_with_autocast_and_the_fused_kernel():
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=f"solver.fp16_weights.*precision={precision}.*autocast"):
            _cfg(IRRA_CONFIG, f"solver.precision={precision}")
    with pytest.raises(ConfigError, match="optimizer_kernel=fused"):
        _cfg(IRRA_CONFIG, "solver.optimizer_kernel=fused")
    with pytest.raises(ConfigError, match="loss.mlm_masks_captions"):
        _cfg(IRRA_CONFIG, "loss.names=sdm+id")


def test_fp16_weights_train_resume_test_and_skip_non_finite_steps(synth_root, tmp_path,
                                                                  monkeypatch):
    """IRRA's configuration through train.py and test.py: fp16 checkpoints with fp16
    Adam state, a resume that continues bit for bit, and the non-finite-step machinery."""
    overrides = tiny_overrides(synth_root, tmp_path, "full") + ["model.cmt_depth=1",
                                                                "solver.lr=1e-3"]
    full = train_script.main(["--config_file", str(IRRA_CONFIG), *overrides])
    run = tmp_path / "CUHK-PEDES" / "full"
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["model"]["backbone.visual.conv1.weight"].dtype == torch.float16
    assert ckpt["model"]["backbone.ln_final.weight"].dtype == torch.float32
    assert {s["exp_avg"].dtype for s in ckpt["optimizer"]["state"].values()} == {
        torch.float16, torch.float32}
    again = test_script.main(["--config_file", str(run / "configs.yaml")])
    assert again["t2i"] == pytest.approx(full["t2i"], abs=1e-6)

    # Crash right after the first epoch's last.pth, then resume.
    from processor.trainer import Trainer
    original_save = Trainer.save

    class Crash(Exception):
        pass

    def save_then_crash(self, name, state=None):
        path = original_save(self, name, state)
        if name == "last.pth" and self.epoch == 1:
            raise Crash
        return path
    monkeypatch.setattr(Trainer, "save", save_then_crash)
    resumed_overrides = tiny_overrides(synth_root, tmp_path, "resumed") + [
        "model.cmt_depth=1", "solver.lr=1e-3"]
    with pytest.raises(Crash):
        train_script.main(["--config_file", str(IRRA_CONFIG), *resumed_overrides])
    monkeypatch.setattr(Trainer, "save", original_save)
    resumed_run = tmp_path / "CUHK-PEDES" / "resumed"
    train_script.main(["--config_file", str(resumed_run / "configs.yaml"), "resume=true"])
    expected, actual = ckpt["model"], load_checkpoint(resumed_run / "last.pth")["model"]
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    # A step whose loss is non-finite makes no update to the fp16 weights.
    from model.build import RetrievalModel
    original_forward = RetrievalModel.forward
    seen = []

    def forward(self, batch, **kwargs):
        seen.append(self.backbone.visual.proj.detach().clone())
        out = original_forward(self, batch, **kwargs)
        losses = out[0] if isinstance(out, tuple) else out
        if len(seen) == 2:
            losses["sdm"] = losses["sdm"] * float("inf")
        return out
    monkeypatch.setattr(RetrievalModel, "forward", forward)
    train_script.main(["--config_file", str(IRRA_CONFIG),
                       *tiny_overrides(synth_root, tmp_path, "nonfinite"), "model.cmt_depth=1",
                       "solver.lr=1e-2", "solver.num_epoch=1", "solver.max_nonfinite_steps=1"])
    assert seen[0].dtype == torch.float16
    assert torch.equal(seen[1], seen[2]) and not torch.equal(seen[2], seen[-1])
    assert load_checkpoint(tmp_path / "CUHK-PEDES" / "nonfinite" / "last.pth")[
        "nonfinite_steps"] == 1


# -- data and MLM -------------------------------------------------------------------

def test_bilinear_resize_equals_torchvision_resize():
    from datasets.cache import decode_resized
    from datasets.transforms import CLIP_MEAN, CLIP_STD, ImageAugment, build_eval_transform, \
        build_train_transform
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 41, 3), dtype=np.uint8))
    irra_eval = T.Compose([T.Resize((32, 16)), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    expected = irra_eval(image)
    assert torch.equal(build_eval_transform((32, 16), interpolation="bilinear")(image), expected)
    assert not torch.allclose(build_eval_transform((32, 16))(image), expected, atol=1e-2)
    still = ImageAugment(flip=False, padding=0, erasing=0.0)
    assert torch.equal(build_train_transform((32, 16), still, "bilinear")(image), expected)


def test_bilinear_resize_in_the_image_cache_and_of_the_position_embedding(tmp_path):
    from datasets.cache import decode_resized
    rng = np.random.default_rng(1)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (97, 41, 3), dtype=np.uint8)).save(path)
    expected = np.asarray(T.Resize((32, 16))(Image.open(path).convert("RGB"))).transpose(2, 0, 1)
    assert np.array_equal(decode_resized(str(path), (32, 16), "bilinear"), expected)

    # A 3x3 grid resized to 2x1 without corner alignment samples rows 0.25 and 1.75 of
    # column 1: bilinear weights 3/4, 1/4 and 1/4, 3/4.
    arch = dict(embed_dim=32, patch_size=16, vision_width=32, vision_layers=1, vision_heads=2,
                text_width=32, text_layers=1, text_heads=2, context_length=24)
    source = CLIP(image_size=(48, 48), **arch)
    torch.save(source.state_dict(), tmp_path / "clip.pt")
    grid = source.visual.positional_embedding.detach()[1:].reshape(3, 3, -1)
    model = build_clip(tmp_path / "clip.pt", image_size=(32, 16), interpolation="bilinear",
                       vision_heads=2, text_heads=2)
    resized = model.visual.positional_embedding.detach()
    torch.testing.assert_close(resized[1], 0.75 * grid[0, 1] + 0.25 * grid[1, 1])
    torch.testing.assert_close(resized[2], 0.25 * grid[1, 1] + 0.75 * grid[2, 1])
    torch.testing.assert_close(resized[0], source.visual.positional_embedding.detach()[0])


@pytest.mark.parametrize("on", [True, False], ids=["masked", "clean"])
def test_sdm_and_id_read_the_masked_captions_only_when_asked(on):
    cfg = _cfg(IRRA_CONFIG, f"loss.mlm_masks_captions={str(on).lower()}")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5)
    batch = _batch(cfg)
    seen = {}
    encode, mlm = model.text_features, model._mlm

    def text_features(caption_ids):
        seen["text"] = caption_ids
        return encode(caption_ids)

    def masked_lm(masked_ids, labels, image_tokens):
        seen["mlm"] = masked_ids
        return mlm(masked_ids, labels, image_tokens)
    model.text_features, model._mlm = text_features, masked_lm
    losses = model(batch)
    assert not torch.equal(seen["mlm"], batch["caption_ids"])
    fed = seen["mlm"] if on else batch["caption_ids"]
    assert torch.equal(seen["text"], fed)
    with torch.no_grad():
        image_feats = model.encode_image(batch["images"])
        text_feats = encode(fed)[0]
        assert losses["sdm"].item() == pytest.approx(
            sdm_loss(image_feats, text_feats, batch["pids"], model.logit_scale).item(), rel=1e-5)
        assert losses["id"].item() == pytest.approx(
            id_loss(*id_logits(model.classifier, image_feats, text_feats),
                    batch["pids"]).item(), rel=1e-5)


def test_mlm_fallback_first_masks_position_one_like_irra():
    ids = torch.tensor([[SOT_TOKEN_ID, 11, 12, 13, EOT_TOKEN_ID, 0],
                        [SOT_TOKEN_ID, EOT_TOKEN_ID, 0, 0, 0, 0]])  # a caption, an empty one
    nothing_drawn = dict(select_prob=1e-12, mask_prob=0.0, random_prob=0.0)
    masked, labels = mask_caption_tokens(ids, torch.Generator().manual_seed(0), fallback="first",
                                         **nothing_drawn)
    assert (masked[:, 1] == MASK_TOKEN_ID).all()  # the mask token whatever mask_prob says
    assert labels[:, 1].tolist() == [11, EOT_TOKEN_ID]  # IRRA labels whatever sits there
    assert (labels[:, [0, 2, 3, 4, 5]] == IGNORE_INDEX).all()
    assert torch.equal(masked[:, 2:], ids[:, 2:])
    # The default draws one random word instead, by the 80/10/10 rule, and leaves a
    # caption without words alone.
    many = ids[:1].repeat(200, 1)
    masked, labels = mask_caption_tokens(many, torch.Generator().manual_seed(0), **nothing_drawn)
    picked = (labels != IGNORE_INDEX).nonzero()[:, 1]
    assert len(picked) == 200 and set(picked.tolist()) == {1, 2, 3}
    assert torch.equal(masked, many)  # mask_prob = random_prob = 0: kept
    _, labels = mask_caption_tokens(ids[1:], torch.Generator().manual_seed(0), **nothing_drawn)
    assert (labels == IGNORE_INDEX).all()


def test_irra_cross_modal_blocks():
    torch.manual_seed(0)
    heads = {style: MLMHead(32, vocab_size=50, heads=2, cmt_depth=2, style=style)
             for style in ("project", "irra")}
    irra = heads["irra"]
    assert all(isinstance(block.mlp.act, QuickGELU) for block in irra.blocks)
    assert all(isinstance(block.mlp.act, nn.GELU) for block in heads["project"].blocks)
    for linear in [irra.dense, irra.fc] + [l for b in irra.blocks for l in (b.mlp.fc1, b.mlp.fc2)]:
        bound = linear.in_features ** -0.5
        assert linear.bias.abs().max() <= bound and linear.bias.abs().max() > bound / 4
    for linear in [irra.cross_attn.q, irra.cross_attn.kv, irra.cross_attn.proj] + [
            l for b in irra.blocks for l in (b.attn.qkv, b.attn.proj)]:
        assert (linear.bias == 0).all()  # nn.MultiheadAttention's
    text, image = torch.randn(1, 6, 32), torch.randn(1, 5, 32)
    valid = torch.tensor([[True, True, True, True, False, False]])
    other_padding = text.clone()
    other_padding[0, 5] = torch.randn(32)  # another padding token
    for style, head in heads.items():
        with torch.no_grad():
            changed = (head(text, image, valid) - head(other_padding, image, valid))[0, :4]
        assert (changed.abs().max() > 1e-4) == (style == "irra"), style


def test_partial_last_batch_is_kept_on_one_process_only(synth_root, tmp_path, monkeypatch):
    from datasets.sampler import RandomBatchSampler
    sampler = RandomBatchSampler(43, 8, seed=0, drop_last=False, keep_partial=True)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 6 and [len(b) for b in batches] == [8] * 5 + [3]
    assert sorted(i for b in batches for i in b) == list(range(43))
    with pytest.raises(ValueError, match="world_size"):
        RandomBatchSampler(43, 8, seed=0, world_size=2, drop_last=False, keep_partial=True)

    from processor import runner
    cfg = load_config(IRRA_CONFIG, tiny_overrides(synth_root, tmp_path))
    dataset = runner.load_dataset(cfg)
    loader = runner.train_loader(cfg, dataset, torch.device("cpu"))
    loader.batch_sampler.set_epoch(0)
    sizes = [len(b["pids"]) for b in loader]
    assert len(sizes) == math.ceil(len(dataset.train) / 8)
    assert sum(sizes) == len(dataset.train) and sizes[-1] == (len(dataset.train) % 8 or 8)
    monkeypatch.setattr(runner.comm, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="dataset.drop_last"):
        runner.train_loader(cfg, dataset, torch.device("cpu"))


def test_truncated_image_is_read_only_when_asked(tmp_path):
    from PIL import ImageFile

    from datasets import BadImageError, read_image
    path = tmp_path / "t.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(BadImageError, match="t.jpg"):
        read_image(str(path))
    image = read_image(str(path), load_truncated=True)
    assert image.size == (32, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # set for that read only
    with pytest.raises(BadImageError):
        read_image(str(path))


# -- IRRA checkpoints -------------------------------------------------------------------

def _irra_layout(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A state dict of this codebase's IRRA model written the way IRRA's code writes
    its model: fp16 tensors (IRRA's norms and embeddings stay fp32), its names, the
    cross-attention's q/k/v packed in one in_proj, no logit_scale."""
    renames = [("backbone.", "base_model."), ("mlm_head.blocks.", "cross_modal_transformer.resblocks."),
               (".attn.qkv.weight", ".attn.in_proj_weight"), (".attn.qkv.bias", ".attn.in_proj_bias"),
               (".attn.proj.", ".attn.out_proj."), (".mlp.fc1.", ".mlp.c_fc."),
               (".mlp.fc2.", ".mlp.c_proj."), ("mlm_head.cross_attn.proj.", "cross_attn.out_proj."),
               ("mlm_head.ln_pre_t.", "ln_pre_t."), ("mlm_head.ln_pre_i.", "ln_pre_i."),
               ("mlm_head.ln_post.", "ln_post.")]
    out = {}
    for key, value in state.items():
        if key == "backbone.logit_scale" or key.startswith("mlm_head.cross_attn.kv."):
            continue
        if key.startswith("mlm_head.cross_attn.q."):
            kind = key.rsplit(".", 1)[1]
            value = torch.cat([value, state[f"mlm_head.cross_attn.kv.{kind}"]])
            key = f"cross_attn.in_proj_{kind}"
        for old, new in renames:
            key = key.replace(old, new)
        fp32 = "embedding" in key or ".ln" in key or key.startswith("ln_")  # norms, embeddings
        out[prefix + key] = value if fp32 else value.half()
    return out


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp"])
def test_irra_checkpoint_scores_through_test_py_and_fine_tunes(synth_root, tmp_path, prefix):
    overrides = tiny_overrides(synth_root, tmp_path, "irra")
    cfg = load_config(IRRA_CONFIG, overrides)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=9)
    state = {k: v.float() for k, v in model.state_dict().items()}
    irra_state = _irra_layout(state, prefix)
    assert irra_state[f"{prefix}base_model.visual.proj"].dtype == torch.float16
    irra_ckpt = tmp_path / "irra_best.pth"
    torch.save({"model": irra_state, "optimizer": {"state": {}, "param_groups": []},
                "scheduler": {"last_epoch": 17, "base_lrs": [1e-5], "milestones": (20, 50)},
                "num_epoch": 60, "iteration": 0, "epoch": 17}, irra_ckpt)
    ours = tmp_path / "ours.pth"
    torch.save({"model": state, "num_classes": 9}, ours)

    scored = test_script.main(["--config_file", str(IRRA_CONFIG), f"checkpoint={irra_ckpt}",
                               *overrides])
    reference = test_script.main(["--config_file", str(IRRA_CONFIG), f"checkpoint={ours}",
                                  *overrides])
    assert scored["t2i"] == reference["t2i"] and scored["epoch"] == 17
    from processor.runner import metrics_file
    saved = json.loads(metrics_file(tmp_path / "CUHK-PEDES" / "irra", irra_ckpt).read_text())
    assert saved["split"] == "test" and saved["checkpoint"] == str(irra_ckpt)

    # As model.pretrain: the backbone starts from IRRA's CLIP.
    pretrained = build_model(load_config(IRRA_CONFIG, overrides + [f"model.pretrain={irra_ckpt}"]),
                             num_classes=9)
    for key, value in pretrained.backbone.state_dict().items():
        if key != "logit_scale":
            assert torch.equal(value, irra_state[f"{prefix}base_model.{key}"]), key


def test_irra_checkpoint_with_unknown_key_or_wrong_shape_names_it(synth_root, tmp_path):
    overrides = tiny_overrides(synth_root, tmp_path, "irra")
    model = build_model(load_config(IRRA_CONFIG, overrides), num_classes=9)
    irra_state = _irra_layout(model.state_dict())
    path = tmp_path / "best.pth"
    torch.save({"model": {**irra_state, "prompt_learner.ctx": torch.zeros(4, 32)}}, path)
    with pytest.raises(CheckpointMismatchError, match="prompt_learner.ctx"):
        test_script.main(["--config_file", str(IRRA_CONFIG), *overrides, f"checkpoint={path}"])
    with pytest.raises(CheckpointMismatchError, match="prompt_learner.ctx"):
        build_model(load_config(IRRA_CONFIG, overrides + [f"model.pretrain={path}"]), num_classes=9)
    irra_state["mlm_head.dense.weight"] = torch.zeros(3, 3).half()
    torch.save({"model": irra_state}, path)
    from utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"mlm_head\.dense\.weight: checkpoint \(3, 3\)"):
        test_script.main(["--config_file", str(IRRA_CONFIG), f"checkpoint={path}", *overrides])


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_fp16_gradient_norms_do_not_overflow(clip):
    """With fp16 weights a gradient tensor whose norm exceeds fp16's 65504 is still finite:
    the step's finiteness check and clipping take the norms in fp32."""
    from types import SimpleNamespace

    from processor.trainer import Trainer
    layer = nn.Linear(100, 100).half()
    layer.weight.grad = torch.full_like(layer.weight, 1000.0)  # norm 1e5
    layer.bias.grad = torch.full_like(layer.bias, 1.0)  # norm 10
    trainer = SimpleNamespace(core=layer, cfg=SimpleNamespace(solver=SimpleNamespace(grad_clip=clip)))
    total = Trainer._clip_gradients(trainer)
    assert total.dtype == torch.float32 and total.item() == pytest.approx(1e5, rel=1e-4)
    if clip:
        assert layer.weight.grad.float().norm().item() == pytest.approx(clip * 1e5 / (1e5 + 10),
                                                                        rel=1e-2)
        assert torch.isfinite(layer.weight.grad).all()
