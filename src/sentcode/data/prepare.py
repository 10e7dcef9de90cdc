"""Turn a corpus into a data directory: token shards per split, the tokenizer, held-out text and a meta file.

Each split is one token stream: every document's tokens followed by EOS, so EOS both ends a document and
marks where the next one starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sentcode.corpus import Document, load_corpus
from sentcode.data.shards import DTYPES, dtype_code_for, read_tokens, write_tokens
from sentcode.errors import ConfigError, DataError
from sentcode.io import atomic_dir, write_json
from sentcode.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe, train_unigram

FORMAT = "sentcode-data"
VERSION = 1
SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")
TOKENIZER_KINDS = ("bytes", "bpe", "unigram")
ENCODE_CHUNK = 256  # documents per encode_batch call: big enough to batch, small enough to bound memory


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _encode_stream(tokenizer: Tokenizer, docs: Sequence[Document], dtype: np.dtype) -> np.ndarray:
    """All documents' tokens, each followed by EOS. A document repeated by weighting is encoded once."""
    unique: dict[int, Document] = {}
    for doc in docs:
        unique.setdefault(id(doc), doc)
    encoded: dict[int, np.ndarray] = {}
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    items = list(unique.items())
    for start in range(0, len(items), ENCODE_CHUNK):
        chunk = items[start : start + ENCODE_CHUNK]
        if isinstance(tokenizer, ByteTokenizer):
            arrays = [tokenizer.encode_array(d.text) for _, d in chunk]
        else:
            arrays = [
                np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch([d.text for _, d in chunk])
            ]
        for (key, _), arr in zip(chunk, arrays, strict=True):
            encoded[key] = np.concatenate([arr.astype(dtype), eos])
    if not docs:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([encoded[id(d)] for d in docs])


def _write_documents(path: Path, docs: Iterable[Document]) -> None:
    # ensure_ascii turns surrogate-escaped bytes into \udcXX escapes, which json.loads gives back unchanged.
    with open(path, "w", encoding="ascii") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc.text, "doc_id": doc.doc_id}, ensure_ascii=True) + "\n")


def prepare_data(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer: str = "bytes",
    vocab_size: int = 4096,
    val_frac: float = 0.05,
    test_frac: float = 0.05,
    progress: bool = True,
) -> dict[str, Any]:
    """Load and split a corpus, tokenize it and write a data directory at ``out_dir``; return its meta."""
    if tokenizer not in TOKENIZER_KINDS:
        raise ConfigError(f"unknown tokenizer {tokenizer!r} (expected one of: {', '.join(TOKENIZER_KINDS)})")
    say: Callable[..., None] = _console_log() if progress else (lambda *a, **k: None)

    splits = load_corpus(spec, val_frac=val_frac, test_frac=test_frac)
    say(
        f"corpus: {len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test documents"
        f" ({splits.duplicates_removed} duplicates removed)"
    )
    if tokenizer in ("bpe", "unigram"):
        say(f"training {'BPE' if tokenizer == 'bpe' else 'Unigram'} (vocab {vocab_size}) on the train split")
        trainer = train_bpe if tokenizer == "bpe" else train_unigram
        tok: Tokenizer = trainer((d.text for d in {id(d): d for d in splits.train}.values()), vocab_size)
    else:
        tok = ByteTokenizer()
    dtype = DTYPES[dtype_code_for(tok.vocab_size)]

    split_meta: dict[str, dict[str, int]] = {}
    with atomic_dir(out_dir) as tmp:
        tok.save(tmp / "tokenizer")
        for name in SPLITS:
            docs = splits[name]
            say(f"encoding {name}: {len(docs)} documents")
            tokens = _encode_stream(tok, docs, dtype)
            write_tokens(tmp / f"{name}.bin", tokens, vocab_size=tok.vocab_size)
            split_meta[name] = {
                "documents": len(docs),
                "bytes": sum(_utf8_len(d.text) for d in docs),
                "tokens": int(tokens.size),
            }
            if name in HELD_OUT:
                _write_documents(tmp / f"{name}.jsonl", docs)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "corpus": _spec_as_given(spec),
            "tokenizer": tok.meta(),
            "splits": split_meta,
            "duplicates_removed": splits.duplicates_removed,
            "val_frac": val_frac,
            "test_frac": test_frac,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / "meta.json", meta)
    say(f"wrote {out_dir}: " + ", ".join(f"{n} {m['tokens']:,} tokens" for n, m in split_meta.items()))
    return meta


def _spec_as_given(spec: Any) -> Any:
    if isinstance(spec, (str, os.PathLike)):
        return os.fspath(spec)
    return [os.fspath(s) for s in spec]


def _console_log() -> Callable[..., None]:
    from rich.console import Console

    return Console(stderr=True, log_path=False).log


class DataDir:
    """A prepared data directory (see ``prepare_data``), validated on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"no data directory at {self.path} (run `sentcode data prepare` first)")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(
                f"no data directory at {self.path}: meta.json is missing (run `sentcode data prepare`)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"corrupt data directory {self.path}: meta.json is not JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{self.path} is not a sentcode data directory (meta.json has the wrong format)")
        if meta.get("version") != VERSION:
            raise DataError(
                f"data directory {self.path} has version {meta.get('version')}, expected {VERSION}"
            )
        if not isinstance(meta.get("splits"), dict) or set(meta["splits"]) != set(SPLITS):
            raise DataError(f"corrupt data directory {self.path}: meta.json does not list the splits")
        self.meta: dict[str, Any] = meta

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path / "tokenizer")

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} (expected train, val or test)")

    def tokens(self, split: str) -> np.ndarray:
        self._check_split(split)
        tokens = read_tokens(self.path / f"{split}.bin")
        expected = self.meta["splits"][split]["tokens"]
        if tokens.size != expected:
            raise DataError(
                f"corrupt data directory {self.path}: {split}.bin has {tokens.size} tokens,"
                f" meta says {expected}"
            )
        return tokens

    def split_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's documents (the denominator of bits-per-byte)."""
        self._check_split(split)
        return int(self.meta["splits"][split]["bytes"])

    def documents(self, split: str) -> list[str]:
        """The split's document texts (surrogate-escaped where the source was not valid UTF-8).

        Train is read back from its token stream, so it includes the repeats that source weights add.
        """
        self._check_split(split)
        if split in HELD_OUT:
            path = self.path / f"{split}.jsonl"
            if not path.is_file():
                raise DataError(f"corrupt data directory {self.path}: {path.name} is missing")
            with open(path, encoding="ascii") as f:
                return [json.loads(line)["text"] for line in f if line.strip()]
        # Train text is not stored twice: the stream decodes back to it exactly, document by document.
        tokens = np.asarray(self.tokens(split))
        ends = np.flatnonzero(tokens == self.tokenizer.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else np.zeros(0, dtype=np.int64)
        decode = self.tokenizer.decode
        return [
            decode(tokens[s:e].tolist()).decode("utf-8", "surrogateescape")
            for s, e in zip(starts, ends, strict=True)
        ]

    def __repr__(self) -> str:
        return f"DataDir({str(self.path)!r})"
