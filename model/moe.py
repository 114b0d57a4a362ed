"""Token-level mixture of experts shared by the image and text branches.

A `MoELayer` holds one `ExpertPool` (bottleneck adapters used by both
modalities) and one `Router`. Router logits for a token ``h`` of modality
``m`` are::

    z = (1 - a) * G_m(h) + a * G_aux(u)

with ``G_m`` a modality-specific linear gate, ``G_aux`` an auxiliary gate
shared by both modalities, ``u`` a learned per-layer vector ("prompt"), the
token's own sample's global token ("context": image CLS / caption end-of-text
token) or the token itself ("token"), and ``a = sigmoid(alpha)`` a learnable
mixing weight. Each token goes to the top-k experts; the combine weights are
the softmax over the k selected logits ("renorm") or the selected experts'
full-softmax probabilities ("prob"). The gate modes "modality" (no auxiliary
gate) and "shared" (one gate for both modalities, no auxiliary gate) exist for
ablations.

Routing is strictly per token: there is no capacity limit and no token
dropping, so a token's experts and output never depend on other tokens (or
other samples) in the batch; the "context" input is the token's own sample's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUX_INPUTS",
    "COMBINE_MODES",
    "GATE_MODES",
    "MODALITIES",
    "ExpertPool",
    "MoELayer",
    "MoETokenOutput",
    "Router",
    "RouterOutput",
    "RoutingStats",
    "modality_index",
]

GATE_MODES = ("modality+aux", "modality", "shared")
AUX_INPUTS = ("prompt", "context", "token")
COMBINE_MODES = ("renorm", "prob")
MODALITIES = ("image", "text")

# Gate weights ~ N(0, 0.02^2): for layer-normed tokens (unit variance per
# feature) this gives logits with std 0.02 * sqrt(D) (~0.45 at D=512), enough
# to break ties so different tokens pick different experts at initialisation,
# while the router softmax stays close to uniform (balance loss ~1).
GATE_INIT_STD = 0.02


def modality_index(modality: str | int, num_modalities: int = len(MODALITIES)) -> int:
    """Map a modality name ("image" / "text") or index to its gate index."""
    if isinstance(modality, str):
        if modality not in MODALITIES[:num_modalities]:
            raise ValueError(
                f"unknown modality {modality!r}; expected one of {MODALITIES[:num_modalities]}"
            )
        return MODALITIES.index(modality)
    if isinstance(modality, int) and not isinstance(modality, bool) and 0 <= modality < num_modalities:
        return modality
    raise ValueError(
        f"modality must be one of {MODALITIES[:num_modalities]} or an index in "
        f"[0, {num_modalities}), got {modality!r}"
    )


@dataclass
class RoutingStats:
    """Routing statistics of one MoE layer for one modality.

    All fields are sums over the routed (valid) tokens, so statistics from
    several forward passes or ranks combine by addition (``a + b``, or an
    all-reduce of each field). `RoutingStats.stack` puts several layers' stats
    in one object with a leading layer dimension (prob_sum and counts (n, E),
    num_tokens (n,)); every method below works on either form.

    Attributes:
        prob_sum: (E,) sum over tokens of the router softmax over all experts;
            differentiable (the balance and alignment losses train the router
            through it).
        counts: (E,) float, number of top-k selections of each expert; no grad.
            ``counts.sum() == k * num_tokens``.
        num_tokens: () float, number of routed tokens; no grad.
    """

    prob_sum: Tensor
    counts: Tensor
    num_tokens: Tensor

    @property
    def num_experts(self) -> int:
        return self.prob_sum.shape[-1]

    def __add__(self, other: RoutingStats) -> RoutingStats:
        if not isinstance(other, RoutingStats):
            return NotImplemented
        if other.num_experts != self.num_experts:
            raise ValueError(
                f"cannot add RoutingStats over {self.num_experts} and {other.num_experts} experts"
            )
        return RoutingStats(
            prob_sum=self.prob_sum + other.prob_sum,
            counts=self.counts + other.counts,
            num_tokens=self.num_tokens + other.num_tokens,
        )

    @classmethod
    def stack(cls, stats: Sequence[RoutingStats]) -> RoutingStats:
        """Several layers' stats as one, with a leading layer dimension."""
        if not stats:
            raise ValueError("RoutingStats.stack needs at least one RoutingStats")
        if len({s.prob_sum.shape for s in stats}) != 1:
            raise ValueError("RoutingStats.stack needs stats over the same number of experts, got "
                             f"{[s.num_experts for s in stats]}")
        return cls(prob_sum=torch.stack([s.prob_sum for s in stats]),
                   counts=torch.stack([s.counts for s in stats]),
                   num_tokens=torch.stack([s.num_tokens for s in stats]))

    def mean_probs(self) -> Tensor:
        """(..., E) mean router probability per expert, P_e (differentiable)."""
        return self.prob_sum / self.num_tokens.clamp(min=1).unsqueeze(-1)

    def usage(self) -> Tensor:
        """(..., E) fraction of routed assignments that chose each expert, f_e (sums to 1)."""
        return self.counts / self.counts.sum(dim=-1, keepdim=True).clamp(min=1)


class ExpertPool(nn.Module):
    """`num_experts` bottleneck adapters D -> H -> D (H = D // reduction, GELU, dropout)
    shared by both modalities, stored stacked and run together.

    Parameters: ``down.weight`` (E, D, H), ``down.bias`` (E, H), ``up.weight`` (E, H, D),
    ``up.bias`` (E, D); expert e maps x (D,) to
    ``dropout(gelu(x @ down.weight[e] + down.bias[e])) @ up.weight[e] + up.bias[e]``.
    The up-projection is zero-initialised, so a fresh pool outputs zeros. Checkpoints
    written with one ``nn.Linear`` pair per expert (``experts.<e>.down.weight`` ...)
    are converted when loaded.
    """

    def __init__(self, dim: int, num_experts: int, reduction: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        hidden = dim // reduction
        if reduction < 1 or hidden < 1:
            raise ValueError(
                f"expert reduction must satisfy 1 <= reduction <= dim (dim={dim}), got {reduction}"
            )
        self.num_experts = num_experts
        self.dropout = dropout
        # Names ending in .weight / .bias, like nn.Linear's, so that the optimizer's
        # rules for biases (lr factor, no weight decay) apply to the stacked biases.
        self.down = nn.ParameterDict({"weight": nn.Parameter(torch.empty(num_experts, dim, hidden)),
                                      "bias": nn.Parameter(torch.zeros(num_experts, hidden))})
        self.up = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(num_experts, hidden, dim)),
                                    "bias": nn.Parameter(torch.zeros(num_experts, dim))})
        nn.init.trunc_normal_(self.down.weight, std=0.02)
        self.register_load_state_dict_pre_hook(_stack_per_expert_state)

    def forward(self, x: Tensor, selected: Tensor, weights: Tensor) -> Tensor:
        """Run every token through its selected experts and combine.

        Args:
            x: (N, D) tokens.
            selected: (N, k) long, expert index per routing slot.
            weights: (N, k) combine weights.

        Returns:
            (N, D): ``sum_j weights[n, j] * expert_{selected[n, j]}(x[n])`` in
            ``x.dtype``.
        """
        # Dense dispatch: every expert sees every token and unselected experts get
        # weight 0. Experts are small bottlenecks (2 D^2/r FLOPs a token each), so
        # this costs little, and it has no data-dependent shapes: no host-device
        # sync, torch.compile-friendly, and every expert stays in the autograd
        # graph (DDP needs no find_unused_parameters).
        #
        # All E experts run as one bottleneck of width E*H: one matmul for the
        # down-projections, each expert's hidden units scaled by its combine weight,
        # and one matmul for the up-projections that also sums the experts (fp32
        # accumulation).
        n, dim = x.shape
        num_experts, hidden_dim = self.down.bias.shape
        combine = torch.zeros(n, num_experts, dtype=torch.float32, device=x.device)  # N, E
        combine.scatter_(1, selected, weights.float())
        down = self.down.weight.transpose(0, 1).reshape(dim, num_experts * hidden_dim)  # D, E*H
        hidden = torch.addmm(self.down.bias.flatten(), x, down)  # N, E*H
        hidden = F.dropout(F.gelu(hidden), self.dropout, self.training)
        hidden = hidden.view(n, num_experts, hidden_dim) * combine.unsqueeze(2).to(hidden.dtype)
        # The up-projections' biases ride along as E extra rows of the weight, fed the
        # combine weights, so the same matmul adds sum_e combine[n, e] * up.bias[e].
        hidden = torch.cat([hidden.flatten(1), combine.to(hidden.dtype)], dim=1)  # N, E*H + E
        up = torch.cat([self.up.weight.flatten(0, 1), self.up.bias])  # E*H + E, D
        return torch.mm(hidden, up).to(x.dtype)  # N, D

    def extra_repr(self) -> str:
        num_experts, dim, hidden = self.down.weight.shape
        return f"num_experts={num_experts}, dim={dim}, hidden={hidden}, dropout={self.dropout}"


def _stack_per_expert_state(module: ExpertPool, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: convert the per-expert layout of older checkpoints,
    ``experts.<e>.{down,up}.{weight,bias}`` with nn.Linear's (out, in) weights, into
    the stacked parameters, in place. Incomplete sets are left for the load to report."""
    old_prefix = f"{prefix}experts."
    count = sum(key.startswith(old_prefix) for key in state_dict) // 4
    names = [f"{layer}.{param}" for layer in ("down", "up") for param in ("weight", "bias")]
    keys = {name: [f"{old_prefix}{e}.{name}" for e in range(count)] for name in names}
    if count == 0 or not all(key in state_dict for group in keys.values() for key in group):
        return
    for name, group in keys.items():
        tensors = [state_dict.pop(key) for key in group]
        if name.endswith("weight"):
            tensors = [t.t() for t in tensors]  # (out, in) -> (in, out)
        state_dict[f"{prefix}{name}"] = torch.stack(tensors)


class RouterOutput(NamedTuple):
    logits: Tensor  # ..., E fp32 router logits z
    probs: Tensor  # ..., E softmax(z) over all experts
    selected: Tensor  # ..., k long, top-k experts in descending logit order
    weights: Tensor  # ..., k combine weights (see Router's `combine`)


class Router(nn.Module):
    """Top-k router with modality-specific and auxiliary gates.

    Args:
        dim: token width D.
        num_experts: E.
        topk: experts per token, 1 <= k <= E.
        gate: "modality+aux" (CoMoE: per-modality gates mixed with a shared
            auxiliary gate), "modality" (per-modality gates only) or "shared"
            (one gate for every modality).
        aux_input: input u of the auxiliary gate (only used by gate
            "modality+aux"): "prompt" (a learned per-layer D-vector shared by
            both modalities, so the auxiliary logits act as a learned bias),
            "context" (the token's own sample's global token, passed to
            `forward`) or "token" (the token itself: the mixed router is then
            one linear map of the token, a reparameterised modality gate).
        mix_init: initial mixing weight a in (0, 1); a = sigmoid(alpha).
        num_modalities: number of modality-specific gates.
        combine: combine weights of the k selected experts, "renorm" (softmax
            over the k selected logits) or "prob" (their probabilities under the
            softmax over all E logits, not renormalised; at k = 1 "renorm" gives
            the constant 1, so only "prob" lets the task loss train the router).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        topk: int,
        gate: str = "modality+aux",
        aux_input: str = "prompt",
        mix_init: float = 0.5,
        num_modalities: int = len(MODALITIES),
        combine: str = "renorm",
    ) -> None:
        super().__init__()
        if gate not in GATE_MODES:
            raise ValueError(f"unknown router gate {gate!r}; expected one of {GATE_MODES}")
        if aux_input not in AUX_INPUTS:
            raise ValueError(f"unknown router aux_input {aux_input!r}; expected one of {AUX_INPUTS}")
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown router combine {combine!r}; expected one of {COMBINE_MODES}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= topk <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
        if not 0.0 < mix_init < 1.0:
            raise ValueError(f"mix_init must be in the open interval (0, 1), got {mix_init}")
        if not 1 <= num_modalities <= len(MODALITIES):
            raise ValueError(f"num_modalities must be in [1, {len(MODALITIES)}], got {num_modalities}")
        self.num_experts = num_experts
        self.topk = topk
        self.gate = gate
        self.aux_input = aux_input
        self.num_modalities = num_modalities
        self.combine = combine

        num_gates = 1 if gate == "shared" else num_modalities
        self.gates = nn.ModuleList(nn.Linear(dim, num_experts, bias=False) for _ in range(num_gates))
        self.aux_gate = None
        self.alpha = None
        self.prompt = None
        if gate == "modality+aux":
            self.aux_gate = nn.Linear(dim, num_experts, bias=False)
            self.alpha = nn.Parameter(torch.tensor(math.log(mix_init / (1.0 - mix_init))))
            if aux_input == "prompt":
                # Small init: a prompt as large as a layer-normed token would add
                # a random per-expert bias as large as the token logits' spread
                # and starve some experts from the first step.
                self.prompt = nn.Parameter(torch.randn(dim) * GATE_INIT_STD)
        for lin in self.gates:
            nn.init.normal_(lin.weight, std=GATE_INIT_STD)
        if self.aux_gate is not None:
            nn.init.normal_(self.aux_gate.weight, std=GATE_INIT_STD)

    @property
    def uses_context(self) -> bool:
        """Whether `forward` needs each token's sample's global token."""
        return self.aux_gate is not None and self.aux_input == "context"

    def mix_weight(self) -> Tensor | None:
        """The mixing weight a = sigmoid(alpha), or None without auxiliary gate."""
        return None if self.alpha is None else torch.sigmoid(self.alpha)

    def logits(self, h: Tensor, modality: str | int, context: Tensor | None = None) -> Tensor:
        """Router logits z: (..., D) -> (..., E), computed in fp32.

        `context` (..., D), broadcastable to h: each token's sample's global token,
        the auxiliary gate's input under aux_input "context" (ignored otherwise).
        """
        m = modality_index(modality, self.num_modalities)
        if self.uses_context and context is None:
            raise ValueError("aux_input 'context' routes with each token's sample's global "
                             "token; pass it as `context`")
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = h.float()
            gate = self.gates[0 if self.gate == "shared" else m]
            if self.aux_gate is None:
                return F.linear(h, gate.weight.float())  # ..., E
            a = torch.sigmoid(self.alpha.float())
            if self.aux_input == "token":
                # (1 - a) G_m(h) + a G_aux(h) is one linear map of h: mix the gates'
                # weights (E x D) instead of their (... x E) logits, one matmul.
                return F.linear(h, torch.lerp(gate.weight.float(), self.aux_gate.weight.float(), a))
            u = self.prompt.unsqueeze(0) if self.aux_input == "prompt" else context  # 1 or ..., D
            aux = F.linear(u.float(), self.aux_gate.weight.float())  # broadcasts against h's logits
            return torch.lerp(F.linear(h, gate.weight.float()), aux, a)  # ..., E

    def forward(self, h: Tensor, modality: str | int, context: Tensor | None = None) -> RouterOutput:
        """Route tokens h: (..., D) of one modality, each on its own; see `RouterOutput`
        for shapes and `logits` for `context`."""
        z = self.logits(h, modality, context)  # ..., E
        probs = z.softmax(dim=-1)
        top_logits, selected = z.topk(self.topk, dim=-1)  # ..., k
        if self.combine == "renorm":
            weights = top_logits.softmax(dim=-1)
        else:
            weights = probs.gather(-1, selected)
        return RouterOutput(logits=z, probs=probs, selected=selected, weights=weights)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, topk={self.topk}, gate={self.gate!r}, "
            f"aux_input={self.aux_input!r}, combine={self.combine!r}"
        )


class MoETokenOutput(NamedTuple):
    out: Tensor  # ..., D combined expert outputs
    stats: RoutingStats
    selected: Tensor  # ..., k
    weights: Tensor  # ..., k


class MoELayer(nn.Module):
    """Router + shared expert pool; routes valid tokens only.

    Args mirror `Router` and `ExpertPool`; ``dropout`` is the expert dropout.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int = 4,
        topk: int = 2,
        reduction: int = 8,
        dropout: float = 0.1,
        gate: str = "modality+aux",
        aux_input: str = "prompt",
        mix_init: float = 0.5,
        num_modalities: int = len(MODALITIES),
        combine: str = "renorm",
    ) -> None:
        super().__init__()
        self.router = Router(dim, num_experts, topk, gate, aux_input, mix_init, num_modalities,
                             combine)
        self.expert_pool = ExpertPool(dim, num_experts, reduction, dropout)

    def route_tokens(self, x: Tensor, modality: str | int, valid: Tensor | None = None,
                     context: Tensor | None = None) -> MoETokenOutput:
        """Route tokens x: (..., D) of one modality.

        `valid` (...) bool marks the tokens that count; the others (padding) get a
        zero output and are left out of the statistics. `context` (..., D),
        broadcastable to x, is each token's sample's global token (aux_input
        "context" only). Returns the combined expert output (..., D), this call's
        `RoutingStats` and the routing decision (selected experts and combine
        weights, (..., k)).
        """
        routing = self.router(x, modality, context)
        k, num_experts = self.router.topk, self.router.num_experts
        out = self.expert_pool(x.reshape(-1, x.shape[-1]), routing.selected.reshape(-1, k),
                               routing.weights.reshape(-1, k))  # N, D
        probs = routing.probs.reshape(-1, num_experts)  # N, E
        with torch.no_grad():  # (one_hot would check the indices' range on the host)
            picks = torch.zeros_like(probs)
            picks.scatter_(1, routing.selected.reshape(-1, k), 1.0)  # N, E; top-k indices are distinct
        if valid is None:  # every token counts: no masking work
            num_tokens = torch.full((), float(probs.shape[0]), device=x.device)
        else:
            mask = valid.reshape(-1, 1).to(torch.float32)  # N, 1
            out = out * mask.to(out.dtype)
            probs, picks = probs * mask, picks * mask
            num_tokens = mask.sum()
        stats = RoutingStats(prob_sum=probs.sum(dim=0), counts=picks.sum(dim=0),
                             num_tokens=num_tokens)
        return MoETokenOutput(out.view(x.shape), stats, routing.selected, routing.weights)

    def forward(self, x: Tensor, valid: Tensor | None, modality: str | int,
                global_pos: Tensor | None = None) -> tuple[Tensor, RoutingStats]:
        """Route the valid tokens of a padded batch.

        Args:
            x: (B, L, D) tokens (already layer-normed by the caller).
            valid: (B, L) bool, True for real tokens, False for padding; None when
                every token is real.
            modality: "image" or "text".
            global_pos: (B,) long, position of each sample's global token (the
                caption's end-of-text token); None: position 0 (the image CLS
                token). Read only under aux_input "context".

        Returns:
            (B, L, D) MoE output, exactly zero at padded positions, and the
            layer's `RoutingStats` over the valid tokens. Every position is routed
            (fixed shapes, no host sync); padding is masked out afterwards.
        """
        context = None
        if self.router.uses_context:  # each sample's own global token, never another's
            if global_pos is None:
                context = x[:, :1]  # B, 1, D
            else:
                context = x.gather(1, global_pos.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))  # B, 1, D
        routed = self.route_tokens(x, modality, valid, context)
        return routed.out, routed.stats
