"""Byte-level BPE and Unigram on top of Hugging Face ``tokenizers``, exact for every byte string.

Both see text through the byte-level pre-tokenizer, so all 256 bytes are tokens of the vocabulary (the byte
fallback: a byte no longer piece covers is its own token). Rust strings cannot hold invalid UTF-8, so input is cut into
maximal valid-UTF-8 runs, which go through the HF tokenizer, and invalid bytes, which map straight to their
single-byte tokens. Decoding never goes through the HF decoder: a precomputed table gives each id's bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from sentcode.errors import ConfigError, DataError
from sentcode.io import write_text
from sentcode.tokenizer.base import Tokenizer, to_bytes

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
HF_FILE = "tokenizer.json"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

# Bytes that are not valid UTF-8 appear as these lone surrogates after decoding with surrogateescape.
_ESCAPED_RUN = re.compile("([\udc80-\udcff]+)")


def _byte_level_chars() -> dict[str, int]:
    """The byte-level alphabet: each byte is shown as a printable character (the GPT-2 convention HF uses)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    char_of = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in char_of.items()}


def _segments(data: bytes | str) -> list[str | bytes]:
    """Cut input into valid-UTF-8 runs (as str) and invalid bytes (as bytes)."""
    raw = to_bytes(data)
    try:
        return [raw.decode("utf-8")] if raw else []
    except UnicodeDecodeError:
        pass
    pieces = _ESCAPED_RUN.split(raw.decode("utf-8", "surrogateescape"))
    # split() with a capture group alternates: text, escaped run, text, ...
    return [p.encode("utf-8", "surrogateescape") if i % 2 else p for i, p in enumerate(pieces) if p]


class BPETokenizer(Tokenizer):
    kind = "bpe"
    label = "BPE"

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # Literal "<|bos|>" in a text is text, not a special token, or round trips would lose it.
        self._hf.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        ids = [vocab.get(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise DataError(f"{self.label} tokenizer lacks the special tokens " + ", ".join(SPECIAL_TOKENS))
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        byte_of = _byte_level_chars()
        table = [b""] * self.vocab_size
        for token, i in vocab.items():
            if token in SPECIAL_TOKENS:
                continue
            try:
                table[i] = bytes(byte_of[c] for c in token)
            except KeyError:
                raise DataError(f"{self.label} tokenizer token {token!r} is not byte-level") from None
        self._table = table
        byte_ids = [vocab.get(char) for char in sorted(byte_of, key=byte_of.get)]
        if None in byte_ids:
            raise DataError(f"{self.label} tokenizer does not cover all 256 bytes")
        self._byte_ids: list[int] = byte_ids

    def encode(self, data: bytes | str) -> list[int]:
        return self.encode_batch([data])[0]

    def encode_batch(self, items: Sequence[bytes | str]) -> list[list[int]]:
        segmented = [_segments(x) for x in items]
        texts = [s for segs in segmented for s in segs if isinstance(s, str)]
        encoded = iter(self._hf.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        out = []
        for segs in segmented:
            ids: list[int] = []
            for s in segs:
                if isinstance(s, str):
                    ids.extend(next(encoded).ids)
                else:
                    ids.extend(self._byte_ids[b] for b in s)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> bytes:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        # A negative id would silently index from the end of the table.
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            for i in ids:
                self._check_id(int(i))
        table = self._table
        return b"".join([table[i] for i in ids])

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._table[token_id]

    def _save_files(self, directory: Path) -> None:
        write_text(directory / HF_FILE, self._hf.to_str())

    @classmethod
    def load(cls, directory: str | os.PathLike, meta: dict[str, Any] | None = None) -> BPETokenizer:
        path = Path(directory) / HF_FILE
        if not path.is_file():
            raise DataError(f"no {cls.label} tokenizer at {directory} (missing {HF_FILE})")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side reports parse errors as plain Exception
            raise DataError(f"corrupt {cls.label} tokenizer {path}: {e}") from None
        tok = cls(hf)
        if meta is not None and meta.get("vocab_size") != tok.vocab_size:
            raise DataError(
                f"corrupt {cls.label} tokenizer {path}: meta says vocab_size {meta.get('vocab_size')},"
                f" file has {tok.vocab_size}"
            )
        return tok


def _training_batches(texts: Iterable[str | bytes], batch: int = 1000) -> Iterator[list[str]]:
    # Invalid bytes are in the base alphabet already, so only the valid runs carry anything to learn.
    buf: list[str] = []
    for text in texts:
        buf.extend(s for s in _segments(text) if isinstance(s, str))
        if len(buf) >= batch:
            yield buf
            buf = []
    if buf:
        yield buf


class UnigramTokenizer(BPETokenizer):
    """A Unigram language model over byte-level pieces (SentencePiece's algorithm, as a-lm offers it): the same
    exact encoding and decoding as the BPE tokenizer, only the vocabulary and the segmentation differ."""

    kind = "unigram"
    label = "Unigram"


def _train(cls, model, trainer_cls, texts: Iterable[str | bytes], vocab_size: int, **options):
    """Train ``model`` with ``trainer_cls`` over byte-level pieces, all 256 bytes in the alphabet."""
    if vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"{cls.label} vocab_size must be at least {MIN_VOCAB} (256 bytes + 3 specials), got {vocab_size}"
        )
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainer_cls(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **options)
    hf.train_from_iterator(_training_batches(texts), trainer)
    return cls(hf)


def train_unigram(texts: Iterable[str | bytes], vocab_size: int) -> UnigramTokenizer:
    """Train a byte-level Unigram tokenizer with ``vocab_size`` ids at most."""
    return _train(UnigramTokenizer, models.Unigram(), trainers.UnigramTrainer, texts, vocab_size, max_piece_length=16)


def train_bpe(texts: Iterable[str | bytes], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids at most (fewer if the texts run out of merges)."""
    return _train(BPETokenizer, models.BPE(), trainers.BpeTrainer, texts, vocab_size)
