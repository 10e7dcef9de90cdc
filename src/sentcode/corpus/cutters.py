"""Causal segmenters: how a document's bytes are cut into the segments a hierarchical model steps over.

Every cutter is lossless (the segments joined give the bytes back) and causal: whether a segment ends after
byte t depends on bytes up to t only, so a model can decide it while writing (a boundary that looks at the
next byte leaks it; a public small-scale log reported 0.09 bits per byte from exactly that). Kinds:

* ``sentence``: sentences and the whitespace after them (``corpus.segments``; the sentence-step family);
* ``space``: after a space-like byte (not a letter, digit or UTF-8 continuation byte) that follows a byte that
  is not space-like (SpaceByte, arXiv 2404.14408): words with the punctuation and space after them;
* ``stride``: every ``target`` bytes;
* ``entropy``: where the next-byte entropy of a small causal byte model is high (BLT, arXiv 2412.09871):
  ``global`` mode cuts after byte t when H_t > threshold, ``relative`` mode when H_t - H_{t-1} > threshold
  (the seed's rule). The threshold is calibrated on the training text to the target mean segment length.

The entropy model is an interpolated order-2 byte n-gram (contexts b_{t-1} b_t): counting it takes a second,
and all the segmenter needs is one entropy per context, a 256 KB table. A neural byte LM would give sharper
entropies; BLT's own ablations find the boundary rule matters more than the entropy model's size.

Every kind also ends a segment at ``max_bytes`` and at the end of the document.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sentcode.errors import ConfigError, DataError

KINDS = ("sentence", "space", "stride", "entropy")
MODES = ("global", "relative")
_ALNUM = np.zeros(256, dtype=bool)
for _r in (range(48, 58), range(65, 91), range(97, 123), range(0x80, 0xC0)):  # digits, letters, continuations
    _ALNUM[list(_r)] = True
SPACELIKE = ~_ALNUM


@dataclass
class Segmenter:
    kind: str = "sentence"
    target: float = 6.0  # mean segment length in bytes the stride and entropy kinds aim for
    mode: str = "global"  # entropy kind: global | relative
    max_bytes: int = 256
    threshold: float | None = None  # entropy kind: set by ``fit``
    table: np.ndarray | None = None  # entropy kind: H (bits) of the next byte per context b_{t-1} * 256 + b_t

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"segmenter must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.mode not in MODES:
            raise ConfigError(f"segmenter mode must be global or relative, got {self.mode!r}")
        if self.max_bytes < 4:
            raise ConfigError("the segment byte limit must be at least 4")
        if self.kind in ("stride", "entropy") and not 1 <= self.target <= self.max_bytes:
            raise ConfigError(f"a mean segment length of {self.target} bytes cannot be reached: it must lie "
                              f"between 1 and the segment limit ({self.max_bytes})")

    # ---- boundaries -------------------------------------------------------------------------------------------

    def entropies(self, data: np.ndarray) -> np.ndarray:
        """H_t for every byte t: the model's next-byte entropy after reading bytes up to t."""
        if self.table is None:
            raise DataError("the entropy segmenter has no model yet: fit it on training text first")
        prev = np.concatenate([[0], data[:-1]]).astype(np.int64)
        return self.table[prev * 256 + data]

    def ends(self, data: np.ndarray) -> np.ndarray:
        """bool [n]: a segment ends after byte t (before the max_bytes cap and the document's end)."""
        if self.kind == "space":
            space = SPACELIKE[data]
            before = np.concatenate([[False], space[:-1]])
            return space & ~before
        if self.kind == "stride":
            return (np.arange(len(data)) + 1) % max(1, round(self.target)) == 0
        h = self.entropies(data)
        if self.mode == "relative":
            h = h - np.concatenate([h[:1], h[:-1]])
        return h > self.threshold

    def cut(self, text: str | bytes) -> list[bytes]:
        """The document as consecutive segments (bytes)."""
        if self.kind == "sentence":
            from sentcode.corpus.segments import segment_document

            if isinstance(text, bytes):
                text = text.decode("utf-8", "surrogateescape")
            return segment_document(text, self.max_bytes)
        raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
        if not raw:
            return []
        data = np.frombuffer(raw, dtype=np.uint8)
        ends = np.flatnonzero(self.ends(data)) + 1
        out, start = [], 0
        for end in list(ends) + [len(raw)]:
            while end - start > self.max_bytes:  # the cap: a causal rule too (a count of bytes since the cut)
                out.append(raw[start:start + self.max_bytes])
                start += self.max_bytes
            if end > start:
                out.append(raw[start:end])
                start = end
        return out

    # ---- the entropy model ------------------------------------------------------------------------------------

    def fit(self, texts: list[str], tolerance: float = 0.25) -> "Segmenter":
        """Count the entropy model on ``texts`` and set the threshold that gives the target mean length; a
        target the text cannot give (within ``tolerance``) is refused."""
        if self.kind != "entropy":
            return self
        docs = [np.frombuffer(t.encode("utf-8", "surrogateescape"), dtype=np.uint8) for t in texts if t]
        if not docs or sum(len(d) for d in docs) < 16:
            raise DataError("the entropy segmenter needs some training text (at least 16 bytes)")
        self.table = _entropy_table(docs)
        h = np.concatenate([self.entropies(d) if self.mode == "global" else _rises(self.entropies(d))
                            for d in docs])
        self.threshold = float(np.quantile(h, 1 - 1 / self.target)) if self.target > 1 else -np.inf
        got = mean_length(self, texts)
        if abs(got / self.target - 1) > tolerance:
            raise ConfigError(f"the entropy segmenter cannot reach a mean segment length of {self.target} bytes on "
                              f"this text (the nearest threshold gives {got:.2f}); choose another target or kind")
        return self

    # ---- persistence ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("table")
        return d

    def save(self, run_dir: str | Path) -> None:
        from sentcode.io import atomic_path, write_json

        run_dir = Path(run_dir)
        if self.table is not None:
            with atomic_path(run_dir / "segmenter.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, self.table.astype(np.float32))
        write_json(run_dir / "segmenter.json", self.to_dict())

    @classmethod
    def load(cls, run_dir: str | Path) -> "Segmenter":
        run_dir = Path(run_dir)
        path = run_dir / "segmenter.json"
        if not path.is_file():
            raise DataError(f"{run_dir} has no segmenter.json: it was not trained by this version")
        seg = cls(**json.loads(path.read_text()))
        if seg.kind == "entropy":
            seg.table = np.load(run_dir / "segmenter.npy")
        return seg


def _rises(h: np.ndarray) -> np.ndarray:
    return h - np.concatenate([h[:1], h[:-1]])


def _entropy_table(docs: list[np.ndarray], alpha: float = 2.0) -> np.ndarray:
    """Entropy (bits) of an interpolated order-2 byte model's next-byte distribution, per context (a, b):
    P(c | a b) = (n(a b c) + alpha P(c | b)) / (n(a b) + alpha), P(c | b) likewise over the unigram."""
    tri = np.zeros(1 << 24, dtype=np.int64)
    for d in docs:
        if len(d) < 2:
            continue
        prev = np.concatenate([[0], d[:-2]]).astype(np.int64)
        tri += np.bincount((prev * 256 + d[:-1]) * 256 + d[1:], minlength=1 << 24)
    tri = tri.reshape(65536, 256)
    bi = tri.reshape(256, 256, 256).sum(0).astype(np.float64)  # [b, c]
    uni = (bi.sum(0) + 1) / (bi.sum() + 256)
    p_bi = (bi + alpha * uni) / (bi.sum(1, keepdims=True) + alpha)
    out = np.empty(65536, dtype=np.float32)
    for a in range(0, 65536, 4096):
        counts = tri[a:a + 4096].astype(np.float64)
        back = p_bi[np.arange(a, a + 4096) % 256]
        p = (counts + alpha * back) / (counts.sum(1, keepdims=True) + alpha)
        out[a:a + 4096] = -(p * np.log2(np.maximum(p, 1e-300))).sum(1)
    return out


def mean_length(seg: Segmenter, texts: list[str]) -> float:
    """Mean segment length in bytes over ``texts``."""
    n_bytes = n_segs = 0
    for t in texts:
        parts = seg.cut(t)
        n_bytes += sum(len(p) for p in parts)
        n_segs += len(parts)
    return n_bytes / max(n_segs, 1)
