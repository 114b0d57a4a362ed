"""The CoMoE head: pre-LN transformer blocks with a shared mixture of experts.

Each modality's token sequence goes through the head on its own. Every
operation works within one sample: attention is batch-first and masked per
sample, LayerNorm and MLP act per token, and routing is per token without
capacity limits. A sample's output therefore depends on that sample alone,
never on its batch neighbours, batch size or position in the batch
(tests/test_moe.py checks this).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.moe import AUX_INPUTS, COMBINE_MODES, GATE_MODES, MODALITIES, MoELayer, RoutingStats

__all__ = ["FUSE_MODES", "Attention", "CoMoEBlock", "CoMoEHead", "Mlp", "fuse_embedding"]

FUSE_MODES = ("sum", "global", "mean")


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention over batch-first tokens with a key padding mask."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """x: (B, L, D), valid: (B, L) bool or None (every token real) -> (B, L, D).

        Queries attend to the valid keys of their own sample. Every query may
        also attend to itself, so a padded query row (or a sample without valid
        tokens) never has all keys masked (no NaN); valid queries are unaffected
        because their own key is valid anyway. Without padding no mask is built,
        so SDPA can pick its unmasked (flash) kernels.
        """
        B, L, D = x.shape
        q, k, v = (
            self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )  # each B, H, L, hd
        attn_mask = None
        if valid is not None:
            self_key = torch.eye(L, dtype=torch.bool, device=x.device)  # L, L
            attn_mask = valid[:, None, None, :] | self_key  # B, 1, L, L
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # B, H, L, hd
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """D -> hidden -> D with GELU and dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CoMoEBlock(nn.Module):
    """Pre-LN block::

        x = x + SelfAttn(LN1(x))
        x = x + MLP(LN2(x)) + MoE(LN3(x), modality)

    With ``num_experts == 0`` the MoE branch (and LN3) is absent.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        num_experts: int = 4,
        topk: int = 2,
        reduction: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        expert_dropout: float = 0.1,
        gate: str = "modality+aux",
        aux_input: str = "prompt",
        mix_init: float = 0.5,
        combine: str = "renorm",
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.apply(_init_linear)
        self.ln_3 = None
        self.moe = None
        if num_experts > 0:
            self.ln_3 = nn.LayerNorm(dim)
            self.moe = MoELayer(
                dim, num_experts, topk, reduction, expert_dropout, gate, aux_input, mix_init,
                combine=combine,
            )

    def forward(self, x: Tensor, valid: Tensor | None, modality: str,
                global_pos: Tensor | None = None) -> tuple[Tensor, RoutingStats | None]:
        """x: (B, L, D), valid: (B, L) bool or None (no padding), global_pos: (B,) long
        or None (position 0) -> ((B, L, D), stats or None without MoE)."""
        x = x + self.attn(self.ln_1(x), valid)
        update = self.mlp(self.ln_2(x))  # B, L, D
        stats = None
        if self.moe is not None:
            moe_out, stats = self.moe(self.ln_3(x), valid, modality, global_pos)
            update = update + moe_out
        return x + update, stats


class CoMoEHead(nn.Module):
    """A stack of `CoMoEBlock`s applied to one modality's tokens at a time.

    Args:
        dim: token width D (the joint embedding space, 512 for ViT-B/16 CLIP).
        layers: number of blocks.
        heads: attention heads; must divide ``dim``.
        num_experts: experts per MoE layer (E); 0 removes the MoE branch
            (a plain transformer head, for ablations).
        topk: experts per token (k <= E).
        reduction: expert bottleneck factor r (hidden width D // r).
        mlp_ratio: MLP hidden width as a multiple of D.
        dropout: dropout on attention weights, attention output and MLP.
        expert_dropout: dropout inside each expert.
        gate: router gate mode, one of `model.moe.GATE_MODES`.
        aux_input: auxiliary gate input, one of `model.moe.AUX_INPUTS`.
        mix_init: initial mixing weight a in (0, 1) of the auxiliary gate.
        combine: combine weights of the selected experts, one of
            `model.moe.COMBINE_MODES` ("prob" is needed at k = 1).
        identity_init: zero-initialise the output projection of every
            residual branch (attention, MLP and, always, the experts) so a new
            head is exactly the identity on valid tokens and starts from the
            backbone's features. False uses the usual N(0, 0.02) init for the
            attention and MLP output projections.
    """

    def __init__(
        self,
        dim: int = 512,
        layers: int = 4,
        heads: int = 8,
        num_experts: int = 4,
        topk: int = 2,
        reduction: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        expert_dropout: float = 0.1,
        gate: str = "modality+aux",
        aux_input: str = "prompt",
        mix_init: float = 0.5,
        identity_init: bool = True,
        combine: str = "renorm",
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"CoMoEHead needs layers >= 1, got {layers}")
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"CoMoEHead dim ({dim}) must be divisible by heads ({heads})")
        if gate not in GATE_MODES:
            raise ValueError(f"unknown CoMoEHead gate {gate!r}; expected one of {GATE_MODES}")
        if aux_input not in AUX_INPUTS:
            raise ValueError(f"unknown CoMoEHead aux_input {aux_input!r}; expected one of {AUX_INPUTS}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown CoMoEHead combine {combine!r}; expected one of {COMBINE_MODES}")
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 disables the MoE branch), got {num_experts}")
        if num_experts > 0 and not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        self.dim = dim
        self.num_experts = num_experts
        self.blocks = nn.ModuleList(
            CoMoEBlock(
                dim, heads, num_experts, topk, reduction, mlp_ratio, dropout,
                expert_dropout, gate, aux_input, mix_init, combine,
            )
            for _ in range(layers)
        )
        if identity_init:
            for block in self.blocks:
                for lin in (block.attn.proj, block.mlp.fc2):
                    nn.init.zeros_(lin.weight)
                    nn.init.zeros_(lin.bias)

    def forward(
        self, tokens: Tensor, valid: Tensor | None, modality: str,
        global_pos: Tensor | None = None,
    ) -> tuple[Tensor, list[RoutingStats]]:
        """Transform one modality's token sequences.

        Args:
            tokens: (B, L, D) backbone tokens in the joint space.
            valid: (B, L) bool, True for real tokens, or None when every token is
                real (images): the same result without masking work.
            modality: "image" or "text" (selects the modality gate).
            global_pos: (B,) long, position of each sample's global token (caption
                end-of-text token), read by the auxiliary gate under aux_input
                "context"; None: position 0 (image CLS token).

        Returns:
            (B, L, D) tokens, zero at padded positions (whose input content is
            ignored), and one `RoutingStats` per block (empty without MoE).
        """
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens must have shape (B, L, {self.dim}), got {tuple(tokens.shape)}")
        if valid is not None and (valid.dtype != torch.bool or valid.shape != tokens.shape[:2]):
            raise ValueError(
                f"valid must be None or a bool tensor of shape {tuple(tokens.shape[:2])}, "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        def zero_padding(t: Tensor) -> Tensor:
            if valid is None:
                return t
            return torch.where(valid.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))

        # Padding content (possibly non-finite) must not reach valid positions, not
        # even as 0 * NaN in the masked attention product.
        x = zero_padding(tokens)
        all_stats = []
        for block in self.blocks:
            x, stats = block(x, valid, modality, global_pos)
            if stats is not None:
                all_stats.append(stats)
        return zero_padding(x), all_stats


def fuse_embedding(global_feat: Tensor, head_tokens: Tensor, valid: Tensor | None,
                   mode: str = "sum") -> Tensor:
    """Final embedding of each sample from its global feature and head tokens.

    Args:
        global_feat: (B, D) backbone global feature (image CLS / text EOT).
        head_tokens: (B, L, D) head output.
        valid: (B, L) bool mask of real tokens, or None when all are real.
        mode: "sum" = global + masked mean of head tokens, "mean" = masked
            mean only, "global" = global feature only.

    Returns:
        (B, D) embedding (not normalised). A sample without valid tokens has a
        zero masked mean.
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"unknown embedding fuse mode {mode!r}; expected one of {FUSE_MODES}")
    if mode == "global":
        return global_feat
    if valid is None:
        mean = head_tokens.mean(dim=1)
        return mean if mode == "mean" else global_feat + mean
    weights = valid.unsqueeze(-1).to(head_tokens.dtype)  # B, L, 1
    summed = torch.where(valid.unsqueeze(-1), head_tokens, torch.zeros_like(head_tokens)).sum(dim=1)
    mean = summed / weights.sum(dim=1).clamp(min=1)  # B, D
    return mean if mode == "mean" else global_feat + mean
