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
