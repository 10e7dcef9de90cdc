"""Lossless sentence segments: a document's bytes cut into consecutive pieces, each a sentence and the whitespace
after it, so that joining the segments gives the document back byte for byte.

The sentences come from ``corpus.sentences`` (nupunkt, paragraph breaks first, over-long sentences cut).
Each is located in the text in order; a segment runs from one sentence's start to the next one's (the first
also takes any leading whitespace). A segment longer than ``max_bytes`` is cut at byte ``max_bytes`` (the
renderer writes bytes, so a cut may fall inside a character; the bytes are what is modelled).
"""

from __future__ import annotations

import numpy as np

from sentcode.corpus.sentences import split_sentences


def _starts(text: str, max_bytes: int) -> list[int]:
    """Character offsets where sentences start, in order (0 first)."""
    starts, pos = [0], 0
    for sentence in split_sentences(text, max_bytes):
        at = text.find(sentence, pos)
        if at < 0:  # the splitter changed the text (should not happen); the rest stays in the current segment
            break
        if at > starts[-1]:
            starts.append(at)
        pos = at + len(sentence)
    return starts


def segment_document(text: str, max_bytes: int = 256) -> list[bytes]:
    """The document's UTF-8 bytes (surrogate escapes as the bytes they carry) as a list of segments."""
    starts = _starts(text, max_bytes)
    out: list[bytes] = []
    for a, b in zip(starts, starts[1:] + [len(text)]):
        data = text[a:b].encode("utf-8", "surrogateescape")
        out.extend(data[i:i + max_bytes] for i in range(0, len(data), max_bytes))
    return [s for s in out if s]


def segment_arrays(texts: list[str], max_bytes: int = 256, cut=None) -> dict[str, np.ndarray]:
    """Segments of many documents as flat arrays: ``bytes`` (uint8, all documents in order), ``seg_start``
    (int64, offset of each segment, with a final end offset) and ``doc_seg`` (int64, index of each
    document's first segment, with a final total). ``cut``: text -> segments (default: sentences)."""
    cut = cut or (lambda text: segment_document(text, max_bytes))
    chunks, seg_start, doc_seg, offset = [], [0], [0], 0
    for text in texts:
        for s in cut(text):
            chunks.append(s)
            offset += len(s)
            seg_start.append(offset)
        doc_seg.append(len(seg_start) - 1)
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return {"bytes": data, "seg_start": np.asarray(seg_start, dtype=np.int64),
            "doc_seg": np.asarray(doc_seg, dtype=np.int64)}
