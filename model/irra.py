"""What this codebase needs to match IRRA's code (Jiang & Ye, CVPR 2023): its
parameter names, its checkpoints, and its fp16 weights.

Names. IRRA's model calls its parts ``base_model`` (CLIP, OpenAI names),
``classifier``, ``cross_attn``, ``cross_modal_transformer.resblocks.N``,
``ln_pre_t``, ``ln_pre_i``, ``ln_post`` and ``mlm_head.{dense,ln,fc}``. Here the
same parts are ``backbone``, ``classifier`` and ``mlm_head.*``
(`model.mlm.MLMHead`). One table maps the names both ways: IRRA's optimizer
rules read IRRA's names (`solver.build`), and IRRA's checkpoints load through
it (`from_irra_state_dict`).

Weights. `convert_weights_to_fp16` is the legacy fp16-weights mode
(``solver.fp16_weights``): the one place where weights leave fp32.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import Tensor, nn

from utils.checkpoint import strip_module_prefix

from .clip_model import CheckpointMismatchError
from .moe import ExpertPool

__all__ = ["convert_weights_to_fp16", "from_irra_checkpoint", "from_irra_state_dict", "irra_name",
           "is_irra_state_dict"]

# What each placeholder of NAME_TABLE stands for; it is the same text on both sides.
_PLACEHOLDERS = {
    "rest": r".+",
    "i": r"\d+",
    "wb": r"weight|bias",
    "pre_post": r"ln_pre_t|ln_pre_i|ln_post",
    "block_ln": r"ln_1|ln_2",
    "predictor": r"dense|ln|fc",
}

# (IRRA's parameter name, this codebase's). IRRA's cross-attention packs the query,
# key and value projections into one tensor (nn.MultiheadAttention's in_proj); here
# the query projection `q` holds its first third and `kv` the rest.
NAME_TABLE = (
    ("base_model.{rest}", "backbone.{rest}"),
    ("classifier.{wb}", "classifier.{wb}"),
    ("{pre_post}.{wb}", "mlm_head.{pre_post}.{wb}"),
    ("cross_attn.in_proj_{wb}", "mlm_head.cross_attn.q.{wb}"),
    ("cross_attn.in_proj_{wb}", "mlm_head.cross_attn.kv.{wb}"),
    ("cross_attn.out_proj.{wb}", "mlm_head.cross_attn.proj.{wb}"),
    ("cross_modal_transformer.resblocks.{i}.attn.in_proj_{wb}", "mlm_head.blocks.{i}.attn.qkv.{wb}"),
    ("cross_modal_transformer.resblocks.{i}.attn.out_proj.{wb}", "mlm_head.blocks.{i}.attn.proj.{wb}"),
    ("cross_modal_transformer.resblocks.{i}.{block_ln}.{wb}", "mlm_head.blocks.{i}.{block_ln}.{wb}"),
    ("cross_modal_transformer.resblocks.{i}.mlp.c_fc.{wb}", "mlm_head.blocks.{i}.mlp.fc1.{wb}"),
    ("cross_modal_transformer.resblocks.{i}.mlp.c_proj.{wb}", "mlm_head.blocks.{i}.mlp.fc2.{wb}"),
    ("mlm_head.{predictor}.{wb}", "mlm_head.{predictor}.{wb}"),
)
_SPLIT_QUERY = "mlm_head.cross_attn.q."  # takes the first third of IRRA's packed in_proj


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, placeholder, literal, ...
    return re.compile("".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
                              for i, part in enumerate(parts)))


_RULES = tuple((_pattern(irra), irra, _pattern(ours), ours) for irra, ours in NAME_TABLE)


def irra_name(name: str) -> str | None:
    """IRRA's name of this codebase's parameter `name`, or None when IRRA has no such
    parameter (e.g. the CoMoE head)."""
    for _, irra, ours_pattern, _ in _RULES:
        match = ours_pattern.fullmatch(name)
        if match:
            return irra.format(**match.groupdict())
    return None


def _our_names(name: str) -> list[str]:
    """This codebase's names of IRRA's parameter `name` (two for a packed in_proj)."""
    out = []
    for irra_pattern, _, _, ours in _RULES:
        match = irra_pattern.fullmatch(name)
        if match:
            out.append(ours.format(**match.groupdict()))
    return out


def is_irra_state_dict(state: Mapping[str, Tensor]) -> bool:
    """True for a state dict written by IRRA's code (its CLIP lives under ``base_model.``)."""
    return any(key.startswith("base_model.") for key in strip_module_prefix(state))


def from_irra_state_dict(state: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """IRRA's model state dict (``module.`` prefixes allowed) in this codebase's names.

    Tensors keep their dtype (IRRA's are mostly fp16; loading casts them to the
    model's). IRRA's CLIP has no ``logit_scale`` (its temperature is fixed, as here);
    this codebase keeps CLIP's unused, frozen one, so it is filled in with CLIP's
    initial value. Raises CheckpointMismatchError naming every key the table does not
    know and every packed projection whose rows do not split in three.
    """
    out: dict[str, Tensor] = {}
    unknown, unsplittable = [], []
    for key, value in strip_module_prefix(state).items():
        names = _our_names(key)
        if not names:
            unknown.append(key)
        elif len(names) == 1:
            out[names[0]] = value
        elif value.shape[0] % 3:
            unsplittable.append(f"{key} {tuple(value.shape)}")
        else:
            width = value.shape[0] // 3
            for name in names:
                out[name] = value[:width] if name.startswith(_SPLIT_QUERY) else value[width:]
    if unknown or unsplittable:
        lines = [f"{source} looks like an IRRA checkpoint (base_model.* keys) but does not map "
                 f"onto this codebase's names:"]
        if unknown:
            lines.append(f"  unknown keys ({len(unknown)}): " + ", ".join(unknown))
        if unsplittable:
            lines.append("  packed q/k/v projections whose rows are not a multiple of 3: "
                         + ", ".join(unsplittable))
        raise CheckpointMismatchError("\n".join(lines))
    out.setdefault("backbone.logit_scale", torch.tensor(math.log(1 / 0.07)))
    return out


def from_irra_checkpoint(ckpt: Mapping, source: str = "checkpoint") -> dict:
    """A ``best.pth`` written by IRRA's code (``{"model": state dict, "optimizer",
    "scheduler", "epoch", ...}``) as a checkpoint of this codebase to evaluate or
    fine-tune from: the model in this codebase's names and the number of training
    identities read off the ID classifier (None without one). IRRA's optimizer and
    scheduler states do not fit this codebase's and are left out."""
    model = from_irra_state_dict(ckpt["model"], source)
    classifier = model.get("classifier.weight")
    return {"model": model, "epoch": ckpt.get("epoch"),
            "num_classes": None if classifier is None else classifier.shape[0]}


# -- fp16 weights ------------------------------------------------------------

# Parameters that IRRA's convert_weights casts besides those of linear and
# convolution layers: nn.MultiheadAttention's packed input projection (here
# model.clip_model.SelfAttention holds it under the same names) and CLIP's output
# projections.
_FP16_ATTRIBUTES = ("in_proj_weight", "in_proj_bias", "proj", "text_projection")


def _layer_norm_in_fp32(module: nn.LayerNorm, args: tuple) -> tuple:
    return (args[0].float(),)


def _layer_norm_output_in_fp16(module: nn.LayerNorm, args: tuple, output: Tensor) -> Tensor:
    return output.half()


def convert_weights_to_fp16(model: nn.Module) -> nn.Module:
    """IRRA's fp16 weights on this codebase's modules, in place (solver.fp16_weights).

    IRRA's ``convert_weights`` runs over its whole model (CLIP, ID classifier,
    cross-modal transformer and MLM head) and casts to fp16 the weight and bias of
    every linear and convolution layer, the packed q/k/v projection of every
    attention layer, and CLIP's ``proj`` and ``text_projection``. The same here, and
    the experts of every MoE layer (linear layers in the CoMoE authors' code, whatever
    their storage here). LayerNorm parameters, the embeddings (token, position,
    class) and the other free parameters (router prompt and mixing weight, logit
    scale) stay fp32.

    Every op then runs on fp16 activations: the encoders cast their input (images,
    token embeddings) to the weights' dtype, and each LayerNorm computes in fp32 and
    returns fp16, as IRRA's LayerNorm subclass does (its input is fp16 everywhere in
    an fp16 model). Adam then keeps its moments in the parameters' dtype, so fp16
    weights are updated by fp16 arithmetic with no fp32 master copy, as in IRRA.
    """
    for module in model.modules():
        params = []
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            params += [module.weight, module.bias]
        if isinstance(module, ExpertPool):
            params += list(module.parameters())
        params += [getattr(module, name, None) for name in _FP16_ATTRIBUTES]
        for param in params:
            if isinstance(param, nn.Parameter):
                param.data = param.data.half()
        if isinstance(module, nn.LayerNorm):
            module.register_forward_pre_hook(_layer_norm_in_fp32)
            module.register_forward_hook(_layer_norm_output_in_fp16)
    return model
