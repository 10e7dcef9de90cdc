"""Segment arrays as model input: packed rows of whole segments, a resumable random row source and the
deterministic windows of a full evaluation pass.

A row holds consecutive segments of one document as the renderer's stream: per segment [BOS, b_1 .. b_n] with
targets [b_1 .. b_n, EOS], and ``seg`` giving each position's segment index in the row (-1 on padding).

The symbols are bytes (256 of them), or the codes of a lower level of a hierarchical model (``symbols`` of
them, stored as integers); the three special ids follow the symbols: BOS = symbols, EOS = symbols + 1,
PAD = symbols + 2 (for bytes, the byte tokenizer's 256, 257, 258).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sentcode.errors import DataError
from sentcode.tokenizer.bytes import ByteTokenizer

BOS, EOS, PAD = ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.pad_id


def specials(symbols: int = 256) -> tuple[int, int, int]:
    """(BOS, EOS, PAD) of a stream over ``symbols`` symbols."""
    return symbols, symbols + 1, symbols + 2


@dataclass
class SegmentSplit:
    bytes: np.ndarray
    seg_start: np.ndarray
    doc_seg: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> "SegmentSplit":
        p = Path(path)
        if not p.is_file():
            raise DataError(f"missing segment data {p}; rerun training to rebuild it")
        with np.load(p) as z:
            return cls(z["bytes"], z["seg_start"], z["doc_seg"])

    def save(self, path: str | Path) -> None:
        from sentcode.io import atomic_path

        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, bytes=self.bytes, seg_start=self.seg_start, doc_seg=self.doc_seg)

    @property
    def n_segments(self) -> int:
        return len(self.seg_start) - 1

    @property
    def n_docs(self) -> int:
        return len(self.doc_seg) - 1

    def segment(self, i: int):
        """Segment i: bytes, or an integer array for a stream of codes."""
        part = self.bytes[self.seg_start[i]:self.seg_start[i + 1]]
        return part.tobytes() if self.bytes.dtype == np.uint8 else part


def build_row(segments: list, length: int | None = None, symbols: int = 256
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, seg) int64 arrays of one row (segments: bytes or integer arrays); padded to ``length``."""
    BOS, EOS, PAD = specials(symbols)
    n = sum(len(s) + 1 for s in segments)
    T = n if length is None else length
    x = np.full(T, PAD, dtype=np.int64)
    y = np.full(T, -1, dtype=np.int64)
    seg = np.full(T, -1, dtype=np.int64)
    pos = 0
    for j, s in enumerate(segments):
        b = np.frombuffer(s, dtype=np.uint8) if isinstance(s, (bytes, bytearray)) else np.asarray(s, dtype=np.int64)
        k = len(b) + 1
        x[pos] = BOS
        x[pos + 1:pos + k] = b
        y[pos:pos + k - 1] = b
        y[pos + k - 1] = EOS
        seg[pos:pos + k] = j
        pos += k
    return x, y, seg


def stack_rows(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device, pad: int = PAD) -> tuple:
    T = max(len(r[0]) for r in rows)
    out = []
    for k, fill in enumerate((pad, -1, -1)):
        a = np.full((len(rows), T), fill, dtype=np.int64)
        for i, r in enumerate(rows):
            a[i, :len(r[k])] = r[k]
        out.append(torch.from_numpy(a).to(device))
    n_seg = int(out[2].max()) + 1
    return out[0], out[1], out[2], n_seg


class RowSource:
    """Random training rows: a row starts at a segment drawn uniformly from the split and takes the
    segments after it in its document while they fit ``length`` positions and ``max_segments``.

    The state is one draw counter: draw i is a pure function of (seed, rank, i), so a resumed run, gradient
    accumulation and every DDP rank see the data an uninterrupted run would."""

    def __init__(self, split: SegmentSplit, length: int, batch: int, max_segments: int, seed: int, device,
                 rank: int = 0, symbols: int = 256):
        if split.n_segments == 0:
            raise DataError("the training split holds no segments")
        self.split, self.length, self.batch, self.max_segments = split, length, batch, max_segments
        self.seed, self.rank, self.device, self.symbols = seed, rank, device, symbols
        self.draw = 0
        self.doc_of = np.searchsorted(split.doc_seg, np.arange(split.n_segments), side="right") - 1

    def _row(self, start: int):
        end = self.split.doc_seg[self.doc_of[start] + 1]
        segs, used = [], 0
        i = start
        while i < end and len(segs) < self.max_segments:
            s = self.split.segment(i)
            if used + len(s) + 1 > self.length:
                break
            segs.append(s)
            used += len(s) + 1
            i += 1
        return build_row(segs, self.length, self.symbols)

    def next_batch(self):
        rows = []
        for _ in range(self.batch):
            rng = np.random.default_rng([self.seed, self.rank, self.draw])
            self.draw += 1
            rows.append(self._row(int(rng.integers(self.split.n_segments))))
        return stack_rows(rows, self.device, specials(self.symbols)[2])

    def state_dict(self) -> dict:
        return {"draw": self.draw}

    def load_state_dict(self, state: dict) -> None:
        self.draw = int(state["draw"])


def eval_windows(split: SegmentSplit, context: int):
    """Deterministic windows for a full pass: yields (segments, first_scored) per window.

    Within a document, a window holds up to ``context`` segments; each segment is scored exactly once, in the
    first window that contains it, and every window after the first starts ``context // 2`` segments before
    the first segment it scores, so each scored segment has at least that much planner history (or all of
    its document's)."""
    for d in range(split.n_docs):
        a0, end = int(split.doc_seg[d]), int(split.doc_seg[d + 1])
        done, a = a0, a0
        while done < end:
            b = min(a + context, end)
            yield [split.segment(i) for i in range(a, b)], done - a
            done = b
            a = max(a0, b - context // 2)
