"""SDM, ITC and CoAR against hand-computed values."""
import math

import pytest
import torch

from model.moe import RoutingStats
from model.objectives import coar_loss, itc_loss, js_divergence, sdm_loss


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _features():
    torch.manual_seed(0)
    return torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 0, 2, 1])


@pytest.mark.parametrize("scale", [5.0, 50.0])
def test_sdm_matches_hand_computation(scale):
    img, txt, pids = _features()
    eps = 1e-8
    I, T, P = img.tolist(), txt.tolist(), pids.tolist()
    expected = 0.0
    for queries, gallery in ((I, T), (T, I)):
        total = 0.0
        for i, q in enumerate(queries):
            p = _softmax([scale * _cos(q, g) for g in gallery])
            same = [1.0 if P[i] == P[j] else 0.0 for j in range(len(P))]
            target = [s / sum(same) for s in same]
            total += sum(p[j] * (math.log(p[j]) - math.log(target[j] + eps)) for j in range(len(P)))
        expected += total / len(queries)
    got = sdm_loss(img, txt, pids, scale)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # A tensor logit scale gives the same value and receives a gradient.
    scale_t = torch.tensor(scale, requires_grad=True)
    got_t = sdm_loss(img, txt, pids, scale_t)
    got_t.backward()
    assert got_t.item() == pytest.approx(expected, rel=1e-5)
    assert scale_t.grad is not None and scale_t.grad.abs() > 0


def test_sdm_prefers_matching_identities():
    img = torch.eye(4)
    pids = torch.arange(4)
    matched = sdm_loss(img, img, pids, 50.0)
    shuffled = sdm_loss(img, img[[1, 0, 3, 2]], pids, 50.0)
    assert matched.item() < 1e-6 and shuffled.item() > 10


def test_itc_matches_hand_computation():
    img, txt, _ = _features()
    scale = 10.0
    I, T = img.tolist(), txt.tolist()
    directions = []
    for queries, gallery in ((I, T), (T, I)):
        directions.append(
            sum(-math.log(_softmax([scale * _cos(q, g) for g in gallery])[i]) for i, q in enumerate(queries))
            / len(queries)
        )
    expected = sum(directions) / 2
    assert itc_loss(img, txt, scale).item() == pytest.approx(expected, rel=1e-5)
    assert itc_loss(img * 3.0, txt * 0.5, scale).item() == pytest.approx(expected, rel=1e-5)


def test_paired_losses_reject_unpaired_batches():
    img, txt, pids = _features()
    with pytest.raises(ValueError, match="paired"):
        sdm_loss(img, txt[:4], pids, 50.0)
    with pytest.raises(ValueError, match="paired"):
        itc_loss(img, txt[:4], 50.0)


def _stats(probs, counts, num_tokens, requires_grad=False):
    """RoutingStats whose mean probabilities are `probs` over `num_tokens` tokens."""
    prob_sum = torch.tensor(probs, dtype=torch.float32) * num_tokens
    prob_sum.requires_grad_(requires_grad)
    return RoutingStats(prob_sum, torch.tensor(counts, dtype=torch.float32), torch.tensor(float(num_tokens)))


def test_coar_balance_bounds():
    E = 4
    uniform_img = _stats([0.25] * E, [2 * 193 / 4] * E, 193)  # k = 2
    uniform_txt = _stats([0.25] * E, [2 * 20 / 4] * E, 20)
    out = coar_loss([uniform_img], [uniform_txt], lambda_align=1.0)
    assert out["balance"].item() == pytest.approx(1.0)
    assert out["align"].item() == pytest.approx(0.0, abs=1e-7)
    assert out["total"].item() == pytest.approx(1.0)
    # k = 1 and every token sends all its probability to expert 2: the maximum, E.
    collapsed_img = _stats([0.0, 0.0, 1.0, 0.0], [0, 0, 193, 0], 193)
    collapsed_txt = _stats([0.0, 0.0, 1.0, 0.0], [0, 0, 20, 0], 20)
    out = coar_loss([collapsed_img], [collapsed_txt])
    assert out["balance"].item() == pytest.approx(E)
    assert out["align"].item() == pytest.approx(0.0, abs=1e-7)
    # Anything in between lies strictly between the bounds.
    mid = _stats([0.4, 0.3, 0.2, 0.1], [80, 60, 40, 20], 100)
    balance = coar_loss([mid], [mid])["balance"].item()
    assert balance == pytest.approx(4 * (0.4 * 0.4 + 0.3 * 0.3 + 0.2 * 0.2 + 0.1 * 0.1))
    assert 1.0 < balance < E


def test_coar_weights_modalities_equally():
    # 193 image tokens all on expert 0, 20 text tokens all on expert 1 (k = 1):
    # per-modality averaging gives f = P = (1/2, 1/2, 0, 0), not a token-count
    # weighted mix dominated by the images.
    img = _stats([1.0, 0.0, 0.0, 0.0], [193, 0, 0, 0], 193)
    txt = _stats([0.0, 1.0, 0.0, 0.0], [0, 20, 0, 0], 20)
    out = coar_loss([img], [txt], lambda_align=0.5)
    assert out["balance"].item() == pytest.approx(4 * (0.25 + 0.25))
    assert out["align"].item() == pytest.approx(math.log(2))
    assert out["total"].item() == pytest.approx(2.0 + 0.5 * math.log(2))


def test_coar_alignment_is_hand_computed_js_and_sums_layers():
    p = [0.7, 0.1, 0.1, 0.1]
    q = [0.25, 0.25, 0.25, 0.25]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    img = _stats(p, [14, 2, 2, 2], 10)
    txt = _stats(q, [5, 5, 5, 5], 10)
    f = [(14 / 20 + 5 / 20) / 2, (2 / 20 + 5 / 20) / 2, (2 / 20 + 5 / 20) / 2, (2 / 20 + 5 / 20) / 2]
    P = [(a + b) / 2 for a, b in zip(p, q)]
    balance = 4 * sum(x * y for x, y in zip(f, P))
    single = coar_loss([img], [txt], lambda_align=0.3)
    assert single["align"].item() == pytest.approx(js, rel=1e-5)
    assert single["balance"].item() == pytest.approx(balance, rel=1e-5)
    assert single["total"].item() == pytest.approx(balance + 0.3 * js, rel=1e-5)
    uniform = _stats(q, [5, 5, 5, 5], 10)
    two_layers = coar_loss([img, uniform], [txt, uniform], lambda_align=0.3)
    assert two_layers["total"].item() == pytest.approx(balance + 0.3 * js + 1.0, rel=1e-5)
    assert js_divergence(torch.tensor(p), torch.tensor(p)).item() == pytest.approx(0.0, abs=1e-7)


def test_coar_gradient_flows_through_probabilities_only():
    img = _stats([0.4, 0.3, 0.2, 0.1], [12, 4, 2, 2], 10, requires_grad=True)
    txt = _stats([0.1, 0.2, 0.3, 0.4], [2, 4, 6, 8], 10, requires_grad=True)
    coar_loss([img], [txt], lambda_align=0.0)["total"].backward()
    # d balance / d prob_sum^m = E * f / 2 / num_tokens^m, f a constant.
    f = (torch.tensor([12.0, 4, 2, 2]) / 20 + torch.tensor([2.0, 4, 6, 8]) / 20) / 2
    torch.testing.assert_close(img.prob_sum.grad, 4 * f / 2 / 10)
    torch.testing.assert_close(txt.prob_sum.grad, 4 * f / 2 / 10)
    img.prob_sum.grad = None
    coar_loss([img], [txt], lambda_align=1.0)["align"].backward()
    assert img.prob_sum.grad.abs().sum() > 0


def test_coar_rejects_mismatched_or_missing_stats():
    s = _stats([0.25] * 4, [1] * 4, 1)
    with pytest.raises(ValueError, match="1 image and 2 text"):
        coar_loss([s], [s, s])
    with pytest.raises(ValueError, match="num_experts = 0"):
        coar_loss([], [])
    with pytest.raises(ValueError, match="4 vs 3"):
        coar_loss([s], [_stats([1 / 3] * 3, [1] * 3, 1)])


def test_coar_balance_per_modality_penalises_modality_split_routing():
    """Images on experts {0, 1} and text on {2, 3} (k = 2): the joint balance sees
    f = P = uniform and scores its minimum 1; per modality each uses half the experts:
    E * (1/2 * 1/2 + 1/2 * 1/2) = 2 for both."""
    img = _stats([0.5, 0.5, 0.0, 0.0], [193, 193, 0, 0], 193)
    txt = _stats([0.0, 0.0, 0.5, 0.5], [0, 0, 20, 20], 20)
    assert coar_loss([img], [txt], balance="joint")["balance"].item() == pytest.approx(1.0)
    assert coar_loss([img], [txt], balance="per_modality")["balance"].item() == pytest.approx(2.0)
    # Even routing within each modality is the minimum of both; they agree there.
    even_img = _stats([0.25] * 4, [2 * 193 / 4] * 4, 193)
    even_txt = _stats([0.25] * 4, [10] * 4, 20)
    for balance in ("joint", "per_modality"):
        assert coar_loss([even_img], [even_txt], balance=balance)["balance"].item() == pytest.approx(1.0)


def test_coar_balance_per_modality_hand_computed_with_gradient():
    img = _stats([0.4, 0.3, 0.2, 0.1], [12, 4, 2, 2], 10, requires_grad=True)
    txt = _stats([0.1, 0.2, 0.3, 0.4], [2, 4, 6, 8], 10, requires_grad=True)
    f_img, f_txt = [0.6, 0.2, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]
    expected = 4 * (sum(f * p for f, p in zip(f_img, [0.4, 0.3, 0.2, 0.1]))
                    + sum(f * p for f, p in zip(f_txt, [0.1, 0.2, 0.3, 0.4]))) / 2
    out = coar_loss([img, img], [txt, txt], lambda_align=0.0, balance="per_modality")
    assert out["total"].item() == pytest.approx(2 * expected, rel=1e-6)
    out["total"].backward()
    # d / d prob_sum^m = 2 layers * E * f^m / 2 / num_tokens^m
    torch.testing.assert_close(img.prob_sum.grad, 2 * 4 * torch.tensor(f_img) / 2 / 10)
    torch.testing.assert_close(txt.prob_sum.grad, 2 * 4 * torch.tensor(f_txt) / 2 / 10)
    with pytest.raises(ValueError, match="balance 'both'.*joint.*per_modality"):
        coar_loss([img], [txt], balance="both")


@pytest.mark.parametrize("lambda_align", [0.0, 0.1])
def test_coar_gradient_is_finite_when_a_mean_probability_is_zero(lambda_align):
    """An expert that one modality gives exactly zero probability (or a modality with
    no tokens) made the alignment term's gradient NaN, even at lambda_align = 0."""
    img = _stats([0.5, 0.5, 0.0, 0.0], [5, 5, 0, 0], 10, requires_grad=True)
    txt = _stats([0.0, 0.0, 0.0, 0.0], [0, 0, 0, 0], 0, requires_grad=True)  # no text tokens
    out = coar_loss([img], [txt], lambda_align=lambda_align)
    out["total"].backward()
    assert torch.isfinite(img.prob_sum.grad).all() and torch.isfinite(txt.prob_sum.grad).all()
    if lambda_align == 0:  # not computed: the total is the balance alone
        assert out["align"].item() == 0.0 and out["total"].item() == out["balance"].item()
    else:  # JS of (1/2, 1/2, 0, 0) against "nothing" stays a finite number below ln 2
        assert 0.0 < out["align"].item() <= math.log(2) + 1e-6
    p = torch.tensor([0.0, 0.3, 0.7], requires_grad=True)
    q = torch.tensor([0.6, 0.4, 0.0], requires_grad=True)
    js = js_divergence(p, q)
    js.backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    # m = (0.3, 0.35, 0.35); the zero entries add nothing to the divergence.
    expected = 0.5 * (0.3 * math.log(0.3 / 0.35) + 0.7 * math.log(0.7 / 0.35)) \
        + 0.5 * (0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.35))
    assert js.item() == pytest.approx(expected, rel=1e-6)
