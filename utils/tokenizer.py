"""CLIP's byte-level BPE tokenizer.

Text is cleaned the way CLIP cleans it (ftfy, HTML unescaping twice, runs of
whitespace collapsed to one space, lower-cased), split with CLIP's regular
expression, mapped to unicode "byte characters" so that any UTF-8 input has a
spelling, and merged with the 48,894 BPE merges of
``data/bpe_simple_vocab_16e6.txt.gz``.

Vocabulary layout (49,408 ids):
    0..255        single byte characters
    256..511      single byte characters ending a word ("</w>")
    512..49405    one id per merge, in merge-rank order
    49406         <|startoftext|>
    49407         <|endoftext|>

The last merge (49405) is repurposed as the mask token for masked language
modelling and text augmentation, as IRRA does.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import regex
import torch

DEFAULT_BPE_PATH = Path(__file__).resolve().parent.parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
MASK_TOKEN_ID = 49405
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file

_WORD_END = "</w>"
# Special tokens first so that they survive as single pieces; then English
# contractions, letter runs, single digits, and runs of anything else that is
# neither space, letter nor digit.
_SPLIT_PATTERN = (
    regex.escape(SOT_TOKEN) + "|" + regex.escape(EOT_TOKEN)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """Map every byte value to a printable unicode character.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (control
    characters, space, ...) map to code points 256 and up, in byte order. BPE
    then never sees whitespace or control characters inside a word. The dict's
    order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_code)
            next_code += 1
    return mapping


def _adjacent_pairs(symbols: Sequence[str]) -> set[tuple[str, str]]:
    return set(zip(symbols[:-1], symbols[1:]))


def clean_text(text: str) -> str:
    """CLIP's text normalisation: fix mojibake, unescape HTML twice, collapse
    whitespace, strip, lower-case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class SimpleTokenizer:
    """CLIP's BPE tokenizer. ``encode`` returns ids without SOT/EOT."""

    def __init__(self, bpe_path: str | Path = DEFAULT_BPE_PATH):
        bpe_path = Path(bpe_path)
        if not bpe_path.is_file():
            raise FileNotFoundError(
                f"BPE vocabulary not found at {bpe_path}; it ships with the repository as "
                "data/bpe_simple_vocab_16e6.txt.gz (restore it from version control)."
            )
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is a version header; CLIP keeps the next NUM_MERGES lines.
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path} is not a CLIP BPE merge list ({NUM_MERGES} 'a b' lines expected).")

        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        vocab = base + [c + _WORD_END for c in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.split_pattern = regex.compile(_SPLIT_PATTERN, regex.IGNORECASE)
        self._bpe_cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        assert len(self.encoder) == VOCAB_SIZE
        assert self.encoder[SOT_TOKEN] == SOT_TOKEN_ID and self.encoder[EOT_TOKEN] == EOT_TOKEN_ID

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Split one pre-tokenized word (byte characters) into BPE pieces."""
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached.split(" ")
        symbols = list(word[:-1]) + [word[-1] + _WORD_END]
        while len(symbols) > 1:
            pairs = _adjacent_pairs(symbols)
            best = min(pairs, key=lambda p: self.merge_rank.get(p, NUM_MERGES))
            if best not in self.merge_rank:
                break
            # Merge every non-overlapping occurrence of the best pair, left to right.
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._bpe_cache[word] = " ".join(symbols)
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned and lower-cased), without SOT/EOT."""
        ids = []
        for word in self.split_pattern.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(word))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids``; word ends become spaces. Invalid UTF-8 is replaced."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace(_WORD_END, " ")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer over the repository's vocabulary (built once)."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Tokenize captions into a zero-padded id matrix.

    Each row is ``SOT, bpe ids..., EOT, 0, 0, ...``. An over-long caption is cut
    to ``context_length`` ids with EOT kept in the last position (so the
    end-of-text feature still exists); with ``truncate=False`` it raises.

    Returns: LongTensor (N, context_length).
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length={context_length}: need at least 2 positions for SOT and EOT.")
    tokenizer = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize() expects strings; item {row} is {type(text).__name__}: {text!r:.80}")
        ids = [SOT_TOKEN_ID] + tokenizer.encode(text) + [EOT_TOKEN_ID]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"Caption {row} has {len(ids)} tokens, more than context_length={context_length}: "
                    f"{text!r:.120}. Pass truncate=True or raise the text length."
                )
            ids = ids[:context_length - 1] + [EOT_TOKEN_ID]
        result[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
