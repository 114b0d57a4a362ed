"""Baseline losses: MLM masking and head, ID and CMPM against hand-computed values."""
import math

import pytest
import torch
from torch import nn

from model.mlm import IGNORE_INDEX, MLMHead, mask_caption_tokens, mlm_capacity, mlm_positions
from model.objectives import accuracy, cmpm_loss, id_logits, id_loss, mlm_loss
from utils.tokenizer import EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID


def _captions(num: int, length: int = 40, min_words: int = 1, max_words: int = 38, seed: int = 0):
    """(num, length) SOT + random word ids + EOT + zero padding, and the word counts."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(min_words, max_words + 1, (num,), generator=g)
    ids = torch.zeros(num, length, dtype=torch.long)
    for i, n in enumerate(words.tolist()):
        ids[i, 0] = SOT_TOKEN_ID
        ids[i, 1:n + 1] = torch.randint(1, MASK_TOKEN_ID, (n,), generator=g)
        ids[i, n + 1] = EOT_TOKEN_ID
    return ids, words


# -- MLM masking --------------------------------------------------------------

def test_masking_statistics():
    ids, words = _captions(2000)
    masked, labels = mask_caption_tokens(ids, torch.Generator().manual_seed(1))
    word = (ids > 0) & (ids < MASK_TOKEN_ID)
    selected = labels != IGNORE_INDEX
    # Only word tokens are ever selected; specials and padding are untouched.
    assert not (selected & ~word).any()
    assert torch.equal(masked[~word], ids[~word])
    # Labels: the original id where selected, ignore elsewhere; unselected ids unchanged.
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == IGNORE_INDEX).all()
    assert torch.equal(masked[~selected], ids[~selected])
    # Selection rate: 15% of word tokens plus one forced token per caption that
    # drew none (probability 0.85^n for n words).
    expected = sum(0.15 * n + 0.85 ** n for n in words.tolist())
    total = int(selected.sum())
    assert abs(total - expected) < 4 * math.sqrt(expected)
    assert 0.13 < total / int(word.sum()) < 0.18
    # Of the selected: 80% mask, 10% random (non-special) ids, 10% kept.
    is_mask = masked[selected] == MASK_TOKEN_ID
    changed = (masked[selected] != ids[selected]) & ~is_mask
    kept = masked[selected] == ids[selected]
    n = float(total)
    assert abs(is_mask.sum() / n - 0.8) < 0.02
    assert abs(changed.sum() / n - 0.1) < 0.015
    assert abs(kept.sum() / n - 0.1) < 0.015
    replaced = masked[selected][changed]
    assert ((replaced >= 1) & (replaced < MASK_TOKEN_ID)).all()
    # Specials keep their positions.
    assert (masked[:, 0] == SOT_TOKEN_ID).all()
    assert (masked.gather(1, (words + 1)[:, None]) == EOT_TOKEN_ID).all()


def test_masking_at_least_one_and_candidates():
    ids = torch.tensor([
        [SOT_TOKEN_ID, 5, EOT_TOKEN_ID, 0, 0],
        [SOT_TOKEN_ID, 7, 8, EOT_TOKEN_ID, 0],
        [SOT_TOKEN_ID, EOT_TOKEN_ID, 0, 0, 0],  # no word token: nothing to select
        [SOT_TOKEN_ID, MASK_TOKEN_ID, 9, EOT_TOKEN_ID, 0],  # an already masked token is no candidate
    ])
    for seed in range(50):
        masked, labels = mask_caption_tokens(ids, torch.Generator().manual_seed(seed))
        selected = labels != IGNORE_INDEX
        assert selected[[0, 1, 3]].any(dim=1).all()
        assert not selected[2].any() and torch.equal(masked[2], ids[2])
        assert selected[3].tolist() == [False, False, True, False, False]
        assert selected[0].tolist() == [False, True, False, False, False]
    # A low rate forces exactly one selection per caption, at a random position.
    ids, _ = _captions(500, min_words=10, max_words=10)
    _, labels = mask_caption_tokens(ids, torch.Generator().manual_seed(0), select_prob=1e-6)
    selected = labels != IGNORE_INDEX
    assert (selected.sum(dim=1) == 1).all()
    positions = selected.float().argmax(dim=1)
    assert positions.unique().numel() == 10  # not always the first word


def test_masking_is_deterministic_per_seed():
    ids, _ = _captions(64)
    a = mask_caption_tokens(ids, torch.Generator().manual_seed(3))
    b = mask_caption_tokens(ids, torch.Generator().manual_seed(3))
    c = mask_caption_tokens(ids, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert a[0].dtype == a[1].dtype == torch.long and a[0].shape == ids.shape


def test_masking_rejects_bad_arguments():
    ids, _ = _captions(4)
    with pytest.raises(ValueError, match="select_prob"):
        mask_caption_tokens(ids, select_prob=0.0)
    with pytest.raises(ValueError, match="random_prob"):
        mask_caption_tokens(ids, mask_prob=0.95, random_prob=0.1)
    with pytest.raises(ValueError, match="long"):
        mask_caption_tokens(ids.float())


# -- MLM head and loss --------------------------------------------------------

def _head_inputs(B=3, L=7, N=5, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, D, generator=g)
    image = torch.randn(B, N, D, generator=g)
    lengths = torch.tensor([7, 4, 2])[:B]
    valid = torch.arange(L)[None, :] < lengths[:, None]
    return text, image, valid


def test_mlm_head_shapes_and_selected_positions():
    torch.manual_seed(0)
    head = MLMHead(32, vocab_size=50, heads=4, cmt_depth=2).eval()
    text, image, valid = _head_inputs()
    logits = head(text, image, valid)
    assert logits.shape == (3, 7, 50) and torch.isfinite(logits).all()
    predict_at = torch.zeros(3, 7, dtype=torch.bool)
    predict_at[0, 2] = predict_at[1, 1] = predict_at[1, 3] = True
    picked = head(text, image, valid, predict_at=predict_at)
    assert picked.shape == (3, 50)
    torch.testing.assert_close(picked, logits[predict_at])


def test_mlm_positions_put_the_labelled_ones_first_in_a_fixed_shape():
    torch.manual_seed(0)
    labels = torch.full((4, 9), IGNORE_INDEX)
    labels[0, 3] = 5
    labels[2, 1] = 7
    labels[2, 6] = 8
    labels[3, 2] = 9
    positions = mlm_positions(labels, capacity=10)
    assert positions.shape == (10,) and positions.dtype == torch.long
    flat = labels.flatten()
    assert torch.equal(flat[positions[:4]], torch.tensor([5, 7, 8, 9]))  # row-major order
    assert (flat[positions[4:]] == IGNORE_INDEX).all()
    assert len(set(positions.tolist())) == 10
    assert mlm_positions(labels, capacity=100).shape == (36,)  # never more than there are


def test_mlm_capacity_bounds():
    assert mlm_capacity(8, 24, 1.0) == 8 * 22  # every candidate
    cap = mlm_capacity(64, 77, 0.15)
    assert 0.15 * 64 * 75 + 64 < cap < 64 * 75
    # A batch of full-length captions: the count exceeds the capacity with probability
    # far below 1e-6 (8 standard deviations); check on 500 draws of the real masking.
    ids = torch.randint(1, 400, (64, 77))
    ids[:, 0], ids[:, -1] = SOT_TOKEN_ID, EOT_TOKEN_ID
    g = torch.Generator().manual_seed(0)
    counts = [int((mask_caption_tokens(ids, g)[1] != IGNORE_INDEX).sum()) for _ in range(500)]
    assert max(counts) < cap


def test_mlm_loss_at_fixed_positions_equals_the_masked_selection():
    torch.manual_seed(0)
    head = MLMHead(32, vocab_size=50, heads=4, cmt_depth=2).eval()
    text, image, valid = _head_inputs()
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[0, 2], labels[1, 1], labels[1, 3], labels[2, 4] = 4, 9, 17, 33
    picked = labels != IGNORE_INDEX
    want = mlm_loss(head(text, image, valid, predict_at=picked), labels[picked])
    positions = mlm_positions(labels, capacity=6)
    got = mlm_loss(head(text, image, valid, predict_at=positions), labels.flatten()[positions])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="predict_at"):
        head(text, image, valid, predict_at=torch.zeros(3, 7, dtype=torch.long))


def test_mlm_head_samples_are_independent():
    torch.manual_seed(0)
    head = MLMHead(32, vocab_size=50, heads=4, cmt_depth=2).eval()
    text, image, valid = _head_inputs()
    logits = head(text, image, valid)
    # Change the other samples (text, image, valid lengths) and sample 0's padding.
    text2, image2, valid2 = text.clone(), image.clone(), valid.clone()
    text2[1:] = torch.randn_like(text2[1:])
    image2[1:] = torch.randn_like(image2[1:]) * 5
    valid2[1:] = True
    text3 = text.clone()
    text3[2, 2:] = 1e3  # padding of sample 2 is never attended to
    logits2 = head(text2, image2, valid2)
    logits3 = head(text3, image, valid)
    torch.testing.assert_close(logits2[0], logits[0])
    assert not torch.allclose(logits2[1], logits[1])
    torch.testing.assert_close(logits3[2, :2], logits[2, :2])
    # The prediction depends on the sample's own image.
    image4 = image.clone()
    image4[0] = torch.randn_like(image4[0])
    assert not torch.allclose(head(text, image4, valid)[0], logits[0])
    # Alone in a batch, a sample gets the same logits.
    torch.testing.assert_close(head(text[1:2], image[1:2], valid[1:2])[0], logits[1],
                               atol=1e-5, rtol=1e-5)


def test_mlm_gradients_reach_every_head_parameter():
    torch.manual_seed(0)
    head = MLMHead(32, vocab_size=50, heads=4, cmt_depth=2)
    text, image, valid = _head_inputs()
    text.requires_grad_(True)
    image.requires_grad_(True)
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[0, 1], labels[1, 2], labels[2, 1] = 3, 17, 49
    loss = mlm_loss(head(text, image, valid), labels)
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert text.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


def test_mlm_loss_ignores_unlabelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, generator=g)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 2, 5
    loss = mlm_loss(logits, labels)
    expected = 0.0
    for b, l in ((0, 1), (1, 3)):
        row = logits[b, l].tolist()
        expected += math.log(sum(math.exp(v) for v in row)) - row[labels[b, l]]
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = torch.randn(6, 6, generator=g) * 10
    assert mlm_loss(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[0, 1, 0] += 1.0
    assert mlm_loss(changed, labels).item() != pytest.approx(loss.item(), rel=1e-6)
    # No labels: a zero that still backpropagates.
    logits.requires_grad_(True)
    zero = mlm_loss(logits, torch.full((2, 4), IGNORE_INDEX))
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None and (logits.grad == 0).all()


# -- ID -------------------------------------------------------------------------

def _log_softmax_at(row, target):
    m = max(row)
    return row[target] - (m + math.log(sum(math.exp(v - m) for v in row)))


def test_id_loss_matches_hand_computation():
    torch.manual_seed(0)
    classifier = nn.Linear(4, 3)
    img, txt = torch.randn(5, 4), torch.randn(5, 4)
    pids = torch.tensor([0, 2, 1, 2, 0])
    assert classifier(img).shape == (5, 3)
    W, b = classifier.weight.tolist(), classifier.bias.tolist()

    def ce(feats):
        total = 0.0
        for x, y in zip(feats.tolist(), pids.tolist()):
            logits = [sum(w * v for w, v in zip(W[c], x)) + b[c] for c in range(3)]
            total -= _log_softmax_at(logits, y)
        return total / len(feats)

    got = id_loss(*id_logits(classifier, img, txt), pids)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx((ce(img) + ce(txt)) / 2, rel=1e-5)
    got.backward()
    assert classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="paired"):
        id_logits(classifier, img, txt[:4])
    with pytest.raises(ValueError, match="paired"):
        id_loss(*id_logits(classifier, img, txt), pids[:4])


def test_accuracy_counts_top1_hits_over_labelled_rows():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
    labels = torch.tensor([0, 1, IGNORE_INDEX, 1])
    assert accuracy(logits, labels).item() == pytest.approx(2 / 3)  # rows 0 and 3 of 0, 1, 3
    assert accuracy(logits, torch.full((4,), IGNORE_INDEX)).item() == 0.0


# -- CMPM -----------------------------------------------------------------------

def test_cmpm_matches_hand_computation():
    img = torch.tensor([[1.0, 2.0, 0.5], [-1.0, 0.5, 2.0], [0.3, -2.0, 1.0]])
    txt = torch.tensor([[0.5, 1.5, 1.0], [-2.0, 0.1, 1.0], [1.0, -1.0, 0.2]])
    pids = torch.tensor([4, 7, 4])
    eps = 1e-8
    I, T, P = img.tolist(), txt.tolist(), pids.tolist()

    def norm(v):
        return math.sqrt(sum(x * x for x in v))

    expected = 0.0
    for queries, gallery in ((I, T), (T, I)):
        total = 0.0
        for i, q in enumerate(queries):
            # Projection of the (unnormalised) query onto each normalised gallery item.
            proj = [sum(a * b for a, b in zip(q, g)) / norm(g) for g in gallery]
            same = [1.0 if P[i] == P[j] else 0.0 for j in range(3)]
            target = [s / math.sqrt(sum(same)) for s in same]  # L2-normalised labels
            for j in range(3):
                log_p = _log_softmax_at(proj, j)
                total += math.exp(log_p) * (log_p - math.log(target[j] + eps))
        expected += total / 3
    got = cmpm_loss(img, txt, pids)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Scaling the queries sharpens the projections (no normalisation of that side).
    assert cmpm_loss(img * 3, txt * 3, pids).item() != pytest.approx(expected, rel=1e-3)


def test_cmpm_prefers_matching_identities():
    feats = torch.eye(4) * 10
    pids = torch.arange(4)
    assert cmpm_loss(feats, feats, pids).item() < 0.01
    assert cmpm_loss(feats, feats[[1, 0, 3, 2]], pids).item() > 10
