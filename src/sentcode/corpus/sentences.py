"""Sentence splitting for sentence-step models: documents -> ordered lists of sentences of bounded size.

Sentence boundaries come from ``nupunkt`` (an offline Punkt model that knows abbreviations, decimals and
initials). Two things are done around it:

* paragraphs (blank-line separated) are split first, because Punkt only looks at punctuation and would
  glue a heading without a full stop onto the paragraph under it;
* a sentence longer than ``max_bytes`` UTF-8 bytes is cut into pieces instead of dropped, so no text is
  lost from the corpus. A cut goes at the last whitespace inside the limit when there is one, else at a
  character boundary, so a piece is always valid text.

Text decoded with ``errors="surrogateescape"`` (invalid input bytes carried as U+DC80..U+DCFF) is
measured by the bytes it will be written back as: one byte per escaped character.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate

import nupunkt

from sentcode.errors import ConfigError

# A 4-byte character must fit in one piece, or a cut could make no progress.
MIN_MAX_BYTES = 4

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


@dataclass
class SplitStats:
    documents: int = 0
    sentences: int = 0  # after cutting: pieces of over-long sentences each count as one
    split_long: int = 0  # sentences that were over max_bytes and got cut
    pieces_from_long: int = 0  # pieces those sentences became


def _char_bytes(ch: str) -> int:
    # Measured per character rather than by encoding, so that lone surrogates outside the escape range
    # (which no UTF-8 error handler that we use can encode) are sized instead of raising.
    cp = ord(ch)
    if cp < 0x80:
        return 1
    if cp < 0x800:
        return 2
    if 0xDC80 <= cp <= 0xDCFF:
        return 1  # surrogateescape: one original byte
    if cp < 0x10000:
        return 3
    return 4


def utf8_len(text: str) -> int:
    """Bytes ``text`` takes as UTF-8, counting surrogate-escaped characters as the single byte they stand for."""
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return sum(map(_char_bytes, text))


def _check_max_bytes(max_bytes: int) -> None:
    if not isinstance(max_bytes, int) or max_bytes < MIN_MAX_BYTES:
        raise ConfigError(f"sentence max_bytes must be an integer >= {MIN_MAX_BYTES}, got {max_bytes!r}")


def cut_long(sentence: str, max_bytes: int) -> list[str]:
    """Cut one stripped sentence into stripped pieces of at most ``max_bytes`` UTF-8 bytes each."""
    if utf8_len(sentence) <= max_bytes:
        return [sentence] if sentence else []
    ends = [0, *accumulate(map(_char_bytes, sentence))]  # ends[i]: bytes in sentence[:i]
    n = len(sentence)
    pieces: list[str] = []
    start = 0
    while start < n and ends[n] - ends[start] > max_bytes:
        limit = bisect_right(ends, ends[start] + max_bytes) - 1  # longest prefix that fits
        cut = limit
        # A space at index `limit` is a clean cut too: the piece ends just before it.
        for i in range(limit, start, -1):
            if sentence[i].isspace():
                cut = i
                break
        piece = sentence[start:cut].rstrip()
        if piece:
            pieces.append(piece)
        start = cut
        while start < n and sentence[start].isspace():
            start += 1
    if start < n:
        pieces.append(sentence[start:])
    return pieces


def _punkt(paragraph: str) -> list[str]:
    return nupunkt.sent_tokenize(paragraph)


def _split(text: str, max_bytes: int, stats: SplitStats | None) -> list[str]:
    out: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        if not paragraph.strip():
            continue
        for sentence in _punkt(paragraph):
            sentence = sentence.strip()
            if not sentence:
                continue
            pieces = cut_long(sentence, max_bytes)
            if stats is not None and len(pieces) > 1:
                stats.split_long += 1
                stats.pieces_from_long += len(pieces)
            out.extend(pieces)
    return out


def split_sentences(text: str, max_bytes: int = 256) -> list[str]:
    """Split ``text`` into stripped, non-empty sentences of at most ``max_bytes`` UTF-8 bytes, in order."""
    _check_max_bytes(max_bytes)
    return _split(text, max_bytes, None)


def sentences_of_documents(
    docs: Iterable[str], max_bytes: int = 256
) -> tuple[list[list[str]], SplitStats]:
    """Sentences of each document; the result's index is the document id (the position in ``docs``)."""
    _check_max_bytes(max_bytes)
    stats = SplitStats()
    result: list[list[str]] = []
    for text in docs:
        sentences = _split(text, max_bytes, stats)
        stats.documents += 1
        stats.sentences += len(sentences)
        result.append(sentences)
    return result, stats
