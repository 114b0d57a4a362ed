"""Router, expert pool and CoMoE head: routing against a per-token reference,
padding, gradients, initialisation and per-sample (batch) independence."""
import itertools
import math

import pytest
import torch

from model.comoe import CoMoEHead, fuse_embedding
from model.moe import (
    AUX_INPUTS,
    COMBINE_MODES,
    GATE_MODES,
    ExpertPool,
    MoELayer,
    Router,
    RoutingStats,
)
from model.objectives import coar_loss

VARIANTS = list(itertools.product(GATE_MODES, AUX_INPUTS))


def _perturb_experts(module: torch.nn.Module, std: float = 0.2) -> None:
    """Give zero-initialised expert up-projections random weights so the MoE
    branch contributes (a fresh pool outputs exactly zero)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if f".{name}".endswith((".up.weight", ".up.bias")):
                p.normal_(0.0, std)


def _expert(pool: ExpertPool, e: int, h: torch.Tensor) -> torch.Tensor:
    """Expert e of the pool on one token h (D,), written out (no dropout)."""
    hidden = torch.nn.functional.gelu(h @ pool.down.weight[e] + pool.down.bias[e])
    return hidden @ pool.up.weight[e] + pool.up.bias[e]


def _text_valid(lengths, length):
    """(B, L) bool mask with a valid prefix of each length, like padded captions."""
    return torch.arange(length).unsqueeze(0) < torch.as_tensor(lengths).unsqueeze(1)


def _reference_route(layer: MoELayer, x: torch.Tensor, modality: str, context: torch.Tensor):
    """Slow per-token reference of routing and combination; context[n] is token n's
    sample's global token."""
    router = layer.router
    m = ("image", "text").index(modality)
    selected, weights, outs, probs = [], [], [], []
    for h, c in zip(x, context):  # one token at a time
        gate = router.gates[0 if router.gate == "shared" else m].weight
        z = gate @ h
        if router.gate == "modality+aux":
            a = 1.0 / (1.0 + math.exp(-router.alpha.item()))
            u = {"token": h, "prompt": router.prompt, "context": c}[router.aux_input]
            z = (1 - a) * z + a * (router.aux_gate.weight @ u)
        p = torch.softmax(z, dim=0)
        order = sorted(range(len(z)), key=lambda e: -z[e].item())[: router.topk]
        if router.combine == "renorm":
            top = torch.stack([z[e] for e in order])
            w = torch.exp(top - top.max())
            w = w / w.sum()
        else:
            w = torch.stack([p[e] for e in order])
        out = sum(w[j] * _expert(layer.expert_pool, e, h) for j, e in enumerate(order))
        selected.append(order)
        weights.append(w)
        outs.append(out)
        probs.append(p)
    return (
        torch.tensor(selected),
        torch.stack(weights),
        torch.stack(outs),
        torch.stack(probs),
    )


@pytest.mark.parametrize("gate,aux_input", VARIANTS)
@pytest.mark.parametrize("topk", [1, 2, 4])
@pytest.mark.parametrize("combine", COMBINE_MODES)
def test_routing_matches_per_token_reference(gate, aux_input, topk, combine):
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, topk=topk, reduction=4, dropout=0.0,
                     gate=gate, aux_input=aux_input, mix_init=0.3, combine=combine).eval()
    _perturb_experts(layer)
    x = torch.randn(40, 16)
    context = torch.randn(40, 16)
    for modality in ("image", "text"):
        got = layer.route_tokens(x, modality, context=context)
        ref_sel, ref_w, ref_out, ref_probs = _reference_route(layer, x, modality, context)
        assert torch.equal(got.selected, ref_sel)
        torch.testing.assert_close(got.weights, ref_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.stats.prob_sum, ref_probs.sum(0), rtol=1e-5, atol=1e-5)
        assert torch.equal(got.stats.counts, torch.bincount(ref_sel.flatten(), minlength=4).float())
        assert got.stats.num_tokens.item() == 40
        assert got.stats.counts.sum().item() == topk * 40
        assert not got.stats.counts.requires_grad and got.stats.prob_sum.requires_grad


def test_gate_modes_use_the_expected_gates():
    torch.manual_seed(0)
    x = torch.randn(30, 16)
    shared = Router(16, 4, 2, gate="shared")
    assert len(shared.gates) == 1 and shared.aux_gate is None and shared.alpha is None
    torch.testing.assert_close(shared.logits(x, "image"), shared.logits(x, "text"))
    modal = Router(16, 4, 2, gate="modality", aux_input="prompt")
    assert len(modal.gates) == 2 and modal.aux_gate is None and modal.prompt is None
    assert not torch.allclose(modal.logits(x, "image"), modal.logits(x, "text"))
    comoe = Router(16, 4, 2, gate="modality+aux", aux_input="prompt", mix_init=0.5)
    assert comoe.mix_weight().item() == pytest.approx(0.5)
    # With the prompt input the auxiliary logits are one vector shared by all tokens.
    aux = comoe.aux_gate(comoe.prompt)
    a = comoe.mix_weight()
    torch.testing.assert_close(
        comoe.logits(x, "text"), (1 - a) * comoe.gates[1](x) + a * aux.expand(30, 4)
    )
    assert Router(16, 4, 2, mix_init=0.2).mix_weight().item() == pytest.approx(0.2)


def test_fresh_router_spreads_tokens_over_experts():
    torch.manual_seed(0)
    layer = MoELayer(512, num_experts=4, topk=2)
    h = torch.nn.functional.layer_norm(torch.randn(500, 512), (512,))
    stats = layer.route_tokens(h, "text").stats
    usage = stats.usage()
    assert (usage > 0.1).all(), usage  # no collapsed or dead expert at init
    assert coar_loss([stats], [stats])["balance"].item() < 1.1


def test_padding_is_not_routed_or_counted():
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, topk=2, reduction=4, dropout=0.0).eval()
    _perturb_experts(layer)
    valid = _text_valid([5, 1, 8, 3], 8)
    x = torch.randn(4, 8, 16)
    out, stats = layer(x, valid, "text")
    assert out.shape == x.shape
    assert torch.count_nonzero(out[~valid]) == 0
    assert (out[valid].abs().sum(-1) > 0).all()
    assert stats.num_tokens.item() == valid.sum().item() == 17
    assert stats.counts.sum().item() == 2 * 17
    flat = layer.route_tokens(x[valid], "text")
    torch.testing.assert_close(out[valid], flat.out)
    torch.testing.assert_close(stats.prob_sum, flat.stats.prob_sum)
    assert torch.equal(stats.counts, flat.stats.counts)
    junk = x.clone()
    junk[~valid] = 1e4 * torch.randn(int((~valid).sum()), 16)
    out_junk, stats_junk = layer(junk, valid, "text")
    torch.testing.assert_close(out_junk, out)
    torch.testing.assert_close(stats_junk.prob_sum, stats.prob_sum)


def test_routing_stats_add():
    a = RoutingStats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor(2.0))
    b = RoutingStats(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 2.0]), torch.tensor(1.0))
    c = a + b
    assert torch.equal(c.prob_sum, torch.tensor([1.5, 2.5]))
    assert torch.equal(c.counts, torch.tensor([3.0, 3.0]))
    assert c.num_tokens.item() == 3.0
    torch.testing.assert_close(c.usage(), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(c.mean_probs(), torch.tensor([0.5, 2.5 / 3]))
    with pytest.raises(ValueError, match="experts"):
        a + RoutingStats(torch.zeros(3), torch.zeros(3), torch.tensor(1.0))


def test_routing_stats_stack_keeps_each_layer():
    a = RoutingStats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor(2.0))
    b = RoutingStats(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 2.0]), torch.tensor(0.0))
    both = RoutingStats.stack([a, b])
    assert both.num_experts == 2 and both.prob_sum.shape == (2, 2) and both.num_tokens.shape == (2,)
    for row, layer in enumerate((a, b)):  # b has no tokens: zero mean, no division by zero
        torch.testing.assert_close(both.mean_probs()[row], layer.mean_probs())
        torch.testing.assert_close(both.usage()[row], layer.usage())
    torch.testing.assert_close(both.usage(), torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="same number of experts"):
        RoutingStats.stack([a, RoutingStats(torch.zeros(3), torch.zeros(3), torch.tensor(1.0))])
    with pytest.raises(ValueError, match="at least one"):
        RoutingStats.stack([])


def test_expert_pool_matches_a_loop_over_experts_with_gradients():
    """The stacked (one-bottleneck) dispatch computes the per-expert sum, and so do its
    gradients with respect to every expert's own parameters."""
    torch.manual_seed(0)
    pool = ExpertPool(12, num_experts=3, reduction=3, dropout=0.0)
    _perturb_experts(pool)
    x = torch.randn(20, 12, requires_grad=True)
    selected = torch.stack([torch.randperm(3)[:2] for _ in range(20)])
    weights = torch.rand(20, 2).softmax(-1)
    out = pool(x, selected, weights)
    ref = torch.stack([sum(weights[n, j] * _expert(pool, int(e), x[n])
                           for j, e in enumerate(selected[n])) for n in range(20)])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, *pool.parameters()])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *pool.parameters()])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_expert_pool_runs_unselected_experts():
    pool = ExpertPool(8, num_experts=3, reduction=2, dropout=0.0)
    x = torch.randn(5, 8)
    out = pool(x, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1))
    out.sum().backward()
    # Experts 1 and 2 got no token but still carry a (zero) gradient.
    for p in pool.parameters():
        assert p.grad is not None


def _small_head(gate="modality+aux", aux_input="prompt", **kw):
    args = dict(dim=32, layers=2, heads=4, num_experts=4, topk=2, reduction=4,
                mlp_ratio=2.0, dropout=0.0, expert_dropout=0.0, gate=gate,
                aux_input=aux_input, mix_init=0.5, identity_init=False)
    args.update(kw)
    return CoMoEHead(**args)


@pytest.mark.parametrize("gate,aux_input", VARIANTS)
def test_gradients_reach_every_parameter(gate, aux_input):
    torch.manual_seed(0)
    head = _small_head(gate, aux_input)
    # Expert up-projections start at zero, which zeroes the gradient of the
    # down-projections and of the gates through the combine weights; use
    # random ones so every parameter's gradient can be checked.
    _perturb_experts(head)
    images = torch.randn(3, 9, 32)
    texts = torch.randn(3, 7, 32)
    text_valid = _text_valid([7, 4, 2], 7)
    img_out, img_stats = head(images, torch.ones(3, 9, dtype=torch.bool), "image")
    txt_out, txt_stats = head(texts, text_valid, "text")
    img_emb = fuse_embedding(images[:, 0], img_out, torch.ones(3, 9, dtype=torch.bool))
    txt_emb = fuse_embedding(texts[:, -1], txt_out, text_valid)
    loss = (img_emb * txt_emb).sum() + img_out.pow(2).mean() + txt_out.pow(2).mean()
    loss = loss + coar_loss(img_stats, txt_stats, lambda_align=0.5)["total"]
    loss.backward()
    names = [n for n, _ in head.named_parameters()]
    assert any("alpha" in n for n in names) == (gate == "modality+aux")
    assert any("prompt" in n for n in names) == (gate == "modality+aux" and aux_input == "prompt")
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_zero_init_experts_equal_head_without_moe():
    torch.manual_seed(0)
    head = _small_head().eval()
    plain = _small_head(num_experts=0).eval()
    missing, unexpected = plain.load_state_dict(head.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(".moe." in k or ".ln_3." in k for k in unexpected)
    tokens = torch.randn(4, 6, 32)
    valid = _text_valid([6, 3, 1, 5], 6)
    out, stats = head(tokens, valid, "text")
    out_plain, stats_plain = plain(tokens, valid, "text")
    assert len(stats) == 2 and stats_plain == []
    torch.testing.assert_close(out, out_plain, rtol=0, atol=1e-6)
    _perturb_experts(head)
    assert not torch.allclose(head(tokens, valid, "text")[0], out_plain, atol=1e-3)


def test_identity_init_head_is_identity_on_valid_tokens():
    torch.manual_seed(0)
    head = _small_head(identity_init=True)
    tokens = torch.randn(3, 5, 32)
    valid = _text_valid([5, 2, 4], 5)
    out, _ = head(tokens, valid, "text")
    torch.testing.assert_close(out[valid], tokens[valid], rtol=0, atol=0)
    assert torch.count_nonzero(out[~valid]) == 0


@pytest.mark.parametrize("gate,aux_input", VARIANTS)
def test_outputs_do_not_depend_on_batch_neighbours(gate, aux_input):
    torch.manual_seed(0)
    head = _small_head(gate, aux_input).eval()
    _perturb_experts(head)
    B, L = 16, 12
    tokens = torch.randn(B, L, 32)
    lengths = torch.randint(1, L + 1, (B,))
    lengths[3] = 7
    valid = _text_valid(lengths, L)
    global_feat = torch.randn(B, 32)

    def embed(tok, val, glob, modality="text"):
        eot = val.sum(dim=1) - 1 if modality == "text" else None  # None: the CLS at 0
        out, _ = head(tok, val, modality, eot)
        return out, fuse_embedding(glob, out, val)

    with torch.no_grad():
        out, emb = embed(tokens, valid, global_feat)
        # The same sample alone, and alone with its padding trimmed.
        alone_out, alone_emb = embed(tokens[3:4], valid[3:4], global_feat[3:4])
        trim_out, trim_emb = embed(tokens[3:4, :7], valid[3:4, :7], global_feat[3:4])
        # Shuffled batch.
        perm = torch.randperm(B)
        shuf_out, shuf_emb = embed(tokens[perm], valid[perm], global_feat[perm])
        # Junk (huge and non-finite) values at padded positions.
        junk = tokens.clone()
        junk[~valid] = 1e6 * torch.randn(int((~valid).sum()), 32)
        junk_out, junk_emb = embed(junk, valid, global_feat)
        nan_tokens = torch.where(valid.unsqueeze(-1), tokens, torch.full_like(tokens, float("nan")))
        nan_out, nan_emb = embed(nan_tokens, valid, global_feat)
        # Image-style inputs (all valid) alone and in the batch.
        all_valid = torch.ones(B, L, dtype=torch.bool)
        img_out, img_emb = embed(tokens, all_valid, global_feat, "image")
        img_alone_out, img_alone_emb = embed(tokens[5:6], all_valid[5:6], global_feat[5:6], "image")

    tol = dict(rtol=0, atol=1e-5)
    assert torch.isfinite(out).all() and torch.isfinite(nan_out).all()
    torch.testing.assert_close(alone_out[0], out[3], **tol)
    torch.testing.assert_close(alone_emb[0], emb[3], **tol)
    torch.testing.assert_close(trim_out[0], out[3, :7], **tol)
    torch.testing.assert_close(trim_emb[0], emb[3], **tol)
    torch.testing.assert_close(shuf_out, out[perm], **tol)
    torch.testing.assert_close(shuf_emb, emb[perm], **tol)
    torch.testing.assert_close(junk_out, out, **tol)
    torch.testing.assert_close(junk_emb, emb, **tol)
    torch.testing.assert_close(nan_out, out, **tol)
    torch.testing.assert_close(nan_emb, emb, **tol)
    torch.testing.assert_close(img_alone_out[0], img_out[5], **tol)
    torch.testing.assert_close(img_alone_emb[0], img_emb[5], **tol)
    # The check can fail: a different neighbour changes the sample if mixing existed.
    assert not torch.allclose(out[3], out[4], atol=1e-3)


def test_head_without_padding_mask_equals_an_all_true_mask():
    """valid=None (images: no padding) skips the masking work and gives the results of
    an all-True mask: tokens, routing statistics, embeddings and gradients."""
    torch.manual_seed(0)
    head = CoMoEHead(dim=16, layers=2, heads=2, num_experts=4, topk=2, reduction=4,
                     expert_dropout=0.0, identity_init=False)
    tokens = torch.randn(3, 7, 16)
    results = []
    for valid in (None, torch.ones(3, 7, dtype=torch.bool)):
        head.zero_grad()
        x = tokens.clone().requires_grad_()
        out, stats = head(x, valid, "image")
        fused = fuse_embedding(x[:, 0], out, valid, "sum")
        (fused.square().sum() + sum(s.prob_sum.square().sum() for s in stats)).backward()
        results.append((out, stats, fused, x.grad, [p.grad for p in head.parameters()
                                                     if p.grad is not None]))  # no text gate
    (out, stats, fused, grad, grads), (out_m, stats_m, fused_m, grad_m, grads_m) = results
    torch.testing.assert_close(out, out_m)
    torch.testing.assert_close(fused, fused_m)
    torch.testing.assert_close(grad, grad_m)
    for a, b in zip(stats, stats_m):
        torch.testing.assert_close(a.prob_sum, b.prob_sum)
        assert torch.equal(a.counts, b.counts) and a.num_tokens.item() == b.num_tokens.item() == 21
    assert len(grads) == len(grads_m) > 20
    for a, b in zip(grads, grads_m):
        torch.testing.assert_close(a, b)


def test_fuse_embedding_modes():
    global_feat = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    tokens = torch.tensor([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]],
                           [[2.0, 4.0], [-1.0, -1.0], [-1.0, -1.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    mean = torch.tensor([[2.0, 3.0], [2.0, 4.0]])
    torch.testing.assert_close(fuse_embedding(global_feat, tokens, valid, "mean"), mean)
    torch.testing.assert_close(fuse_embedding(global_feat, tokens, valid, "sum"), global_feat + mean)
    torch.testing.assert_close(fuse_embedding(global_feat, tokens, valid, "global"), global_feat)
    with pytest.raises(ValueError, match="'max'.*sum"):
        fuse_embedding(global_feat, tokens, valid, "max")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gate="dense"), r"gate 'dense'.*modality\+aux.*shared"),
        (dict(aux_input="image"), r"aux_input 'image'.*prompt.*context.*token"),
        (dict(combine="softmax"), r"combine 'softmax'.*renorm.*prob"),
        (dict(topk=5), r"topk.*num_experts=4"),
        (dict(topk=0), r"topk"),
        (dict(heads=5), r"divisible by heads"),
        (dict(mix_init=1.0), r"mix_init"),
        (dict(reduction=64), r"reduction"),
        (dict(num_experts=-1), r"num_experts"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _small_head(**kwargs)


def test_invalid_inputs_raise():
    head = _small_head()
    tokens = torch.randn(2, 4, 32)
    valid = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="modality 'audio'"):
        head(tokens, valid, "audio")
    with pytest.raises(ValueError, match="valid must be None or a bool"):
        head(tokens, valid.float(), "text")
    with pytest.raises(ValueError, match=r"\(B, L, 32\)"):
        head(torch.randn(2, 4, 16), valid, "text")


def test_default_head_parameter_count():
    head = CoMoEHead()
    per_block = (
        2 * 512 * 3  # three LayerNorms
        + 512 * 1536 + 1536 + 512 * 512 + 512  # attention
        + 512 * 2048 + 2048 + 2048 * 512 + 512  # MLP
        + 4 * (512 * 64 + 64 + 64 * 512 + 512)  # experts
        + 3 * 512 * 4 + 1 + 512  # image, text and auxiliary gates, alpha, prompt
    )
    assert sum(p.numel() for p in head.parameters()) == 4 * per_block


@pytest.mark.parametrize("combine", COMBINE_MODES)
def test_top1_router_learns_from_the_task_only_with_prob_combine(combine):
    """At k = 1, "renorm" makes every combine weight softmax(one logit) = 1: a task
    loss on the head's output sends no gradient to the gates, the mixing weight or
    the prompt. "prob" (the selected expert's router probability) does."""
    torch.manual_seed(0)
    head = _small_head(topk=1, combine=combine)
    _perturb_experts(head)
    tokens = torch.randn(3, 6, 32)
    valid = _text_valid([6, 4, 2], 6)
    out, _ = head(tokens, valid, "text")
    fuse_embedding(tokens[:, 0], out, valid).square().sum().backward()  # no CoAR
    router = {n: p.grad for n, p in head.named_parameters()
              if ".router." in n and ".gates.0." not in n}  # the image gate sees no text
    assert len(router) == 2 * 4  # text gate, auxiliary gate, alpha, prompt per layer
    for name, grad in router.items():
        if combine == "prob":
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None or torch.count_nonzero(grad) == 0, name


def test_context_aux_input_routes_with_each_samples_own_global_token():
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, topk=2, reduction=4, dropout=0.0,
                     aux_input="context", mix_init=0.4).eval()
    _perturb_experts(layer)
    x = torch.randn(3, 5, 16)
    valid = _text_valid([5, 3, 4], 5)
    eot = torch.tensor([4, 2, 3])
    out, _ = layer(x, valid, "text", eot)
    # Every token's auxiliary input is its own sample's token at the EOT position.
    context = torch.stack([x[b, eot[b]] for b in range(3)]).repeat_interleave(5, dim=0)
    _, _, ref_out, _ = _reference_route(layer, x.flatten(0, 1), "text", context)
    mask = valid.flatten()
    torch.testing.assert_close(out.flatten(0, 1)[mask], ref_out[mask], rtol=1e-5, atol=1e-6)
    # Images: the CLS token at position 0.
    img_out, _ = layer(x, None, "image")
    _, _, ref_img, _ = _reference_route(layer, x.flatten(0, 1), "image",
                                        x[:, 0].repeat_interleave(5, dim=0))
    torch.testing.assert_close(img_out.flatten(0, 1), ref_img, rtol=1e-5, atol=1e-6)
    # The auxiliary gate really reads it: another global token routes differently.
    assert not torch.allclose(layer(x, valid, "text", torch.zeros(3, dtype=torch.long))[0], out)
    with pytest.raises(ValueError, match="context"):
        layer.route_tokens(x, "text", valid)


def test_text_and_image_features_give_the_head_their_global_token_positions():
    from conftest import TINY_MODEL
    from model import build_model
    from utils.config import load_config
    from utils.tokenizer import tokenize
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY_MODEL + ["moe.aux_input=context"])).eval()
    seen = []
    model.head.blocks[0].moe.register_forward_pre_hook(lambda module, args: seen.append(args[3]))
    caption_ids = tokenize(["a man", "a woman in a red coat with a bag"], context_length=24)
    with torch.no_grad():
        model.text_features(caption_ids)
        model.image_features(torch.randn(2, 3, 32, 16))
    assert torch.equal(seen[0], caption_ids.argmax(dim=-1))  # the end-of-text tokens
    assert seen[0].tolist() == [3, 10] and seen[1] is None  # images: the CLS token at 0


def test_expert_pool_is_stacked_and_loads_per_expert_state_dicts():
    """One implementation: the pool's stacked parameters and forward. A state dict of
    the older layout (one nn.Linear pair per expert) loads and computes the same."""
    torch.manual_seed(0)
    dim, num_experts, hidden = 12, 3, 4
    pool = ExpertPool(dim, num_experts, reduction=3, dropout=0.0)
    assert {n: tuple(p.shape) for n, p in pool.named_parameters()} == {
        "down.weight": (3, 12, 4), "down.bias": (3, 4), "up.weight": (3, 4, 12), "up.bias": (3, 12)}
    downs = [torch.nn.Linear(dim, hidden) for _ in range(num_experts)]
    ups = [torch.nn.Linear(hidden, dim) for _ in range(num_experts)]
    old = {f"experts.{e}.{name}.{param}": getattr(lin, param).detach().clone()
           for e in range(num_experts) for name, lin in (("down", downs[e]), ("up", ups[e]))
           for param in ("weight", "bias")}
    pool.load_state_dict(old)
    x = torch.randn(20, dim)
    selected = torch.stack([torch.randperm(num_experts)[:2] for _ in range(20)])
    weights = torch.rand(20, 2).softmax(-1)
    with torch.no_grad():
        ref = torch.stack([sum(weights[n, j] * ups[e](torch.nn.functional.gelu(downs[e](x[n])))
                               for j, e in enumerate(selected[n].tolist())) for n in range(20)])
        torch.testing.assert_close(pool(x, selected, weights), ref, rtol=1e-5, atol=1e-6)


def _per_expert_layout(state: dict) -> dict:
    """A model state dict rewritten in the older per-expert layout of the pools."""
    old = {}
    for key, value in state.items():
        prefix, found, name = key.partition("expert_pool.")
        if not found:
            old[key] = value
            continue
        for e, tensor in enumerate(value):  # nn.Linear weights are (out, in)
            old[f"{prefix}expert_pool.experts.{e}.{name}"] = tensor.t() if name.endswith("weight") else tensor
    return old


def test_old_checkpoints_load_through_load_model_state():
    from conftest import TINY_MODEL
    from model import build_model
    from utils.checkpoint import CheckpointError, load_model_state
    from utils.config import load_config
    cfg = load_config(None, TINY_MODEL + ["moe.layers=2"])
    torch.manual_seed(0)
    model = build_model(cfg)
    _perturb_experts(model)
    state = model.state_dict()
    old = _per_expert_layout(state)
    assert "head.blocks.1.moe.expert_pool.experts.3.up.bias" in old
    torch.manual_seed(1)
    fresh = build_model(cfg)
    load_model_state(fresh, {"model": old})
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    # A converted tensor of the wrong shape is reported like any other mismatch.
    narrow = build_model(load_config(None, TINY_MODEL + ["moe.layers=2", "moe.reduction=2"]))
    with pytest.raises(CheckpointError, match=r"size mismatch for head\.blocks\.0\.moe\.expert_pool"):
        load_model_state(narrow, {"model": old})
