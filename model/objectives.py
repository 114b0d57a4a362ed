"""Loss functions: SDM and ITC (retrieval), CoAR (routing regulariser) and the
baseline terms ID (identity classification), CMPM (cross-modal projection
matching) and MLM (masked language modelling, with its head in `model.mlm`).

Pure functions on batch-first tensors. Similarity logits are computed in fp32
whatever the autocast state, for stability of the softmax at logit scale 50.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.moe import RoutingStats

__all__ = ["BALANCE_MODES", "accuracy", "cmpm_loss", "coar_loss", "id_logits", "id_loss", "itc_loss",
           "js_divergence",
           "mlm_loss", "sdm_loss"]


def _scaled_cosine(a: Tensor, b: Tensor, logit_scale: float | Tensor) -> Tensor:
    """logit_scale * cos(a_i, b_j) in fp32: (N, D), (M, D) -> (N, M)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        scale = logit_scale.float() if isinstance(logit_scale, Tensor) else float(logit_scale)
        return scale * (a @ b.t())


def sdm_loss(
    image_feats: Tensor,
    text_feats: Tensor,
    pids: Tensor,
    logit_scale: float | Tensor,
    epsilon: float = 1e-8,
) -> Tensor:
    """Similarity distribution matching (IRRA, CVPR 2023).

    For each image (text), KL(p || q) between p = softmax over the batch's
    texts (images) of scaled cosine similarities and q = the uniform
    distribution over the texts (images) of the same identity; image->text
    plus text->image, each averaged over rows.

    Args:
        image_feats: (B, D) image embeddings (normalised here).
        text_feats: (B, D) text embeddings, paired with ``image_feats``.
        pids: (B,) identity labels.
        logit_scale: inverse temperature (50 for temperature 0.02).
        epsilon: added to q inside the log (q has zeros).

    Returns:
        () loss.
    """
    if image_feats.shape[0] != text_feats.shape[0] or pids.shape[0] != image_feats.shape[0]:
        raise ValueError(
            f"sdm_loss needs paired batches, got image {tuple(image_feats.shape)}, "
            f"text {tuple(text_feats.shape)}, pids {tuple(pids.shape)}"
        )
    pids = pids.reshape(-1, 1)
    labels = (pids == pids.t()).float()  # B, B
    target = labels / labels.sum(dim=1, keepdim=True)  # B, B rows sum to 1
    log_target = torch.log(target + epsilon)
    image_to_text = _scaled_cosine(image_feats, text_feats, logit_scale)  # B, B
    loss = image_feats.new_zeros((), dtype=torch.float32)
    for logits in (image_to_text, image_to_text.t()):
        log_p = F.log_softmax(logits, dim=1)
        loss = loss + (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()
    return loss


def itc_loss(image_feats: Tensor, text_feats: Tensor, logit_scale: float | Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP): the i-th image and i-th text are the positives.

    Args:
        image_feats: (B, D) image embeddings (normalised here).
        text_feats: (B, D) text embeddings.
        logit_scale: inverse temperature.

    Returns:
        () mean of the image->text and text->image cross-entropies.
    """
    if image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(
            f"itc_loss needs paired batches, got image {tuple(image_feats.shape)}, "
            f"text {tuple(text_feats.shape)}"
        )
    image_to_text = _scaled_cosine(image_feats, text_feats, logit_scale)  # B, B
    targets = torch.arange(image_to_text.shape[0], device=image_to_text.device)
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(image_to_text.t(), targets)) / 2


def js_divergence(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Jensen-Shannon divergence (natural log, in [0, ln 2]) of distributions over the last dim.

    Probabilities are clamped to at least `eps` first: at an exact 0 the gradient of
    p log(p / m) is 0 * inf = NaN (an expert that a modality never gives any
    probability, or a modality without tokens). The clamp changes the value by a
    negligible amount (of order ``eps * E * log(1 / eps)``) and passes no gradient
    to the clamped entries.
    """
    p, q = p.clamp(min=eps), q.clamp(min=eps)
    m = (p + q) / 2
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=-1)
    return (kl_pm + kl_qm) / 2


BALANCE_MODES = ("joint", "per_modality")


def coar_loss(
    image_stats: Sequence[RoutingStats],
    text_stats: Sequence[RoutingStats],
    lambda_align: float = 0.1,
    balance: str = "joint",
) -> dict[str, Tensor]:
    """Collaboration-aware auxiliary regularisation of the MoE routers.

    Per layer, with f^m_e the fraction of modality m's routed assignments that
    chose expert e (``counts / counts.sum()``, no grad) and P^m_e the mean
    router probability of modality m (differentiable):

    - balance "joint" = E * sum_e f_e * P_e with f = (f^image + f^text) / 2 and
      P = (P^image + P^text) / 2, so each modality counts equally whatever its
      token count. It equals 1 when f and P are uniform (the minimum whenever
      f = P, by Cauchy-Schwarz) and E when every assignment and all the
      probability mass go to one expert. Modality-split routing (images on
      experts {0, 1}, text on {2, 3}) also scores 1: the sum over modalities
      is balanced.
    - balance "per_modality" = (E * sum_e f^image_e P^image_e
      + E * sum_e f^text_e P^text_e) / 2: each modality must use every expert,
      so the split routing above scores E / 2.
    - align = JS(P^image, P^text), natural log, in [0, ln 2].

    Args:
        image_stats: one `RoutingStats` per MoE layer from the image pass.
        text_stats: the same layers from the text pass.
        lambda_align: weight of the alignment term; at 0 it is not computed.
        balance: "joint" or "per_modality", see above.

    Returns:
        {"total": sum over layers of balance + lambda_align * align (the term
        to optimise), "balance": summed balance, "align": summed alignment (a
        constant 0 when lambda_align is 0)}. The parts are for logging; adding
        them to the loss again would count them twice.
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"unknown CoAR balance {balance!r}; expected one of {BALANCE_MODES}")
    if len(image_stats) != len(text_stats):
        raise ValueError(
            f"coar_loss needs one RoutingStats per layer for both modalities, got "
            f"{len(image_stats)} image and {len(text_stats)} text layers"
        )
    if not image_stats:
        raise ValueError(
            "coar_loss got no routing statistics: the head has no MoE layers "
            "(num_experts = 0); drop 'coar' from the loss names"
        )
    for img, txt in zip(image_stats, text_stats):
        if img.num_experts != txt.num_experts:
            raise ValueError(
                f"image and text routing statistics disagree on the number of experts "
                f"({img.num_experts} vs {txt.num_experts})"
            )
    # All layers at once (layers, E): the same sums as a loop over layers, in a
    # fixed number of ops whatever the depth.
    img, txt = RoutingStats.stack(image_stats), RoutingStats.stack(text_stats)
    p_img, p_txt = img.mean_probs().float(), txt.mean_probs().float()  # layers, E
    f_img, f_txt = img.usage().float().detach(), txt.usage().float().detach()  # layers, E
    if balance == "joint":
        f, p = (f_img + f_txt) / 2, (p_img + p_txt) / 2  # layers, E
        balance_term = img.num_experts * (f * p).sum()
    else:
        balance_term = img.num_experts * ((f_img * p_img).sum() + (f_txt * p_txt).sum()) / 2
    if lambda_align == 0:
        align = torch.zeros((), device=balance_term.device)
        return {"total": balance_term, "balance": balance_term, "align": align}
    align = js_divergence(p_img, p_txt).sum()
    return {"total": balance_term + lambda_align * align, "balance": balance_term, "align": align}


def id_logits(classifier: nn.Linear, image_feats: Tensor, text_feats: Tensor) -> tuple[Tensor, Tensor]:
    """Identity logits of both modalities through one shared classifier.

    Args:
        classifier: ``nn.Linear(D, num_classes)`` shared by images and texts.
        image_feats: (B, D) image embeddings (not normalised).
        text_feats: (B, D) text embeddings, paired with ``image_feats``.

    Returns:
        (B, C) image and (B, C) text logits in fp32, computed in the classifier's
        dtype whatever the autocast state: fp32, or fp16 with IRRA's fp16 weights
        (as IRRA does).
    """
    if image_feats.shape != text_feats.shape:
        raise ValueError(
            f"id_logits needs paired batches, got image {tuple(image_feats.shape)}, "
            f"text {tuple(text_feats.shape)}"
        )
    dtype = classifier.weight.dtype
    with torch.autocast(device_type=image_feats.device.type, enabled=False):
        image_logits = classifier(image_feats.to(dtype)).float()  # B, C
        text_logits = classifier(text_feats.to(dtype)).float()  # B, C
    return image_logits, text_logits


def id_loss(image_logits: Tensor, text_logits: Tensor, pids: Tensor) -> Tensor:
    """Identity classification of both modalities (logits from `id_logits`).

    The instance loss of Zheng et al. (arXiv:1711.05535) as IRRA uses it: the
    mean, not the sum, of the image and text cross-entropies, so the term has
    the scale of one cross-entropy whatever the number of modalities.

    Args:
        image_logits: (B, C) image logits.
        text_logits: (B, C) text logits.
        pids: (B,) identity labels in [0, C).

    Returns:
        () loss.
    """
    if image_logits.shape != text_logits.shape or pids.shape != image_logits.shape[:1]:
        raise ValueError(
            f"id_loss needs paired batches, got image logits {tuple(image_logits.shape)}, "
            f"text logits {tuple(text_logits.shape)}, pids {tuple(pids.shape)}"
        )
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def accuracy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Share of rows whose top logit is the label, over rows not labelled
    ``ignore_index``: a () fp32 tensor on the logits' device (no host sync; 0 when
    every row is ignored).

    Args:
        logits: (N, C) scores.
        labels: (N,) class ids, or ``ignore_index``.
    """
    counted = labels != ignore_index
    correct = (logits.argmax(dim=-1) == labels) & counted
    return correct.sum().float() / counted.sum().clamp(min=1).float()


def cmpm_loss(image_feats: Tensor, text_feats: Tensor, pids: Tensor, epsilon: float = 1e-8) -> Tensor:
    """Cross-modal projection matching (Zhang & Lu, ECCV 2018).

    Each embedding is projected onto the normalised embeddings of the other
    modality, ``image_i . text_j / |text_j|``: the projection keeps the
    query's norm and there is no temperature. For each row, KL(p || q) between
    p = softmax of the projections and q = the same-identity indicator divided
    by its L2 norm (1 / sqrt(n) on the n positives), image->text plus
    text->image, each averaged over rows.

    The L2 normalisation of q follows the public implementations (IRRA's
    ``compute_cmpm`` and other public PyTorch ports); the paper writes an L1
    normalisation (1 / n). The two differ only in the per-row constant
    -log q that weighs the probability mass on the positives.

    Args:
        image_feats: (B, D) image embeddings (not normalised).
        text_feats: (B, D) text embeddings, paired with ``image_feats``.
        pids: (B,) identity labels.
        epsilon: added to q inside the log (q has zeros).

    Returns:
        () loss, computed in fp32.
    """
    if image_feats.shape != text_feats.shape or pids.shape != image_feats.shape[:1]:
        raise ValueError(
            f"cmpm_loss needs paired batches, got image {tuple(image_feats.shape)}, "
            f"text {tuple(text_feats.shape)}, pids {tuple(pids.shape)}"
        )
    with torch.autocast(device_type=image_feats.device.type, enabled=False):
        image_feats, text_feats = image_feats.float(), text_feats.float()
        image_proj_text = image_feats @ F.normalize(text_feats, dim=-1).t()  # B, B
        text_proj_image = text_feats @ F.normalize(image_feats, dim=-1).t()  # B, B
        pids = pids.reshape(-1, 1)
        labels = (pids == pids.t()).float()  # B, B
        log_target = torch.log(labels / labels.norm(dim=1, keepdim=True) + epsilon)
        loss = image_feats.new_zeros(())
        for logits in (image_proj_text, text_proj_image):
            log_p = F.log_softmax(logits, dim=1)
            loss = loss + (log_p.exp() * (log_p - log_target)).sum(dim=1).mean()
    return loss


def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy of masked-token predictions over the labelled positions.

    Args:
        logits: (..., V) token scores, e.g. (B, L, V) from `model.mlm.MLMHead`
            or (M, V) at the M selected positions only.
        labels: (...) original token ids at the selected positions and
            ``ignore_index`` elsewhere (see `model.mlm.mask_caption_tokens`).
        ignore_index: label value of the positions that do not count.

    Returns:
        () mean cross-entropy over the labelled positions, in fp32; 0 (still
        attached to ``logits``, so backward works) when nothing is labelled.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"mlm_loss needs logits (..., V) matching labels (...), got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    logits = logits.reshape(-1, logits.shape[-1]).float()  # N, V
    labels = labels.reshape(-1)  # N
    # Sum over the labelled positions divided by their count (at least 1):
    # the mean when there are labels, an attached 0 when there are none, and
    # no host synchronisation either way.
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)
