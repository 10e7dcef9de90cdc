"""The byte tokenizer: one id per byte, plus three specials."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sentcode.tokenizer.base import Tokenizer, to_bytes


class ByteTokenizer(Tokenizer):
    kind = "bytes"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, data: bytes | str) -> list[int]:
        return np.frombuffer(to_bytes(data), dtype=np.uint8).tolist()

    def encode_array(self, data: bytes | str) -> np.ndarray:
        """Like ``encode`` but as a uint16 array, without building a Python list."""
        return np.frombuffer(to_bytes(data), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> bytes:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            self._check_id(int(bad))
        return arr[arr < 256].astype(np.uint8).tobytes()

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return bytes([token_id]) if token_id < 256 else b""
