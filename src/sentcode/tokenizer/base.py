"""The tokenizer interface shared by every model: bytes in, ids out, and back to the exact bytes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sentcode.io import write_json

META_FILE = "tokenizer_meta.json"


def to_bytes(data: bytes | str) -> bytes:
    """Text is UTF-8 with surrogate escapes: a str decoded with ``surrogateescape`` gives its bytes back."""
    if isinstance(data, str):
        return data.encode("utf-8", "surrogateescape")
    return bytes(data)


class Tokenizer:
    """Maps byte strings to token ids and back. ``decode(encode(b)) == b`` for every byte string ``b``."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def special_ids(self) -> tuple[int, int, int]:
        return (self.bos_id, self.eos_id, self.pad_id)

    def encode(self, data: bytes | str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, items: Sequence[bytes | str]) -> list[list[int]]:
        """Encode many texts; subclasses override this where batching is faster."""
        return [self.encode(x) for x in items]

    def decode(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``; special tokens decode to nothing."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        # The meta goes last: a directory with a meta file always has everything the meta points to.
        write_json(directory / META_FILE, self.meta())

    def _save_files(self, directory: Path) -> None:
        """Write whatever besides the meta this kind needs."""

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
