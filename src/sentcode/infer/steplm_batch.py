"""Batched generation for the end-to-end sentence-step LM: B documents written in lockstep.

Every step feeds one id per document to the renderer, in one batched call over one shared KV cache: the
prompts are left-padded to a common length, so all rows share positions, and a padding mask keeps each row
from seeing the padding (positions enter attention only as differences, so a padded row gets what it would
get alone). The planner steps once per finished segment, for that row only: rows end their segments at
different bytes, and a planner step is rare next to renderer steps. A row that ends a segment feeds the
start-of-segment id next, under its new condition; a finished row leaves the batch.

Greedy decoding gives the documents ``generate`` gives one by one. Sampled decoding draws from one generator
for the whole batch, so its text differs from the sequential calls' for the same seed (it is reproducible for
a given seed, batch and order). Reranking writes several candidates per segment and is done one document at a
time by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sentcode.data.segments import BOS, PAD
from sentcode.models.sentence.steplm import trim_cache
from sentcode.nn.sampling import make_generator, sample_next


@dataclass(eq=False)
class _Row:
    index: int  # position in the caller's list
    state: object  # the generator's per-document planner state (its renderer cache is not used here)
    prefix: bytes  # the segment in progress's bytes that the prompt already holds
    written: bytearray = field(default_factory=bytearray)
    pieces: list[bytes] = field(default_factory=list)
    pending: int | None = None  # an id this row must feed next instead of sampling (start of a segment)


def _read_prompt(gen, segments: list[bytes], temperature, rng) -> tuple[object, bytes, list[int], list[torch.Tensor]]:
    """The planner state after the prompt's completed segments, the segment in progress, and the renderer's
    input ids for the whole prompt with each position's condition (the segment in progress under its plan)."""
    m = gen.model
    st = gen.new_state()
    done, current = segments[:-1][-(m.cfg.max_segments - 1):], (segments[-1] if segments else b"")
    gen._plan(st, None)
    ids, conds = [], []
    for s in done:
        e, pooled = gen._encode(st, s, written=False)
        c = m.condition(st.o, gen._codes_of(pooled)[0] if gen.codes else None)  # oracle codes, as in training
        seg_ids = [BOS, *s]
        ids += seg_ids
        conds += [c] * len(seg_ids)
        st.stream.extend(seg_ids)
        gen._plan(st, e)
    _new_segment(gen, st, temperature, rng)
    seg_ids = [BOS, *current]
    st.stream.extend(seg_ids)
    return st, current, ids + seg_ids, conds + [st.cond[:, 0]] * len(seg_ids)


def _new_segment(gen, st, temperature, rng) -> None:
    """Plan the next segment: its codes (codes on) and the renderer's condition for it."""
    q = None
    if gen.codes:
        st.planned = gen._sample_codes(st.o, temperature, rng)[0]
        q = gen.model.quant.decode(st.planned[None])
    gen._set_cond(st, q)


@torch.no_grad()
def generate_batch(gen, prompts: list[list[bytes]], max_sentences: int, temperature: float, seed, top_k, top_p
                   ) -> list[str]:
    """The continuations of the prompts (each a list of segments), written together."""
    m, dev = gen.model, gen.device
    W, max_bytes = m.cfg.window, gen.max_bytes
    rng = make_generator(seed, dev)
    rows, ids, conds = [], [], []
    for i, segs in enumerate(prompts):
        st, prefix, row_ids, row_conds = _read_prompt(gen, segs, temperature, rng)
        rows.append(_Row(i, st, prefix))
        ids.append(row_ids)
        conds.append(torch.cat(row_conds, 0))
    L = max(len(r) for r in ids)
    d = conds[0].shape[-1]
    x = torch.full((len(rows), L), PAD, dtype=torch.long, device=dev)
    cond = torch.zeros(len(rows), L, d, dtype=conds[0].dtype, device=dev)
    pad = torch.zeros(len(rows), L, dtype=torch.bool, device=dev)
    for b, (row_ids, c) in enumerate(zip(ids, conds)):
        x[b, L - len(row_ids):] = torch.tensor(row_ids, device=dev)
        cond[b, L - len(row_ids):] = c
        pad[b, L - len(row_ids):] = True
    # Read the prompts a window at a time: one call over all L positions would build an L x L mask (a 64 kB
    # prompt: 4G entries), and no query sees more than the window anyway.
    cache = m.renderer.new_cache()
    seen = pad[:, :0]
    for s in range(0, L, W):
        seen = torch.cat([seen, pad[:, s:s + W]], 1)
        logits = gen.render(x[:, s:s + W], cond[:, s:s + W], s, cache, seen)[:, -1]
        trim_cache(cache, W)
        seen = seen[:, -W:]
    pos, pad = L, seen
    out = [""] * len(rows)
    while rows:
        nxt = sample_next(logits, temperature, top_k, top_p, generator=rng)
        feed, keep, ended = [], [], []
        for b, r in enumerate(rows):
            if r.pending is not None:
                t, r.pending = r.pending, None
            else:
                t = int(nxt[b])
                # the end-of-segment symbol, or a prompt whose segment in progress is already full
                if t >= 256 or len(r.prefix) + len(r.written) >= max_bytes:
                    if _end_segment(gen, r, max_sentences, temperature, rng):
                        out[r.index] = _text(r)
                        continue  # the row leaves the batch
                    t = BOS
                else:
                    r.written.append(t)
                    if len(r.prefix) + len(r.written) >= max_bytes:
                        ended.append(r)  # full: it ends once this byte is read, as a single document does
            r.state.stream.append(t)
            feed.append(t)
            keep.append(b)
        if not keep:
            break
        if len(keep) < len(rows):
            rows, pad, _ = _keep(rows, keep, cache, pad)
        x = torch.tensor(feed, device=dev)[:, None]
        cond = torch.cat([r.state.cond for r in rows], 0)  # [B, 1, d]
        pad = torch.cat([pad, torch.ones(len(rows), 1, dtype=torch.bool, device=dev)], 1)
        logits = gen.render(x, cond, pos, cache, pad)[:, -1]
        pos += 1
        trim_cache(cache, W)
        pad = pad[:, -W:]
        for r in ended:  # rows whose segment filled up with the byte just read (all still in the batch)
            if _end_segment(gen, r, max_sentences, temperature, rng):
                out[r.index] = _text(r)
                r.pending = -1  # finished: leaves the batch below
            else:
                r.pending = BOS
        keep = [b for b, r in enumerate(rows) if r.pending != -1]
        if not keep:
            break
        if len(keep) < len(rows):
            rows, pad, logits = _keep(rows, keep, cache, pad, logits)
    return out


def _keep(rows: list[_Row], keep: list[int], cache, pad: torch.Tensor, logits: torch.Tensor | None = None):
    """The rows at indices ``keep`` (finished ones leave the batch, and the cache with them)."""
    idx = torch.tensor(keep, dtype=torch.long, device=pad.device)
    for c in cache:
        c.k, c.v = c.k.index_select(0, idx), c.v.index_select(0, idx)
    return [rows[b] for b in keep], pad.index_select(0, idx), None if logits is None else logits.index_select(0, idx)


def _text(r: _Row) -> str:
    return "".join(p.decode("utf-8", "replace") for p in r.pieces)  # segment by segment, as ``stream`` yields


def _end_segment(gen, r: _Row, max_sentences: int, temperature, rng) -> bool:
    """Close the row's segment (read it, step its planner); True when the row has finished."""
    text = bytes(r.written)
    e, _ = gen._encode(r.state, r.prefix + text, written=True)
    gen._plan(r.state, e)
    r.prefix, r.written = b"", bytearray()
    if not text:  # an empty segment ends the document, as in ``generate``
        return True
    r.pieces.append(text)
    if len(r.pieces) >= max_sentences:
        return True
    _new_segment(gen, r.state, temperature, rng)
    return False
