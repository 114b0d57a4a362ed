"""CLIP backbone: shapes, causality, batch independence, gradients, loader and
parity with open_clip's ViT-B-16-quickgelu (CPU, fp32)."""

import hashlib
import io
import math
import pickle
import urllib.error
import warnings
import zipfile
from typing import List, Tuple

import pytest
import torch
from torch import nn

from model import clip_model
from model.clip_model import (
    CLIP, CheckpointMismatchError, PretrainedWeightsUnavailable, build_clip, load_state_dict_file,
    resize_pos_embed,
)
from model.script_archive import read_script_state_dict
from utils.checkpoint import CheckpointError
from utils.tokenizer import tokenize

TINY = dict(embed_dim=32, vision_width=64, vision_layers=2, vision_heads=2, patch_size=16,
            text_width=32, text_layers=2, text_heads=2)
CAPTIONS = ["a woman in a red coat with a black backpack", "man, blue jeans", "a child"]
PARITY_TOL = 1e-4


def tiny_clip(image_size=(64, 32), stride=16, seed=0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return build_clip("none", image_size=image_size, stride=stride, **{**TINY, **overrides}).eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- model behaviour

def test_shapes_and_global_features():
    model = tiny_clip()
    images = torch.randn(2, 3, 64, 32)
    ids = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        img_tokens, img_global = model.encode_image(images)
        txt_tokens, txt_global = model.encode_text(ids)
    assert model.visual.grid_size == (4, 2)
    assert img_tokens.shape == (2, 1 + 4 * 2, 32) and img_global.shape == (2, 32)
    assert torch.equal(img_global, img_tokens[:, 0])
    assert txt_tokens.shape == (2, 77, 32) and txt_global.shape == (2, 32)
    eot = ids.argmax(-1)
    assert torch.equal(txt_global, txt_tokens[torch.arange(2), eot])
    assert model.embed_dim == 32 and model.context_length == 77
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_default_geometry_is_vit_b16_at_384x128():
    with torch.device("meta"):
        model = CLIP()
    assert model.visual.grid_size == (24, 8)
    assert model.visual.positional_embedding.shape == (1 + 24 * 8, 768)
    assert model.text_projection.shape == (512, 512) and model.visual.proj.shape == (768, 512)
    n_params = sum(p.numel() for p in model.parameters())
    assert 149_000_000 < n_params < 150_000_000  # ViT-B/16 CLIP: ~149.6M


def test_overlapping_patches_follow_stride():
    model = tiny_clip(image_size=(64, 32), stride=8)
    assert model.visual.grid_size == (7, 3)
    tokens, _ = model.encode_image(torch.randn(1, 3, 64, 32))
    assert tokens.shape == (1, 1 + 7 * 3, 32)


def test_text_attention_is_causal():
    model = tiny_clip()
    ids = tokenize(CAPTIONS[:1])
    changed = ids.clone()
    changed[0, 5] = 1000  # a token after position 4
    with torch.no_grad():
        before, _ = model.encode_text(ids)
        after, _ = model.encode_text(changed)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)


def test_features_do_not_depend_on_batch_neighbours():
    model = tiny_clip()
    images = torch.randn(3, 3, 64, 32)
    ids = tokenize(CAPTIONS)
    with torch.no_grad():
        img_batch = model.encode_image(images)[0]
        txt_batch = model.encode_text(ids)[0]
        for i in range(3):
            assert max_abs_diff(model.encode_image(images[i:i + 1])[0][0], img_batch[i]) < 1e-5
            assert max_abs_diff(model.encode_text(ids[i:i + 1])[0][0], txt_batch[i]) < 1e-5
        reversed_img = model.encode_image(images.flip(0))[0].flip(0)
    assert max_abs_diff(reversed_img, img_batch) < 1e-5


def test_text_shorter_than_context_gives_same_prefix():
    model = tiny_clip()
    ids = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        full, full_global = model.encode_text(ids)
        short, short_global = model.encode_text(ids[:, :16])
    assert max_abs_diff(short, full[:, :16]) < 1e-5
    assert max_abs_diff(short_global, full_global) < 1e-5


def test_gradients_reach_every_encoder_parameter():
    model = tiny_clip().train()
    img_tokens, img_global = model.encode_image(torch.randn(2, 3, 64, 32))
    txt_tokens, txt_global = model.encode_text(tokenize(CAPTIONS[:2]))
    (img_tokens.square().mean() + txt_tokens.square().mean() + img_global.sum() + txt_global.sum()).backward()
    # logit_scale belongs to the contrastive losses, not to the encoders.
    unused = {"logit_scale"}
    no_grad = [n for n, p in model.named_parameters()
               if n not in unused and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_autocast_keeps_weights_fp32():
    model = tiny_clip()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        reference, _ = model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, _ = model.encode_image(images)
    assert tokens.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max_abs_diff(tokens.float(), reference) < 0.1 * reference.abs().max().item()


def test_wrong_image_size_names_expected_shape():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 32\)"):
        model.encode_image(torch.randn(1, 3, 32, 64))


def test_unknown_architecture_argument_is_rejected():
    with pytest.raises(TypeError, match="vison_width"):
        build_clip("none", vison_width=64)


# --------------------------------------------------------------------------- position embedding

def test_resize_pos_embed_identity_when_grid_unchanged():
    pos = torch.randn(1 + 14 * 14, 8)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos


def test_resize_pos_embed_to_24x8_keeps_cls_and_grid_layout():
    D = 4
    cls = torch.randn(1, D)
    # Values vary along columns only, so every resized row must be identical
    # and a rows/columns mix-up would show.
    column_values = torch.linspace(-1, 1, 14)
    grid = column_values.view(1, 14, 1).expand(14, 14, D).reshape(14 * 14, D)
    resized = resize_pos_embed(torch.cat([cls, grid]), (14, 14), (24, 8))
    assert resized.shape == (1 + 24 * 8, D)
    assert torch.equal(resized[0], cls[0])
    rows = resized[1:].view(24, 8, D)
    assert torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-6)
    assert (rows[0, 1:, 0] > rows[0, :-1, 0]).all()  # increasing from left to right
    # A constant field stays constant under bicubic resizing.
    const = resize_pos_embed(torch.full((1 + 14 * 14, D), 0.5), (14, 14), (24, 8))
    assert torch.allclose(const, torch.full_like(const, 0.5), atol=1e-5)


def test_loading_14x14_weights_at_384x128_resizes(tmp_path):
    source = tiny_clip(image_size=224)
    assert source.visual.grid_size == (14, 14)
    path = tmp_path / "square.pt"
    torch.save(source.state_dict(), path)
    model = build_clip(path, image_size=(384, 128), stride=16, vision_heads=2, text_heads=2).eval()
    expected = resize_pos_embed(source.visual.positional_embedding.detach(), (14, 14), (24, 8))
    assert model.visual.grid_size == (24, 8)
    assert torch.equal(model.visual.positional_embedding.detach(), expected)
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)
    tokens, _ = model.encode_image(torch.randn(1, 3, 384, 128))
    assert tokens.shape == (1, 1 + 24 * 8, 32)


# --------------------------------------------------------------------------- loader

def save_tiny(tmp_path, state_dict=None, name="tiny.pt"):
    path = tmp_path / name
    torch.save(tiny_clip().state_dict() if state_dict is None else state_dict, path)
    return path


def build_tiny_from(path):
    return build_clip(path, image_size=(64, 32), stride=16, vision_heads=2, text_heads=2)


def test_wrapped_half_precision_state_dict_loads_as_fp32(tmp_path):
    source = tiny_clip()
    half = {"module." + k: v.half() for k, v in source.state_dict().items()}
    path = save_tiny(tmp_path, {"state_dict": half, "epoch": 3})
    model = build_tiny_from(path)
    assert all(p.dtype == torch.float32 and not p.is_meta and p.requires_grad for p in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name].half().float()), name
    # The {"model": ...} wrapper is accepted too.
    path = save_tiny(tmp_path, {"model": source.state_dict()}, name="model_wrapped.pt")
    assert torch.equal(build_tiny_from(path).text_projection, source.text_projection)


def test_architecture_is_inferred_from_the_file(tmp_path):
    source = tiny_clip(vision_layers=3, text_layers=1, context_length=20)
    model = build_tiny_from(save_tiny(tmp_path, source.state_dict()))
    assert len(model.visual.transformer.resblocks) == 3 and len(model.transformer.resblocks) == 1
    assert model.context_length == 20 and model.embed_dim == 32


def test_mis_shaped_key_is_named(tmp_path):
    state_dict = tiny_clip().state_dict()
    state_dict["visual.ln_post.weight"] = torch.ones(65)
    with pytest.raises(CheckpointMismatchError, match=r"visual\.ln_post\.weight: checkpoint \(65,\) vs model \(64,\)"):
        build_tiny_from(save_tiny(tmp_path, state_dict))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state_dict = tiny_clip().state_dict()
    del state_dict["transformer.resblocks.1.mlp.c_fc.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as info:
        build_tiny_from(save_tiny(tmp_path, state_dict))
    message = str(info.value)
    assert "missing keys (1): transformer.resblocks.1.mlp.c_fc.bias" in message
    assert "unexpected keys (1): visual.extra_head.weight" in message
    assert "tiny.pt" in message


def test_missing_architecture_key_is_named(tmp_path):
    state_dict = tiny_clip().state_dict()
    del state_dict["visual.conv1.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"visual\.conv1\.weight"):
        build_tiny_from(save_tiny(tmp_path, state_dict))


def test_architecture_override_conflict_is_reported(tmp_path):
    path = save_tiny(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped keys.*visual\.proj"):
        build_clip(path, image_size=(64, 32), embed_dim=16, vision_heads=2, text_heads=2)


def test_non_state_dict_file_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="list.pt"):
        load_state_dict_file(path)


def test_unknown_pretrain_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(PretrainedWeightsUnavailable, match="nowhere.pt"):
        build_clip(str(missing))
    with pytest.raises(PretrainedWeightsUnavailable, match="nowhere.pt"):
        load_state_dict_file(missing)


def test_offline_missing_weights_name_url_and_path(tmp_path, monkeypatch):
    def offline(url, target, sha256):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(clip_model, "_download", offline)
    monkeypatch.delenv("COMOE_OFFLINE", raising=False)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_clip("ViT-B/16", cache_dir=tmp_path)
    message = str(info.value)
    assert clip_model.PRETRAINED_URLS["ViT-B/16"] in message
    assert str(tmp_path / "ViT-B-16.pt") in message
    assert "network unreachable" in message


def test_offline_switch_never_downloads_and_env_sets_cache(tmp_path, monkeypatch):
    def must_not_download(url, target, sha256):
        raise AssertionError("downloaded although offline")

    monkeypatch.setattr(clip_model, "_download", must_not_download)
    monkeypatch.setenv("COMOE_OFFLINE", "1")
    monkeypatch.setenv("COMOE_CLIP_CACHE", str(tmp_path / "env_cache"))
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        build_clip("ViT-B/16")
    assert str(tmp_path / "env_cache" / "ViT-B-16.pt") in str(info.value)
    monkeypatch.delenv("COMOE_OFFLINE")
    with pytest.raises(PretrainedWeightsUnavailable, match="disabled"):
        build_clip("ViT-B/16", download=False)


# --------------------------------------------------------------------------- TorchScript archives

def save_traced_tiny(path, source: CLIP):
    """A traced CLIP saved as OpenAI's archives are: <name>/data.pkl, data/, code/, constants.pkl,
    with a buffer (as OpenAI's input_resolution) among the parameters."""
    source.register_buffer("input_resolution", torch.tensor(224))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(source, (torch.randn(1, 3, 64, 32), tokenize(CAPTIONS[:1])),
                        check_trace=False).save(str(path))
    return path


class Scripted(nn.Module):
    """Attributes of every kind a module archive holds: parameters (one a strided view), a
    half-precision buffer, an unset Optional parameter, submodules in a container, a plain
    tensor and a list that are attributes only, and a BatchNorm's integer buffer."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 4, bias=False), nn.BatchNorm1d(4)])
        self.scale = nn.Parameter(torch.randn(4, 6)[:, 1:5])
        self.register_buffer("counts", torch.randn(3).half())
        self.plain = torch.ones(4)
        self.sizes: List[int] = [3, 4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x @ self.scale + self.plain


class WritesOnLoad(nn.Module):
    """A module whose __setstate__, run by torch.jit.load, writes 8 bytes to a file it names."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.weight = nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.target, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        written = torch.from_file(self.target, True, 8, dtype=torch.uint8).fill_(33)
        self.weight = state[1] + written[:2].float() * 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def script_and_save(module: nn.Module, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module).save(str(path))
    return path


def test_torchscript_archives_are_read_as_data_with_jit_state_dict_names(tmp_path, monkeypatch):
    source = tiny_clip()
    archives = [save_traced_tiny(tmp_path / "traced.pt", source),
                script_and_save(Scripted(), tmp_path / "scripted.pt")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        references = [torch.jit.load(str(path)).state_dict() for path in archives]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    for path, reference in zip(archives, references):
        state_dict = read_script_state_dict(path)
        assert list(state_dict) == list(reference), path.name
        for name, tensor in reference.items():
            assert state_dict[name].dtype == tensor.dtype, name
            assert torch.equal(state_dict[name], tensor), name
    assert "plain" not in references[1] and "blocks.0.bias" not in references[1]
    model = build_tiny_from(archives[0])
    for name, tensor in source.state_dict().items():
        if name != "input_resolution":
            assert torch.equal(model.state_dict()[name], tensor), name


def test_torchscript_archive_code_never_runs(tmp_path):
    marker = tmp_path / "written_by_the_archive"
    path = script_and_save(WritesOnLoad(str(marker)), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt was not loaded.*__torch__\.\S*"
                                              r"WritesOnLoad restores its objects with its own "
                                              r"code"):
        build_tiny_from(path)
    assert not marker.exists()


class Call:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_archive_pickle_may_only_build_tensors_and_plain_data(tmp_path):
    marker = tmp_path / "opened_by_the_pickle"
    path = tmp_path / "crafted.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", pickle.dumps(Call(open, str(marker), "w"), protocol=2))
        archive.writestr("crafted/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("crafted/code/__torch__.py", "")
    with pytest.raises(CheckpointError, match=r"crafted\.pt was not loaded.*io\.open, which is "
                                              r"neither a tensor nor plain data"):
        load_state_dict_file(path)
    assert not marker.exists()

    # A storage the pickle names but the archive does not hold.
    traced = save_traced_tiny(tmp_path / "traced.pt", tiny_clip())
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(traced) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            if item.filename != "traced/data/0":
                target.writestr(item, source.read(item))
    with pytest.raises(CheckpointError, match=r"refers to traced/data/0, which the archive "
                                              r"does not hold"):
        load_state_dict_file(broken)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_verifies_sha256_and_cache_is_reused(tmp_path, monkeypatch):
    weights = tmp_path / "src.pt"
    torch.save(tiny_clip().state_dict(), weights)
    payload = weights.read_bytes()
    sha = hashlib.sha256(payload).hexdigest()
    url = f"https://example.invalid/clip/models/{sha}/ViT-B-16.pt"
    monkeypatch.setitem(clip_model.PRETRAINED_URLS, "ViT-B/16", url)
    requests = []

    def fake_urlopen(requested, timeout=None):
        requests.append(requested)
        return FakeResponse(payload)

    monkeypatch.setattr(clip_model.urllib.request, "urlopen", fake_urlopen)
    cache = tmp_path / "cache"
    model = build_clip("ViT-B/16", image_size=(64, 32), cache_dir=cache, vision_heads=2, text_heads=2)
    assert requests == [url] and (cache / "ViT-B-16.pt").read_bytes() == payload
    assert sorted(p.name for p in cache.iterdir()) == ["ViT-B-16.pt"]  # no temporary file left
    build_clip("ViT-B/16", image_size=(64, 32), cache_dir=cache, download=False, vision_heads=2, text_heads=2)
    assert requests == [url]  # served from the cache
    assert model.visual.grid_size == (4, 2)

    # A corrupted download is rejected and never lands at the cache path.
    (cache / "ViT-B-16.pt").unlink()
    monkeypatch.setattr(clip_model.urllib.request, "urlopen", lambda u, timeout=None: FakeResponse(payload[:-1]))
    with pytest.raises(PretrainedWeightsUnavailable, match="SHA256"):
        build_clip("ViT-B/16", image_size=(64, 32), cache_dir=cache)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------- parity with open_clip

@pytest.fixture(scope="module")
def open_clip_reference(tmp_path_factory):
    """open_clip ViT-B-16-quickgelu with random weights, its outputs on a small
    batch, and its weights saved as a state dict and as a TorchScript archive."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    images = torch.randn(2, 3, 224, 224)
    ids = tokenize(CAPTIONS[:2])
    with torch.no_grad():
        reference.visual.output_tokens = True
        pooled, patch_tokens = reference.visual(images)  # patch tokens after ln_post, before proj
        reference.visual.output_tokens = False
        image_tokens = torch.cat([pooled[:, None], patch_tokens @ reference.visual.proj], dim=1)
        text_global = reference.encode_text(ids)
        x = reference.token_embedding(ids) + reference.positional_embedding
        x = reference.transformer(x, attn_mask=reference.attn_mask)
        text_tokens = reference.ln_final(x) @ reference.text_projection

    folder = tmp_path_factory.mktemp("open_clip")
    state_dict_path = folder / "vit_b16_state_dict.pt"
    torch.save(reference.state_dict(), state_dict_path)
    # OpenAI's archive is a traced model carrying these attributes as entries.
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        reference.__dict__.pop(name, None)
        reference.register_buffer(name, torch.tensor(value))
    archive_path = folder / "vit_b16_traced.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(reference, (images[:1], ids[:1]), check_trace=False).save(str(archive_path))
    return dict(images=images, ids=ids, image_tokens=image_tokens, image_global=pooled,
                text_tokens=text_tokens, text_global=text_global,
                state_dict_path=state_dict_path, archive_path=archive_path)


def parity_errors(model: CLIP, ref: dict) -> dict[str, float]:
    with torch.no_grad():
        image_tokens, image_global = model.encode_image(ref["images"])
        text_tokens, text_global = model.encode_text(ref["ids"])
    return {
        "image_tokens": max_abs_diff(image_tokens, ref["image_tokens"]),
        "image_global": max_abs_diff(image_global, ref["image_global"]),
        "text_tokens": max_abs_diff(text_tokens, ref["text_tokens"]),
        "text_global": max_abs_diff(text_global, ref["text_global"]),
    }


@pytest.mark.parametrize("source", ["state_dict_path", "archive_path"])
def test_parity_with_open_clip_vit_b16(open_clip_reference, source):
    model = build_clip(open_clip_reference[source], image_size=224, stride=16).eval()
    assert model.visual.grid_size == (14, 14)
    # The reference outputs are O(1), so an absolute tolerance is meaningful.
    assert open_clip_reference["image_tokens"].abs().max() > 0.5
    assert open_clip_reference["text_tokens"].abs().max() > 0.5
    errors = parity_errors(model, open_clip_reference)
    assert max(errors.values()) < PARITY_TOL, errors


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp"])
def test_a_checkpoint_of_this_codebase_is_a_pretrain_file(tmp_path, prefix):
    """model.pretrain=RUN/best.pth (or last.pth) starts from that run's CLIP."""
    from conftest import ROOT, TINY_MODEL
    from model import build_model
    from utils.config import load_config
    cfg = load_config(ROOT / "configs" / "demo.yaml", TINY_MODEL)
    torch.manual_seed(0)
    trained = build_model(cfg)
    path = tmp_path / "best.pth"
    torch.save({"model": {prefix + k: v for k, v in trained.state_dict().items()},
                "config": {}, "epoch": 3}, path)
    started = build_model(load_config(ROOT / "configs" / "demo.yaml",
                                      TINY_MODEL + [f"model.pretrain={path}"]))
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(started.backbone.state_dict()[key], value), key
