"""Sentence embeddings on disk: ``PREFIX.npy`` (float32 [N, dim], memory-mappable) plus ``PREFIX.json``.

The sidecar records what the rows are (the encoder, a hash of the sentences) so that embeddings are never
silently paired with other sentences or read with the wrong shape. The array is written under a temporary
name and renamed into place, and the sidecar is written after it: a reader that finds a sidecar also finds
the complete array it describes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sentcode.errors import DataError
from sentcode.io import atomic_path, write_json

FORMAT = "sentcode-embeddings"
_CHUNK_ROWS = 65536


def sentences_sha256(sentences: Iterable[str]) -> str:
    """Hash of an ordered list of sentences; length-prefixed, so no two different lists collide by joining."""
    h = hashlib.sha256()
    for s in sentences:
        b = s.encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _prefix(path_prefix: str | Path) -> Path:
    p = Path(path_prefix)
    return p.with_suffix("") if p.suffix in (".npy", ".json") else p


def write_embeddings(path_prefix: str | Path, array: np.ndarray, meta: dict | None = None,
                     sentences: Iterable[str] | None = None) -> dict:
    """Write ``array`` (float32 [N, dim]) and its sidecar; returns the sidecar's contents.

    ``meta`` is kept in the sidecar (name the encoder under ``"encoder"``); given ``sentences``, their hash
    is stored as ``"sentences_sha256"`` and their number must be N.
    """
    prefix = _prefix(path_prefix)
    array = np.asarray(array) if not isinstance(array, np.memmap) else array
    if array.ndim != 2:
        raise DataError(f"embeddings must be a 2-D array [N, dim], got shape {tuple(array.shape)}")
    n, dim = array.shape
    sidecar = dict(meta or {})
    sidecar.setdefault("encoder", None)
    if sentences is not None:
        sentences = list(sentences)
        if len(sentences) != n:
            raise DataError(f"{len(sentences)} sentences for {n} embedding rows")
        sidecar["sentences_sha256"] = sentences_sha256(sentences)
    sidecar.update(format=FORMAT, n=int(n), dim=int(dim), dtype="float32")
    npy = prefix.with_name(prefix.name + ".npy")
    with atomic_path(npy) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, _CHUNK_ROWS):  # chunked, so a memmapped input is never read whole
            out[start : start + _CHUNK_ROWS] = array[start : start + _CHUNK_ROWS]
        out.flush()
        del out
    write_json(prefix.with_name(prefix.name + ".json"), sidecar)
    return sidecar


def read_embeddings(path_prefix: str | Path, sentences: Iterable[str] | None = None) -> tuple[np.memmap, dict]:
    """``(read-only memmap [N, dim] float32, sidecar)``; DataError when the files disagree with each other
    or, given ``sentences``, with those sentences."""
    prefix = _prefix(path_prefix)
    npy, side = prefix.with_name(prefix.name + ".npy"), prefix.with_name(prefix.name + ".json")
    for p in (npy, side):
        if not p.is_file():
            raise DataError(f"embeddings file not found: {p}")
    try:
        meta = json.loads(side.read_text())
    except ValueError:
        raise DataError(f"{side} is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{side} is not a sentcode embeddings sidecar")
    try:
        arr = np.load(npy, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {npy}: {e}") from None
    if arr.dtype != np.float32 or arr.ndim != 2:
        raise DataError(f"{npy} holds {arr.dtype} of shape {tuple(arr.shape)}, expected a float32 [N, dim] array")
    if arr.shape != (meta.get("n"), meta.get("dim")):
        raise DataError(
            f"{npy} has shape {tuple(arr.shape)} but {side.name} says ({meta.get('n')}, {meta.get('dim')}); "
            "the two files are from different writes"
        )
    if sentences is not None:
        sentences = list(sentences)
        if len(sentences) != arr.shape[0]:
            raise DataError(f"{npy} has {arr.shape[0]} rows for {len(sentences)} sentences")
        if meta.get("sentences_sha256") not in (None, sentences_sha256(sentences)):
            raise DataError(f"{npy} was computed for other sentences (hash mismatch); re-encode them")
    return arr, meta
