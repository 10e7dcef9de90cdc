"""Loading a saved tokenizer of either kind from its directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sentcode.errors import DataError
from sentcode.tokenizer.base import META_FILE, Tokenizer
from sentcode.tokenizer.bpe import BPETokenizer, UnigramTokenizer
from sentcode.tokenizer.bytes import ByteTokenizer


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved with ``Tokenizer.save``; the meta file says which kind it is."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DataError(f"no tokenizer at {directory} (missing {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"corrupt tokenizer meta {meta_path}: {e}") from None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.load(directory, meta)
    if kind == "unigram":
        return UnigramTokenizer.load(directory, meta)
    raise DataError(f"unknown tokenizer kind {kind!r} in {meta_path}")
