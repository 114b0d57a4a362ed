"""The retrieval model: CLIP backbone, optional CoMoE head, and the loss terms.

`forward(batch)` returns a dict of named, already weighted loss terms; the
trainer sums them and meters each by name. `encode_image` / `encode_text` give
the retrieval embeddings, each sample computed on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from utils import comm
from utils.config import ConfigError
from utils.errors import UserError

from . import objectives
from .clip_model import CLIP, backbone_state, build_clip, infer_arch
from .comoe import CoMoEHead, fuse_embedding
from .irra import convert_weights_to_fp16
from .mlm import MLMHead, mask_caption_tokens, mlm_capacity, mlm_positions

KNOWN_LOSSES = ("sdm", "itc", "coar", "id", "cmpm", "mlm")


@dataclass
class LossConfig:
    names: tuple[str, ...] = ("sdm", "itc", "coar")
    weights: dict[str, float] = field(default_factory=dict)
    lambda_align: float = 0.1
    balance: str = "joint"
    temperature: float = 0.02
    mlm_select_prob: float = 0.15
    mlm_mask_prob: float = 0.8
    mlm_random_prob: float = 0.1
    mlm_fallback: str = "random"
    mlm_masks_captions: bool = False  # every loss sees the MLM-masked captions (IRRA)
    cmt_depth: int = 4
    cmt_style: str = "project"


def parse_loss_names(names: str, has_head: bool) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in names.split("+") if p.strip())
    if not parts:
        raise ValueError("loss.names is empty; use e.g. sdm+itc+coar")
    unknown = [p for p in parts if p not in KNOWN_LOSSES]
    if unknown:
        raise ValueError(f"loss.names: unknown loss {', '.join(unknown)} "
                         f"(known: {', '.join(KNOWN_LOSSES)})")
    if "coar" in parts and not has_head:
        raise ValueError("loss.names has 'coar' but model.head is none: CoAR regularises the "
                         "CoMoE router; set model.head=comoe or drop coar")
    return parts


def _summed_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` summed over the ranks (no autograd)."""
    out = x.contiguous().clone()
    dist.all_reduce(out)
    return out


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order. Every rank computes the loss on the whole gathered
    batch, so the gradient of a rank's own rows is the sum over ranks of the gradient of
    their copy; DDP's averaging then gives the single-process gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _summed_over_ranks(grad)[ctx.rows]


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks; the gradient is summed over ranks too (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _summed_over_ranks(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _summed_over_ranks(grad)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to their owners."""
    if comm.get_world_size() == 1:
        return x
    return _GatherRows.apply(x)


def _gather_pair(image_feats: torch.Tensor, text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_gather` of both modalities' (B, D) features in one collective."""
    if comm.get_world_size() == 1:
        return image_feats, text_feats
    dtype = torch.promote_types(image_feats.dtype, text_feats.dtype)
    both = _gather(torch.stack([image_feats.to(dtype), text_feats.to(dtype)], dim=1))  # world*B, 2, D
    return both[:, 0], both[:, 1]


def _all_reduce_stats(image_stats: list, text_stats: list) -> tuple[list, list]:
    """Sum every layer's routing statistics of both modalities over the ranks.

    One all-reduce in all: each layer's fields are packed into a row of
    ``prob_sum | counts | num_tokens`` (2E + 1 values), so the step issues one
    collective (and one more in backward, for prob_sum's gradient) instead of three
    per layer and modality. prob_sum's gradient flows back through it; the counts do
    not need one.
    """
    if comm.get_world_size() == 1 or not image_stats + text_stats:
        return image_stats, text_stats
    stats = [*image_stats, *text_stats]
    rows = torch.stack([torch.cat([s.prob_sum.float(), s.counts.detach().float(),
                                   s.num_tokens.detach().float().reshape(1)]) for s in stats])
    rows = _SumOverRanks.apply(rows)  # layers x modalities, 2E + 1
    num_experts = stats[0].num_experts
    summed = [type(s)(prob_sum=row[:num_experts], counts=row[num_experts:2 * num_experts].detach(),
                      num_tokens=row[2 * num_experts].detach()) for s, row in zip(stats, rows)]
    return summed[:len(image_stats)], summed[len(image_stats):]


def text_valid_mask(caption_ids: torch.Tensor) -> torch.Tensor:
    """True for SOT .. EOT of each caption, False for the padding after it. # B, L"""
    eot = caption_ids.argmax(dim=-1)  # the EOT id is the largest in the vocabulary
    positions = torch.arange(caption_ids.shape[1], device=caption_ids.device)
    return positions[None, :] <= eot[:, None]


class RetrievalModel(nn.Module):
    def __init__(self, backbone: CLIP, head: CoMoEHead | None, embed: str, losses: LossConfig,
                 num_classes: int | None = None, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embed_mode = embed
        self.losses = losses
        self.num_classes = num_classes
        # SDM and ITC use a fixed temperature (model.temperature, 0.02 as in IRRA); CLIP's
        # learnable scale is unused.
        self.backbone.logit_scale.requires_grad_(False)
        self.logit_scale = 1.0 / losses.temperature
        dim = backbone.embed_dim
        self.classifier = None
        if "id" in losses.names:
            if not num_classes:
                raise ValueError("the 'id' loss needs num_classes (training identities)")
            self.classifier = nn.Linear(dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        self.mlm_head = None
        if "mlm" in losses.names:
            self.mlm_head = MLMHead(dim, vocab_size=backbone.vocab_size, heads=max(1, dim // 64),
                                    cmt_depth=losses.cmt_depth, style=losses.cmt_style)
        if freeze_backbone:
            for param in self.backbone.parameters():
                param.requires_grad_(False)

    # -- embeddings ---------------------------------------------------------
    def image_features(self, images: torch.Tensor, return_tokens: bool = False):
        """Embeddings (B, D) and per-layer routing statistics of a batch of images
        (and the backbone's token sequence, B x 1+N x D, with `return_tokens`)."""
        tokens, global_feat = self.backbone.encode_image(images)  # B, 1+N, D ; B, D
        if self.head is None:
            out = global_feat, []
        else:
            head_tokens, stats = self.head(tokens, None, "image")  # no padding in images
            out = fuse_embedding(global_feat, head_tokens, None, self.embed_mode), stats
        return (*out, tokens) if return_tokens else out

    def text_features(self, caption_ids: torch.Tensor):
        """Embeddings (B, D) and per-layer routing statistics of tokenised captions."""
        tokens, global_feat = self.backbone.encode_text(caption_ids)  # B, L, D ; B, D
        if self.head is None:
            return global_feat, []
        valid = text_valid_mask(caption_ids)
        eot = caption_ids.argmax(dim=-1)  # B; the EOT id is the largest in the vocabulary
        head_tokens, stats = self.head(tokens, valid, "text", global_pos=eot)
        return fuse_embedding(global_feat, head_tokens, valid, self.embed_mode), stats

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_features(images)[0]

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor:
        return self.text_features(caption_ids)[0]

    # -- training -----------------------------------------------------------
    def forward(self, batch: dict, return_metrics: bool = False):
        """Weighted loss terms of one training batch (all ranks' batches under DDP).

        With `return_metrics`, also a dict of detached training accuracies, kept
        apart so that nothing sums them into the loss: `img_acc` / `txt_acc` (ID
        head, this rank's batch) and `mlm_acc` (masked tokens predicted right).
        """
        names, weights = self.losses.names, self.losses.weights
        caption_ids, masked = batch["caption_ids"], None
        if self.losses.mlm_masks_captions:
            # IRRA's dataset masks its captions in place (a NumPy view shares their
            # memory), so every loss reads the masked captions, not only the MLM.
            masked = self._mask_captions(caption_ids)
            caption_ids = masked[0]
        image_feats, image_stats, image_tokens = self.image_features(batch["images"],
                                                                     return_tokens=True)
        text_feats, text_stats = self.text_features(caption_ids)
        pids = batch["pids"]
        (all_image, all_text), all_pids = _gather_pair(image_feats, text_feats), _gather(pids)
        out: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        if "sdm" in names:
            out["sdm"] = weights.get("sdm", 1.0) * objectives.sdm_loss(
                all_image, all_text, all_pids, self.logit_scale)
        if "itc" in names:
            out["itc"] = weights.get("itc", 1.0) * objectives.itc_loss(
                all_image, all_text, self.logit_scale)
        if "coar" in names:
            coar = objectives.coar_loss(*_all_reduce_stats(image_stats, text_stats),
                                        lambda_align=self.losses.lambda_align,
                                        balance=self.losses.balance)
            out["coar"] = weights.get("coar", 1.0) * coar["total"]
        if "id" in names:
            image_logits, text_logits = objectives.id_logits(self.classifier, image_feats,
                                                             text_feats)
            out["id"] = weights.get("id", 1.0) * objectives.id_loss(image_logits, text_logits, pids)
            if return_metrics:
                metrics["img_acc"] = objectives.accuracy(image_logits.detach(), pids)
                metrics["txt_acc"] = objectives.accuracy(text_logits.detach(), pids)
        if "cmpm" in names:
            out["cmpm"] = weights.get("cmpm", 1.0) * objectives.cmpm_loss(
                all_image, all_text, all_pids)
        if "mlm" in names:
            if masked is None:
                masked = self._mask_captions(caption_ids)
            logits, labels = self._mlm(*masked, image_tokens)
            out["mlm"] = weights.get("mlm", 1.0) * objectives.mlm_loss(logits, labels)
            if return_metrics:
                metrics["mlm_acc"] = objectives.accuracy(logits.detach(), labels)
        return (out, metrics) if return_metrics else out

    def _mask_captions(self, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked_ids, labels) of the MLM loss, both (B, L)."""
        cfg = self.losses
        return mask_caption_tokens(caption_ids, None, cfg.mlm_select_prob, cfg.mlm_mask_prob,
                                   cfg.mlm_random_prob, fallback=cfg.mlm_fallback)

    def _mlm(self, masked_ids: torch.Tensor, labels: torch.Tensor, image_tokens: torch.Tensor):
        """IRRA's masked language modelling: masked captions read the image tokens.

        Returns the (M, V) logits at M fixed positions and their (M,) labels
        (IGNORE_INDEX at the filler positions)."""
        cfg = self.losses
        text_tokens, _ = self.backbone.encode_text(masked_ids)  # B, L, D
        # A fixed number of positions (the labelled ones, then filler that the loss
        # ignores): no data-dependent shape, so the step does not wait for the GPU.
        capacity = mlm_capacity(*masked_ids.shape, cfg.mlm_select_prob)
        positions = mlm_positions(labels, capacity)  # M
        logits = self.mlm_head(text_tokens, image_tokens, text_valid_mask(masked_ids),
                               predict_at=positions)  # M, V
        return logits, labels.flatten()[positions]


def build_model(cfg, num_classes: int | None = None,
                checkpoint_state: Mapping[str, torch.Tensor] | None = None) -> RetrievalModel:
    """Translate a resolved config into a RetrievalModel.

    `checkpoint_state`: the state dict that will be loaded into the model next (a
    run's checkpoint holds every weight). The backbone is then built from its shapes
    (and `model.arch`) without reading `model.pretrain`, so a run can be evaluated
    or resumed after the CLIP file is gone.

    Raises ConfigError when the config's values do not make a model (e.g. moe.topk
    above moe.num_experts).
    """
    try:
        return _build_model(cfg, num_classes, checkpoint_state)
    except ValueError as err:  # every module argument comes from the config
        if isinstance(err, UserError):
            raise
        raise ConfigError(f"the model cannot be built from this config: {err}") from err


def _backbone_arch(checkpoint_state: Mapping[str, torch.Tensor], overrides: Mapping) -> dict:
    """CLIP architecture of a RetrievalModel state dict, as `build_clip` infers it from
    a weights file; `model.arch` overrides it there and here."""
    return {**infer_arch(backbone_state(checkpoint_state)), **overrides}


def _build_model(cfg, num_classes: int | None,
                 checkpoint_state: Mapping[str, torch.Tensor] | None) -> RetrievalModel:
    common = dict(image_size=tuple(cfg.input.size), stride=cfg.model.stride)
    random_init = str(cfg.model.pretrain).lower() == "none"
    if checkpoint_state is None or random_init:
        backbone = build_clip(cfg.model.pretrain, cache_dir=cfg.model.cache_dir or None,
                              interpolation=cfg.input.interpolation, **common,
                              **dict(cfg.model.arch))
    else:  # the architecture build_clip reads from the weights file, from the checkpoint
        backbone = build_clip("none", **common,
                              **_backbone_arch(checkpoint_state, dict(cfg.model.arch)))
    if cfg.model.grad_checkpointing:
        for transformer in (backbone.visual.transformer, backbone.transformer):
            transformer.grad_checkpointing = True
    head = None
    if cfg.model.head == "comoe":
        m = cfg.moe
        head = CoMoEHead(dim=backbone.embed_dim, layers=m.layers, heads=m.heads,
                         num_experts=m.num_experts, topk=m.topk, reduction=m.reduction,
                         mlp_ratio=m.mlp_ratio, dropout=m.dropout,
                         expert_dropout=m.expert_dropout, gate=m.gate, aux_input=m.aux_input,
                         mix_init=m.mix_init, combine=m.combine)
    names = parse_loss_names(cfg.loss.names, head is not None)
    weights = {name: float(cfg.loss[f"{name}_weight"]) for name in names}
    losses = LossConfig(names=names, weights=weights, lambda_align=cfg.loss.lambda_align,
                        balance=cfg.moe.balance,
                        temperature=cfg.model.temperature,
                        mlm_select_prob=cfg.loss.mlm_select_prob,
                        mlm_mask_prob=cfg.loss.mlm_mask_prob,
                        mlm_random_prob=cfg.loss.mlm_random_prob,
                        mlm_fallback=cfg.loss.mlm_fallback,
                        mlm_masks_captions=cfg.loss.mlm_masks_captions,
                        cmt_depth=cfg.model.cmt_depth, cmt_style=cfg.model.cmt_style)
    model = RetrievalModel(backbone, head, cfg.model.embed, losses, num_classes=num_classes,
                           freeze_backbone=cfg.model.freeze_backbone)
    if cfg.solver.fp16_weights:
        convert_weights_to_fp16(model)
    return model
