"""CLIP ViT image encoder and text transformer, batch-first, fp32 weights.

Parameter names follow OpenAI's CLIP (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``,
``ln_final``, ``text_projection``, ``logit_scale`` ...) so that OpenAI's
``ViT-B-16.pt`` and open_clip state dicts load with strict key checks.

Both encoders return every token projected into the joint embedding space
(``ln_post``+``proj`` / ``ln_final``+``text_projection`` on every position) and
the global feature (image: CLS token; text: end-of-text token).

Mixed precision comes from ``torch.autocast`` around the forward pass; weights
stay fp32 (a half-precision checkpoint is upcast on load). The one exception is
IRRA's legacy fp16 weights (`model.irra.convert_weights_to_fp16`): the encoders
cast their inputs to their weights' dtype, which is a no-op for fp32 weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from utils.checkpoint import strip_module_prefix
from utils.errors import UserError

from .script_archive import read_script_state_dict

logger = logging.getLogger(__name__)

# OpenAI's published ViT-B/16 archive; the URL's path segment is the file's SHA256.
PRETRAINED_URLS = {
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
CACHE_ENV = "COMOE_CLIP_CACHE"
OFFLINE_ENV = "COMOE_OFFLINE"
DEFAULT_CACHE_DIR = Path("~/.cache/clip")

# ViT-B/16 sizes; the defaults of CLIP and build_clip.
VIT_B16 = dict(
    embed_dim=512, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
    context_length=77, vocab_size=49408, text_width=512, text_layers=12, text_heads=8,
)
ARCH_KEYS = frozenset(VIT_B16)

# Entries that are model attributes or derived buffers, not weights: OpenAI's
# archives carry the first three, TorchScript traces of open_clip the causal mask.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# Where a retrieval model (model.build.RetrievalModel) keeps its CLIP.
BACKBONE_PREFIX = "backbone."


class CheckpointMismatchError(UserError, ValueError):
    """A state dict does not fit the model: lists missing, unexpected and mis-shaped keys."""


class PretrainedWeightsUnavailable(UserError, FileNotFoundError):
    """Pretrained weights are not where the pretrain setting says, nor downloadable."""


# --------------------------------------------------------------------------- layers

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed q/k/v projection.

    Parameter names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``) match
    ``nn.MultiheadAttention`` and therefore CLIP checkpoints; the computation is
    batch-first through ``F.scaled_dot_product_attention``, so each sample only
    attends to its own tokens.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}.")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: B, L, D. attn_mask: bool (True = may attend) or additive float,
        broadcastable to B, heads, L, L. Returns B, L, D."""
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # B, L, 3D
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each B, h, L, hd
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # B, h, L, hd
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)  # B, L, D
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        # Recompute each block's activations in backward instead of storing them.
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: B, L, D -> B, L, D. See SelfAttention for the mask convention."""
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask=attn_mask,
                                                      is_causal=is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x

    def init_weights(self) -> None:
        """CLIP's initialisation, scaled by width and depth."""
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or (H, W), got {value}.")
    return value


def patch_grid(image_size: int | Sequence[int], patch_size: int, stride: int) -> tuple[int, int]:
    """Rows and columns of patches a (H, W) image gives for a patch size and stride."""
    H, W = _pair(image_size, "image_size")
    if H < patch_size or W < patch_size or stride < 1:
        raise ValueError(f"image_size={(H, W)} with patch_size={patch_size}, stride={stride} gives no patches.")
    return (H - patch_size) // stride + 1, (W - patch_size) // stride + 1


class VisionTransformer(nn.Module):
    """ViT image encoder over a (H, W) image with a patch size and stride."""

    def __init__(self, image_size: int | Sequence[int], patch_size: int, stride: int,
                 width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.image_size = _pair(image_size, "image_size")
        self.grid_size = patch_grid(self.image_size, patch_size, stride)
        num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: B, 3, H, W -> tokens B, 1 + gh*gw, output_dim (CLS first)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"Expected images of shape (B, 3, {self.image_size[0]}, {self.image_size[1]}), got "
                f"{tuple(images.shape)}; build the model with image_size matching the data."
            )
        x = self.conv1(images.to(self.conv1.weight.dtype))  # B, W, gh, gw
        x = x.flatten(2).transpose(1, 2)  # B, N, W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # B, 1, W
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # B, 1+N, W
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x) @ self.proj  # B, 1+N, output_dim


# --------------------------------------------------------------------------- CLIP

class CLIP(nn.Module):
    """CLIP with a ViT image encoder and a causal text transformer.

    Defaults are ViT-B/16; every size is an argument so tiny models can be built
    for tests. ``image_size`` is (H, W) in pixels.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        image_size: int | Sequence[int] = (384, 128),
        patch_size: int = 16,
        stride: int = 16,
        vision_width: int = 768,
        vision_layers: int = 12,
        vision_heads: int = 12,
        context_length: int = 77,
        vocab_size: int = 49408,
        text_width: int = 512,
        text_layers: int = 12,
        text_heads: int = 8,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.visual = VisionTransformer(image_size, patch_size, stride, vision_width,
                                        vision_layers, vision_heads, embed_dim)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.transformer = Transformer(text_width, text_layers, text_heads)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's initialisation scheme (OpenAI ``initialize_parameters``)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        self.visual.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    @property
    def image_size(self) -> tuple[int, int]:
        return self.visual.image_size

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: B, 3, H, W (normalised pixels).

        Returns (tokens B, 1+N, embed_dim, global B, embed_dim); global is the CLS token.
        """
        tokens = self.visual(images)  # B, 1+N, E
        return tokens, tokens[:, 0]

    def encode_text(self, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """caption_ids: B, L long (SOT ... EOT, zero padded; L <= context_length).

        Returns (tokens B, L, embed_dim, global B, embed_dim); global is the token
        at ``caption_ids.argmax(-1)``, the end-of-text token (the largest id).
        """
        if caption_ids.ndim != 2 or caption_ids.shape[1] > self.context_length:
            raise ValueError(
                f"Expected caption_ids of shape (B, L) with L <= {self.context_length}, got {tuple(caption_ids.shape)}."
            )
        L = caption_ids.shape[1]
        dtype = self.text_projection.dtype  # fp32, or fp16 with IRRA's fp16 weights
        x = self.token_embedding(caption_ids).to(dtype) + self.positional_embedding[:L].to(dtype)  # B, L, W
        x = self.transformer(x, is_causal=True)
        tokens = self.ln_final(x) @ self.text_projection  # B, L, E
        eot = caption_ids.argmax(dim=-1)  # B
        return tokens, tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]

    def forward(self, images: torch.Tensor, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global image and text features: (B, embed_dim), (B', embed_dim)."""
        return self.encode_image(images)[1], self.encode_text(caption_ids)[1]


# --------------------------------------------------------------------------- position embedding

def resize_pos_embed(pos_embed: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int],
                     interpolation: str = "bicubic") -> torch.Tensor:
    """Resize a ViT position embedding (``interpolation``: bicubic or bilinear, as
    ``F.interpolate`` without corner alignment), keeping the class token.

    pos_embed: 1 + src_h*src_w, D -> 1 + dst_h*dst_w, D. Returns the input
    tensor itself when the grids are equal.
    """
    src_h, src_w = src_grid
    dst_h, dst_w = dst_grid
    if pos_embed.ndim != 2 or pos_embed.shape[0] != 1 + src_h * src_w:
        raise ValueError(f"Position embedding of shape {tuple(pos_embed.shape)} does not hold 1 + {src_h}x{src_w} tokens.")
    if (src_h, src_w) == (dst_h, dst_w):
        return pos_embed
    cls, grid = pos_embed[:1], pos_embed[1:]
    D = grid.shape[1]
    grid = grid.float().reshape(1, src_h, src_w, D).permute(0, 3, 1, 2)  # 1, D, h, w
    grid = F.interpolate(grid, size=(dst_h, dst_w), mode=interpolation, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(dst_h * dst_w, D).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=0)


# --------------------------------------------------------------------------- checkpoints

def _is_torchscript_archive(path: Path) -> bool:
    # TorchScript archives are zip files with serialized code; torch.save files have none.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read CLIP weights from an OpenAI TorchScript archive or a torch.save file.

    Neither is executed: the archive is read as data (``model.script_archive``),
    a torch.save file with ``weights_only=True``.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers, strips
    ``module.`` prefixes, drops the archive's non-parameter entries and upcasts
    floating tensors to fp32. A checkpoint of a whole retrieval model gives its CLIP
    and leaves the rest out: this codebase's (best.pth, last.pth: ``backbone.*``) and
    IRRA's (``base_model.*``, whose other keys are checked by name, `model.irra`).
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"CLIP weights file not found: {path}")
    if _is_torchscript_archive(path):
        # OpenAI publishes TorchScript archives; torch.jit.load would run their code.
        state_dict = read_script_state_dict(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in several types
            raise ValueError(
                f"Could not read {path} as a state dict ({type(err).__name__}: {err}). "
                "Save plain tensors with torch.save(model.state_dict(), path)."
            ) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
    from .irra import from_irra_state_dict, is_irra_state_dict  # model.irra imports this module
    state_dict = strip_module_prefix(state_dict)
    if is_irra_state_dict(state_dict):
        state_dict = from_irra_state_dict(state_dict, str(path))
    if any(key.startswith(BACKBONE_PREFIX) for key in state_dict):
        state_dict = backbone_state(state_dict)
    cleaned = {}
    for key, value in state_dict.items():
        if key in _NON_PARAMETER_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
        cleaned[key] = value.float() if value.is_floating_point() else value
    return cleaned


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The CLIP weights in a retrieval model's state dict (``module.`` prefixes allowed)."""
    return {key.removeprefix(BACKBONE_PREFIX): value
            for key, value in strip_module_prefix(state).items() if key.startswith(BACKBONE_PREFIX)}


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_arch(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """CLIP ViT architecture of a state dict (heads assume CLIP's 64-dim heads)."""
    needed = ("visual.conv1.weight", "text_projection", "positional_embedding",
              "token_embedding.weight", "ln_final.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(
            f"Not a CLIP ViT state dict: missing {', '.join(missing)} (needed to infer the architecture)."
        )
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    text_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        patch_size=state_dict["visual.conv1.weight"].shape[-1],
        vision_width=vision_width,
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_heads=vision_width // 64,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
        text_heads=text_width // 64,
    )


def _source_grid(pos_embed: torch.Tensor, dst_grid: tuple[int, int]) -> tuple[int, int]:
    """Grid of a checkpoint's position embedding: the target grid if the length
    fits it, else the square grid pretrained CLIP models use."""
    n = pos_embed.shape[0] - 1
    if n == dst_grid[0] * dst_grid[1]:
        return dst_grid
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointMismatchError(
            f"visual.positional_embedding holds {n} patch positions: neither the target grid "
            f"{dst_grid[0]}x{dst_grid[1]} nor a square grid, so it cannot be resized."
        )
    return side, side


def load_clip_state_dict(model: CLIP, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                         interpolation: str = "bicubic") -> CLIP:
    """Load CLIP weights into ``model``, resizing the image position embedding
    (`resize_pos_embed` with ``interpolation``).

    Raises CheckpointMismatchError naming every missing, unexpected and
    mis-shaped key. A model on the meta device takes the loaded tensors as its
    parameters; otherwise they are copied into the existing ones.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in _NON_PARAMETER_KEYS}
    key = "visual.positional_embedding"
    if key in state_dict:
        dst_grid = model.visual.grid_size
        src_grid = _source_grid(state_dict[key], dst_grid)
        if src_grid != dst_grid:
            logger.info("Resizing %s from %dx%d to %dx%d", key, *src_grid, *dst_grid)
        state_dict[key] = resize_pos_embed(state_dict[key], src_grid, dst_grid, interpolation)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"{source} does not match the CLIP model:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointMismatchError("\n".join(lines))
    if any(p.is_meta for p in model.parameters()):
        # A model built on the meta device adopts the loaded tensors (no copy).
        state_dict = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
    else:
        model.load_state_dict(state_dict, strict=True)
    return model


# --------------------------------------------------------------------------- download

def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Weights cache folder: ``cache_dir`` argument > $COMOE_CLIP_CACHE > ~/.cache/clip."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, sha256: str) -> None:
    """Download ``url`` to ``target`` through a temporary file in the same
    folder; the file is only renamed into place once its SHA256 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s to %s", url, target)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"Downloaded {url} has SHA256 {digest.hexdigest()}, expected {sha256}.")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def pretrained_path(name: str, cache_dir: str | os.PathLike | None = None, download: bool | None = None) -> Path:
    """Path of a verified pretrained weights file, downloading it when allowed.

    ``download=None`` downloads unless the environment sets COMOE_OFFLINE=1.
    """
    url = PRETRAINED_URLS[name]
    sha256 = url.split("/")[-2]
    target = resolve_cache_dir(cache_dir) / url.split("/")[-1]
    if download is None:
        download = os.environ.get(OFFLINE_ENV, "0") not in ("1", "true", "True", "yes")
    if target.is_file():
        if _sha256(target) == sha256:
            return target
        if not download:
            raise PretrainedWeightsUnavailable(
                f"{target} is corrupt (SHA256 differs from {sha256}) and downloading is disabled. "
                f"Replace it with {url}."
            )
        logger.warning("%s has the wrong SHA256; downloading it again", target)
    how_to = (f"Download {url} and place it at {target} (or point ${CACHE_ENV} / the cache_dir "
              f"setting at the folder holding ViT-B-16.pt).")
    if not download:
        raise PretrainedWeightsUnavailable(f"{name} weights are not cached and downloading is disabled "
                                           f"(${OFFLINE_ENV}=1 or download=False). {how_to}")
    try:
        _download(url, target, sha256)
    except (OSError, urllib.error.URLError, RuntimeError) as err:
        raise PretrainedWeightsUnavailable(f"Could not download {name} weights ({err}). {how_to}") from err
    return target


# --------------------------------------------------------------------------- build

def build_clip(
    pretrain: str | os.PathLike | None = "ViT-B/16",
    image_size: int | Sequence[int] = (384, 128),
    stride: int = 16,
    cache_dir: str | os.PathLike | None = None,
    download: bool | None = None,
    interpolation: str = "bicubic",
    **arch: Any,
) -> CLIP:
    """Build CLIP for ``image_size`` (H, W) and patch ``stride``.

    pretrain:
      - "ViT-B/16": OpenAI's weights from the cache folder (``cache_dir`` >
        $COMOE_CLIP_CACHE > ~/.cache/clip), downloaded and SHA256-checked when
        missing unless ``download=False`` or $COMOE_OFFLINE=1;
      - a file path: an OpenAI TorchScript archive or a (wrapped) state dict; the
        architecture is read from the weights;
      - "none" / None: random initialisation with CLIP's scheme.
    arch: architecture overrides (embed_dim, vision_width, vision_layers,
      vision_heads, patch_size, text_width, text_layers, text_heads,
      context_length, vocab_size). With weights, values that disagree with the
      file surface as mis-shaped keys.

    The pretrained position embedding is resized to the target grid with
    ``interpolation`` (bicubic or bilinear).
    """
    unknown = sorted(set(arch) - ARCH_KEYS)
    if unknown:
        raise TypeError(f"build_clip() got unknown architecture arguments {unknown}; valid: {sorted(ARCH_KEYS)}.")
    if pretrain is None or str(pretrain).lower() == "none":
        return CLIP(image_size=image_size, stride=stride, **{**VIT_B16, **arch})

    if str(pretrain) in PRETRAINED_URLS:
        path, source = pretrained_path(str(pretrain), cache_dir, download), f"{pretrain} weights"
    else:
        path = Path(pretrain).expanduser()
        if not path.is_file():
            raise PretrainedWeightsUnavailable(
                f"pretrain={str(pretrain)!r} is neither a file nor a known model "
                f"({', '.join(PRETRAINED_URLS)}, or 'none' for random initialisation)."
            )
        source = str(path)
    state_dict = load_state_dict_file(path)
    config = {**infer_arch(state_dict), **arch}
    # Build on the meta device: the loaded tensors replace the parameters, so the
    # random initialisation of 150M parameters would be wasted work.
    with torch.device("meta"):
        model = CLIP(image_size=image_size, stride=stride, **config)
    load_clip_state_dict(model, state_dict, source=f"{source}", interpolation=interpolation)
    logger.info("Loaded CLIP weights from %s (image size %s, grid %s)", path, model.image_size, model.visual.grid_size)
    return model
