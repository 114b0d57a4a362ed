"""CLIP BPE tokenizer: ids equal open_clip's on varied captions, truncation, cleanup."""

import random

import pytest
import torch

from utils.tokenizer import (
    EOT_TOKEN_ID, MASK_TOKEN_ID, SOT_TOKEN_ID, VOCAB_SIZE, get_tokenizer, tokenize,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

WORDS = (
    "a man woman person girl boy wearing wears with in on and the of black white red blue "
    "dark-blue light grey gray jeans t-shirt shirt backpack bag shoes sneakers jacket coat "
    "long short hair glasses hat walking carrying holding umbrella phone skirt dress stripes"
).split()
ODD_PIECES = [
    # punctuation and symbols
    ",", ".", "!", "?", "...", ";", ":", "(", ")", "[x]", "\"quoted\"", "'single'", "--", "/", "\\", "#1",
    "@home", "50%", "$20", "a&b", "c++", "e-mail", "_under_", "~", "*", "<tag>", "|",
    # contractions, mixed case
    "she's", "don't", "they'll", "we've", "I'm", "you're", "he'd", "SHE'S", "McDonald's", "iPhone", "NASA",
    # numbers
    "0", "7", "42", "1999", "3.14", "1,000", "2nd", "10am", "5'11\"", "1/2",
    # html entities (unescaped twice) and mojibake that ftfy repairs
    "&amp;", "&lt;3", "&amp;amp;", "&quot;hi&quot;", "caf&eacute;", "cafÃ©", "naÃ¯ve",
    # unicode letters, accents, scripts, emoji, odd spaces
    "café", "naïve", "Zürich", "façade", "ÅNGSTRÖM", "straße", "ﬁne", "Ｆｕｌｌ", "女人", "背包", "красный",
    "رجل", "γυναίκα", "नमस्ते", "👜", "😀😀", "👩‍👩‍👧", "✓", "→", "©", "½", "\u00a0", "\u200b",
]
WHITESPACE = [" ", "  ", "\t", "\n", " \r\n ", "\u3000"]


def generated_captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = ["", "   ", "!!!", "A", "ALL CAPS CAPTION.", "The man's bag."]
    while len(captions) < n:
        length = rng.choice([3, 8, 15, 25, 40, 120])  # 120 words always exceed 77 tokens
        pieces = [rng.choice(ODD_PIECES) if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(length)]
        if rng.random() < 0.3:
            pieces = [p.capitalize() for p in pieces]
        text = pieces[0]
        for piece in pieces[1:]:
            text += (rng.choice(WHITESPACE) if rng.random() < 0.2 else " ") + piece
        captions.append(text)
    return captions


def test_special_ids_and_vocabulary():
    tokenizer = get_tokenizer()
    assert tokenizer.vocab_size == VOCAB_SIZE == 49408
    assert tokenizer.decoder[SOT_TOKEN_ID] == "<|startoftext|>"
    assert tokenizer.decoder[EOT_TOKEN_ID] == "<|endoftext|>"
    # The mask token reuses the last BPE merge: an ordinary vocabulary entry, not a special token.
    assert MASK_TOKEN_ID == 49405 and tokenizer.decoder[MASK_TOKEN_ID] not in ("<|startoftext|>", "<|endoftext|>")
    assert get_tokenizer() is tokenizer


def test_ids_equal_open_clip_on_varied_captions():
    captions = generated_captions()
    reference = open_clip_tokenizer.SimpleTokenizer()
    assert any(len(reference.encode(c)) > 75 for c in captions), "the set must contain truncated captions"
    for caption in captions:
        assert get_tokenizer().encode(caption) == reference.encode(caption), caption
    ours = tokenize(captions)
    theirs = open_clip_tokenizer.tokenize(captions)
    assert ours.dtype == torch.long and ours.shape == (len(captions), 77)
    mismatched = [c for c, a, b in zip(captions, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[0]!r}"


def test_truncation_keeps_end_of_text_last():
    text = " ".join(["a red backpack and"] * 40)
    full = [SOT_TOKEN_ID] + get_tokenizer().encode(text) + [EOT_TOKEN_ID]
    assert len(full) > 77
    row = tokenize(text)[0]
    assert row[-1] == EOT_TOKEN_ID and row[0] == SOT_TOKEN_ID
    assert row[:-1].tolist() == full[:76]
    assert (row != 0).all()  # no padding in a full row
    assert row.argmax() == 76  # the end-of-text feature sits at the last position


def test_padding_and_context_length():
    ids = tokenize(["a man", "a woman with a bag"], context_length=16)
    assert ids.shape == (2, 16)
    assert ids[0, :4].tolist() == [SOT_TOKEN_ID, 320, 786, EOT_TOKEN_ID]
    assert (ids[0, 4:] == 0).all()
    assert ids.argmax(-1).tolist() == [3, 6]


def test_no_truncate_raises_and_names_the_text():
    text = "walking " * 100
    with pytest.raises(ValueError, match="walking walking"):
        tokenize(["fine", text], truncate=False)
    assert tokenize("short", truncate=False).shape == (1, 77)


def test_cleanup_lower_cases_and_collapses_whitespace():
    assert torch.equal(tokenize("  A  Man\n\tWALKS &amp; talks "), tokenize("a man walks & talks"))
    assert tokenize("Man")[0, 1] == tokenize("man")[0, 1]


def test_decode_round_trip():
    tokenizer = get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("A Woman, in a café!")) == "a woman , in a café ! "
    assert tokenizer.decode(torch.tensor(tokenizer.encode("red coat"))) == "red coat "


def test_special_token_text_maps_to_its_id():
    assert get_tokenizer().encode("<|endoftext|>") == [EOT_TOKEN_ID]


def test_rejects_non_strings():
    with pytest.raises(TypeError, match="item 1"):
        tokenize(["ok", 3])
