"""Token shards: a flat array of token ids behind a small self-describing header.

Header (32 bytes, little-endian): magic ``SCTOK\\0\\1\\0``, u32 format version, u32 dtype code
(1 = uint16, 2 = uint32), u64 token count, 8 reserved bytes. The tokens follow, little-endian.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from sentcode.errors import DataError
from sentcode.io import atomic_path

MAGIC = b"SCTOK\x00\x01\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8s")
HEADER_SIZE = HEADER.size
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
UINT16_MAX_VOCAB = 65535

assert HEADER_SIZE == 32


def dtype_code_for(vocab_size: int) -> int:
    return 1 if vocab_size <= UINT16_MAX_VOCAB else 2


def write_tokens(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int | None = None) -> None:
    """Write ``tokens`` atomically; uint16 when the vocabulary (or, if not given, the largest id) allows."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint32).max):
        raise ValueError("token ids must fit in uint32")
    if vocab_size is None:
        vocab_size = int(tokens.max()) + 1 if tokens.size else 0
    elif tokens.size and tokens.max() >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary (size {vocab_size})")
    code = dtype_code_for(vocab_size)
    header = HEADER.pack(MAGIC, VERSION, code, tokens.size, b"\x00" * 8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            tokens.astype(DTYPES[code], copy=False).tofile(f)


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """Validate a shard's header and size; return its dtype and token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token shard not found: {path}")

    def corrupt(what: str) -> DataError:
        return DataError(f"corrupt token shard {path}: {what}")

    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise corrupt(f"{size} bytes is shorter than the {HEADER_SIZE}-byte header")
    with open(path, "rb") as f:
        magic, version, code, count, _ = HEADER.unpack(f.read(HEADER_SIZE))
    if magic != MAGIC:
        raise corrupt(f"bad magic {magic!r}")
    if version != VERSION:
        raise corrupt(f"format version {version}, this sentcode reads {VERSION}")
    if code not in DTYPES:
        raise corrupt(f"unknown dtype code {code}")
    dtype = DTYPES[code]
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        raise corrupt(f"{size} bytes on disk, header says {count} tokens = {expected} bytes")
    return dtype, count


def read_tokens(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard read-only (an empty shard gives an empty in-memory array: mmap needs a byte)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))
