"""Masked language modelling through a cross-modal transformer (IRRA's implicit
relation reasoning).

Training only: captions with masked tokens are encoded by the text encoder,
their tokens attend to the image tokens through one cross-attention layer and
a small transformer, and a prediction MLP scores the CLIP vocabulary at every
position. `mask_caption_tokens` builds the masked captions and labels, the loss
is `model.objectives.mlm_loss`. Retrieval never runs this head, so test-time
cost is zero.

Every operation works within one sample: caption b attends only to image b's
tokens and to its own valid tokens (all its positions in IRRA's style), so a
sample's logits do not depend on its batch neighbours
(tests/test_baseline_losses.py checks this).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.clip_model import QuickGELU
from model.comoe import Attention, Mlp
from utils.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, VOCAB_SIZE

__all__ = ["IGNORE_INDEX", "CMT_STYLES", "MLM_FALLBACKS", "CrossAttention", "MLMHead",
           "mask_caption_tokens"]

IGNORE_INDEX = -100  # label of positions that are not predicted (F.cross_entropy's default)
MLM_FALLBACKS = ("random", "first")
CMT_STYLES = ("project", "irra")


def mask_caption_tokens(
    caption_ids: Tensor,
    generator: torch.Generator | None = None,
    select_prob: float = 0.15,
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
    mask_token_id: int = MASK_TOKEN_ID,
    vocab_low: int = 1,
    vocab_high: int = MASK_TOKEN_ID,
    fallback: str = "random",
) -> tuple[Tensor, Tensor]:
    """BERT-style masking of the word tokens of tokenised captions (as IRRA).

    Candidates are the word tokens: ids in ``[vocab_low, vocab_high)`` (by
    default every BPE token, so never padding 0, SOT, EOT or the mask token
    itself, e.g. one put there by text augmentation) before the caption's EOT.
    Each candidate is selected with probability ``select_prob``; a selected
    token becomes ``mask_token_id`` with probability ``mask_prob``, a token
    drawn uniformly from ``[vocab_low, vocab_high)`` with probability
    ``random_prob`` (it may happen to equal the original, as in BERT), and is
    kept otherwise. A caption with no selection gets one, by ``fallback``:
    "random" (if it has a candidate): the candidate with the smallest
    selection draw, i.e. a uniformly random one, replaced by the same 80/10/10
    rule; "first" (IRRA): position 1 becomes the mask token and is labelled
    with its original id, whatever it is (this biases short captions towards
    their first word).

    Args:
        caption_ids: (B, L) long token ids (SOT, words, EOT, zero padding), as
            `utils.tokenizer.tokenize` makes them.
        generator: source of randomness, for reproducibility. The draws are
            made on the generator's device and moved to ``caption_ids``' device,
            so a CPU generator gives the same masks on any device. None uses
            the global RNG of ``caption_ids``' device.
        select_prob: probability that a word token is selected, in (0, 1].
        mask_prob: probability that a selected token becomes the mask token.
        random_prob: probability that a selected token becomes a random token;
            ``mask_prob + random_prob <= 1``, the rest is kept.
        mask_token_id: id written at masked positions.
        vocab_low: smallest candidate / random-replacement id.
        vocab_high: one past the largest candidate / random-replacement id.
        fallback: "random" or "first", see above.

    Returns:
        (masked_ids, labels), both (B, L) long on ``caption_ids``' device:
        the captions with the selected tokens replaced, and the original id at
        the selected positions, `IGNORE_INDEX` (-100) elsewhere.
    """
    if caption_ids.dim() != 2 or caption_ids.dtype != torch.long:
        raise ValueError(
            f"mask_caption_tokens needs caption_ids as a (B, L) long tensor, got "
            f"{caption_ids.dtype} {tuple(caption_ids.shape)}"
        )
    if not 0.0 < select_prob <= 1.0:
        raise ValueError(f"MLM select_prob must be in (0, 1], got {select_prob}")
    if mask_prob < 0.0 or random_prob < 0.0 or mask_prob + random_prob > 1.0:
        raise ValueError(
            f"MLM mask_prob ({mask_prob}) and random_prob ({random_prob}) must be >= 0 "
            f"with a sum <= 1 (the rest of the selected tokens is kept)"
        )
    if not 0 <= vocab_low < vocab_high:
        raise ValueError(f"MLM needs 0 <= vocab_low < vocab_high, got {vocab_low}, {vocab_high}")
    if fallback not in MLM_FALLBACKS:
        raise ValueError(f"MLM fallback must be one of {', '.join(MLM_FALLBACKS)}, got {fallback!r}")

    device = caption_ids.device
    B, L = caption_ids.shape
    draw_device = generator.device if generator is not None else device

    def draw(fn, *args):
        return fn(*args, (B, L), generator=generator, device=draw_device).to(device)

    select_draw = draw(torch.rand)  # B, L in [0, 1)
    action_draw = draw(torch.rand)  # B, L
    random_ids = draw(torch.randint, vocab_low, vocab_high)  # B, L

    positions = torch.arange(L, device=device)
    eot = (caption_ids == EOT_TOKEN_ID).int().argmax(dim=1)  # B, first EOT (0 if none)
    has_eot = (caption_ids == EOT_TOKEN_ID).any(dim=1)
    before_eot = (positions[None, :] < eot[:, None]) | ~has_eot[:, None]  # B, L
    candidate = (caption_ids >= vocab_low) & (caption_ids < vocab_high) & before_eot  # B, L

    selected = candidate & (select_draw < select_prob)  # B, L
    if fallback == "first":
        forced = (positions[None, :] == 1) & ~selected.any(dim=1, keepdim=True)  # B, L
        action_draw = torch.where(forced, torch.full_like(action_draw, -1.0), action_draw)  # masked
    else:
        first_draw = torch.where(candidate, select_draw, torch.full_like(select_draw, 2.0)).argmin(dim=1)  # B
        needs_one = candidate.any(dim=1) & ~selected.any(dim=1)  # B
        forced = needs_one[:, None] & (positions[None, :] == first_draw[:, None])  # B, L
    selected = selected | forced

    to_mask = selected & (action_draw < mask_prob)
    to_random = selected & (action_draw >= mask_prob) & (action_draw < mask_prob + random_prob)
    masked_ids = torch.where(to_mask, torch.full_like(caption_ids, mask_token_id), caption_ids)
    masked_ids = torch.where(to_random, random_ids, masked_ids)
    labels = torch.where(selected, caption_ids, torch.full_like(caption_ids, IGNORE_INDEX))
    return masked_ids, labels



def mlm_capacity(batch_size: int, length: int, select_prob: float) -> int:
    """How many MLM positions a batch of (batch_size, length) captions predicts at.

    A fixed number, so the MLM head has no data-dependent shape (which would make
    the host wait for the GPU every step). At most ``batch_size * (length - 2)``
    tokens are candidates (SOT and EOT never are); each is selected with
    probability ``select_prob``, plus at most one forced pick per caption. The
    capacity is the binomial mean plus 8 standard deviations plus those forced
    picks, capped at the candidate count: a batch selects more with probability
    below 1e-15, and then the last picks (in row-major order) are left out.
    """
    candidates = batch_size * max(length - 2, 0)
    mean = select_prob * candidates
    spread = math.sqrt(candidates * select_prob * (1.0 - select_prob))
    return max(1, min(candidates, math.ceil(mean + 8.0 * spread) + batch_size))


def mlm_positions(labels: Tensor, capacity: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(capacity,) long indices into ``labels.flatten()``: every labelled position first,
    in row-major order, then unlabelled ones as filler (their label is
    ``ignore_index``, so they do not count in the loss). A fixed shape on the device:
    no host sync."""
    flat = labels.flatten()
    n = flat.numel()
    capacity = min(capacity, n)
    rank = torch.arange(n, 0, -1, device=flat.device)  # earlier positions score higher
    score = (flat != ignore_index).long() * (n + 1) + rank
    return score.topk(capacity, sorted=True).indices


class CrossAttention(nn.Module):
    """Multi-head attention of batch-first queries to another sequence's tokens."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if heads < 1 or dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        """queries: (B, L, D), context: (B, N, D) -> (B, L, D).

        Query row b attends to all N tokens of context row b, never to
        another sample's.
        """
        B, L, D = queries.shape
        N = context.shape[1]
        q = self.q(queries).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # B, H, L, hd
        k, v = (
            self.kv(context).view(B, N, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )  # each B, H, N, hd
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class _Block(nn.Module):
    """Pre-LN transformer block: x + SelfAttn(LN(x)), then x + MLP(LN(x)); the MLP
    activation is GELU or, with ``quick_gelu`` (IRRA's CLIP blocks), QuickGELU."""

    def __init__(self, dim: int, heads: int, dropout: float, quick_gelu: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, dropout)
        if quick_gelu:
            self.mlp.act = QuickGELU()

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), valid)
        return x + self.mlp(self.ln_2(x))


class MLMHead(nn.Module):
    """IRRA's cross-modal transformer and masked-token predictor.

    ``x = CrossAttn(ln_pre_t(text), ln_pre_i(image))`` (no residual: the text
    enters only as the queries, so predicting a masked word needs the image),
    then ``cmt_depth`` pre-LN self-attention blocks over the text positions
    (padding masked as keys), ``ln_post``, and the prediction MLP
    Linear(D, D) -> QuickGELU -> LayerNorm -> Linear(D, V).

    ``style`` "irra" reproduces IRRA's blocks exactly: QuickGELU in their MLPs,
    self-attention over all L positions (padding included, so a caption's
    logits also depend on its padding tokens, never on other samples), and
    PyTorch's default init of the linear layers' biases (uniform in
    +-fan_in^-1/2; its attention layers, nn.MultiheadAttention, zero theirs).
    "project" uses GELU, masks padding and zeroes every bias.

    Args:
        dim: token width D of the joint space (512 for ViT-B/16 CLIP).
        vocab_size: number of token ids V to score (the text encoder's).
        heads: attention heads of the cross-attention and the blocks (IRRA:
            D // 64).
        cmt_depth: number of self-attention blocks.
        dropout: dropout of attention and MLP (IRRA: 0).
        style: "project" or "irra", see above.
    """

    def __init__(
        self,
        dim: int,
        vocab_size: int = VOCAB_SIZE,
        heads: int = 8,
        cmt_depth: int = 4,
        dropout: float = 0.0,
        style: str = "project",
    ) -> None:
        super().__init__()
        if cmt_depth < 1:
            raise ValueError(f"MLMHead needs cmt_depth >= 1, got {cmt_depth}")
        if vocab_size < 1:
            raise ValueError(f"MLMHead needs vocab_size >= 1, got {vocab_size}")
        if style not in CMT_STYLES:
            raise ValueError(f"MLMHead style must be one of {', '.join(CMT_STYLES)}, got {style!r}")
        self.dim = dim
        self.vocab_size = vocab_size
        self.mask_padding = style == "project"
        self.ln_pre_t = nn.LayerNorm(dim)
        self.ln_pre_i = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads, dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout, quick_gelu=style == "irra")
                                    for _ in range(cmt_depth))
        self.ln_post = nn.LayerNorm(dim)
        self.dense = nn.Linear(dim, dim)
        self.act = QuickGELU()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, vocab_size)
        self._init_weights(cmt_depth, default_linear_biases=style == "irra")

    def _init_weights(self, depth: int, default_linear_biases: bool) -> None:
        # CLIP's transformer init, as IRRA: input projections ~ D^-1/2,
        # residual output projections further scaled by (2 * depth)^-1/2.
        attn_std = self.dim ** -0.5
        proj_std = attn_std * (2 * depth) ** -0.5
        fc_std = (2 * self.dim) ** -0.5
        stds = {self.cross_attn.q: attn_std, self.cross_attn.kv: attn_std,
                self.cross_attn.proj: proj_std, self.dense: fc_std, self.fc: proj_std}
        for block in self.blocks:
            stds.update({block.attn.qkv: attn_std, block.attn.proj: proj_std,
                         block.mlp.fc1: fc_std, block.mlp.fc2: proj_std})
        for linear, std in stds.items():
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
        if default_linear_biases:
            linears = [self.dense, self.fc] + [fc for block in self.blocks
                                               for fc in (block.mlp.fc1, block.mlp.fc2)]
            for linear in linears:
                bound = linear.in_features ** -0.5  # nn.Linear's own bias init
                nn.init.uniform_(linear.bias, -bound, bound)

    def forward(
        self,
        text_tokens: Tensor,
        image_tokens: Tensor,
        text_valid: Tensor,
        predict_at: Tensor | None = None,
    ) -> Tensor:
        """Score the vocabulary at the caption positions.

        Args:
            text_tokens: (B, L, D) text-encoder tokens of the masked captions.
            image_tokens: (B, N, D) image-encoder tokens (CLS and patches) of
                the paired images.
            text_valid: (B, L) bool, True for SOT .. EOT (padding is never
                attended to, except in style "irra").
            predict_at: optional; when given only these positions go through
                the prediction MLP, which spares the (B, L, V) logits of the
                unlabelled positions. Either a (B, L) bool mask (e.g.
                ``labels != -100``; a data-dependent shape, so the host waits
                for the GPU) or (M,) long indices into the flattened (B*L)
                positions (a fixed shape, see `mlm_positions`).

        Returns:
            (B, L, V) logits, or (M, V) at the selected positions: the True
            ones of a mask in row-major order (matching ``labels[predict_at]``),
            or the given indices in their order.
        """
        if text_tokens.dim() != 3 or text_tokens.shape[-1] != self.dim:
            raise ValueError(f"text_tokens must have shape (B, L, {self.dim}), got {tuple(text_tokens.shape)}")
        if image_tokens.dim() != 3 or image_tokens.shape[0] != text_tokens.shape[0] \
                or image_tokens.shape[-1] != self.dim:
            raise ValueError(
                f"image_tokens must have shape ({text_tokens.shape[0]}, N, {self.dim}), "
                f"got {tuple(image_tokens.shape)}"
            )
        if text_valid.dtype != torch.bool or text_valid.shape != text_tokens.shape[:2]:
            raise ValueError(
                f"text_valid must be a bool tensor of shape {tuple(text_tokens.shape[:2])}, "
                f"got {text_valid.dtype} {tuple(text_valid.shape)}"
            )
        x = self.cross_attn(self.ln_pre_t(text_tokens), self.ln_pre_i(image_tokens))  # B, L, D
        for block in self.blocks:
            x = block(x, text_valid if self.mask_padding else None)
        x = self.ln_post(x)
        if predict_at is not None:
            if predict_at.dtype == torch.long and predict_at.dim() == 1:
                x = x.flatten(0, 1)[predict_at]  # M, D (a gather: no sync)
            elif predict_at.dtype == torch.bool and predict_at.shape == text_valid.shape:
                x = x[predict_at]  # M, D
            else:
                raise ValueError(
                    f"predict_at must be a bool tensor of shape {tuple(text_valid.shape)} or "
                    f"1-d long indices, got {predict_at.dtype} {tuple(predict_at.shape)}"
                )
        return self.fc(self.ln(self.act(self.dense(x))))  # ..., V
