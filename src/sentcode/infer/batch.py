"""Batched generation for the flat LM: many requests decoded together, one token per row per step.

Ids in, ids out; the engine knows nothing about text. The server's model worker drives it: ``add`` a request
when a slot is free, call ``step`` and route the events, ``cancel`` a request whose client went away.

How rows share one batch (continuous batching):

- All rows share the model's positions and one KV cache ``[B, H_kv, T, head_dim]``, right-aligned: the next
  token of every row is fed at position ``pos``, and cache column ``i`` holds position ``pos - T + i``.
  A row shorter than ``T`` is padded on the left, and ``pad`` ([B, T], False at padding) masks those keys.
  RoPE and ALiBi depend only on position differences, so a left-padded row gets the logits it would get
  alone (to float rounding; ``tests/test_batch.py`` checks it).
- A request joins at a step boundary: its prompt is prefilled on its own (several joining prompts together,
  left-padded to one length) so that its last token lands at ``pos - 1``, and that cache is merged into the
  batch's. Positions may go below zero for a prompt longer than the batch's history; only differences matter.
- A finished or cancelled row leaves at once; cache columns that are padding in every remaining row are cut.
- The context policy is that of ``engine.generate_ids``, per row: when a row's window would exceed
  ``max_seq_len``, it jumps forward to its newest half and the row is prefilled again from there. The batch
  is also prefilled again (every row from its own window) when ``pos`` grows past a few contexts under
  sustained traffic, so that RoPE angles stay in the range where float32 keeps them precise.
- Each row samples with its own temperature, top-k, top-p and seeded generator through the one sampling
  function, one row at a time, so a seeded request draws the same numbers as ``generate_ids`` would.
- On an ONNX export (``OnnxLM``) the decode steps run inside its token loop (``onnx_loop``): up to 32 steps of
  every row per call, as many as no row's window, token budget or stop id ends first, so rows join and leave at
  chunk boundaries; the same tokens as step by step. Nucleus sampling and log-probs keep the per-step path.
- A model with the dual-FFN router decodes one row at a time: its experts' capacity is shared by every token
  of a forward, so other rows (and padding) would change a request's result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sentcode.errors import SentcodeError
from sentcode.nn.device import model_device
from sentcode.nn.sampling import check_sampling, make_generator, sample_next

# Rebuild the whole batch's cache when the shared position passes this many contexts (see the module doc).
_REBASE_CONTEXTS = 4


@dataclass
class BatchRequest:
    prompt_ids: list[int]  # non-empty, at most the model's context
    max_new_tokens: int  # >= 1
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # a stop id is returned, then the request ends
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the k most likely


@dataclass
class TokenEvent:
    handle: int
    token: int
    done: bool  # the request has ended (stop id or max_new_tokens) and left the batch
    logprob: float | None = None  # nats, of the unscaled distribution (temperature 1, no filtering)
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class _Row:
    handle: int
    req: BatchRequest
    ids: list[int]  # prompt + generated
    gen: torch.Generator
    start: int = 0  # first id inside the model's window
    new: int = 0  # tokens generated so far
    stop_ids: frozenset = field(default_factory=frozenset)


class BatchDecoder:
    """Continuous batching over one ``LM``. Not thread-safe: one thread owns it."""

    def __init__(self, model, max_batch: int = 8):
        if max_batch < 1:
            raise SentcodeError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.ctx = model.cfg.max_seq_len
        self.device = model_device(model)
        self.max_batch = 1 if getattr(model.cfg, "ffn", "swiglu") == "dual" else max_batch
        self.rows: list[_Row] = []  # batch order: row i is index i of the cache
        self.waiting: list[_Row] = []  # added or moved, to be prefilled at the next step
        self.cache = None
        self.pad: torch.Tensor | None = None  # [B, T] bool
        self.pos = 0
        self._next_handle = 0

    # ---- queue ---------------------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows) - len(self.waiting)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, req: BatchRequest) -> int:
        """Queue a request for the next step; returns its handle. Raises SentcodeError for a bad request."""
        if self.free <= 0:
            raise SentcodeError(f"the batch is full ({self.max_batch} rows)")
        if not req.prompt_ids:
            raise SentcodeError("prompt_ids is empty: give at least the document-start token")
        if len(req.prompt_ids) > self.ctx:
            raise SentcodeError(f"prompt is {len(req.prompt_ids)} tokens but the model's context is {self.ctx}")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise SentcodeError(f"prompt_ids must lie in [0, {vocab})")
        if req.max_new_tokens < 1:
            raise SentcodeError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        check_sampling(req.temperature, req.top_k, req.top_p)
        handle = self._next_handle
        self._next_handle += 1
        self.waiting.append(_Row(handle, req, list(req.prompt_ids), make_generator(req.seed, self.device),
                                 stop_ids=frozenset(req.stop_ids)))
        return handle

    def cancel(self, handle: int) -> bool:
        """Remove a request wherever it is; False if it is not there (already finished)."""
        for i, row in enumerate(self.waiting):
            if row.handle == handle:
                del self.waiting[i]
                return True
        keep = [i for i, row in enumerate(self.rows) if row.handle != handle]
        if len(keep) == len(self.rows):
            return False
        self._keep(keep)
        return True

    def reset(self) -> list[int]:
        """Drop every request (after a model error, say); returns their handles."""
        handles = [r.handle for r in self.rows + self.waiting]
        self.rows, self.waiting = [], []
        self._keep([])
        return handles

    # ---- one step ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every row in the batch, then prefill the waiting rows (their first token)."""
        events: list[TokenEvent] = []
        self._move_out_rows_that_need_a_prefill()
        if self.rows:
            events += self._decode()
        if self.waiting:
            events += self._prefill()
        return events

    def _move_out_rows_that_need_a_prefill(self) -> None:
        moved = []
        for row in self.rows:
            if len(row.ids) - row.start > self.ctx:  # the window jumps, as in engine.generate_ids
                row.start = len(row.ids) - self.ctx // 2
                moved.append(row)
        if self.rows and self.pos > _REBASE_CONTEXTS * self.ctx:
            moved = list(self.rows)
        if moved:
            ids = {r.handle for r in moved}
            self._keep([i for i, r in enumerate(self.rows) if r.handle not in ids])
            self.waiting = moved + self.waiting

    def _decode(self) -> list[TokenEvent]:
        loop = self._token_loop()
        if loop is not None:
            return self._decode_in_graph(loop)
        B = len(self.rows)
        idx = torch.tensor([[r.ids[-1]] for r in self.rows], device=self.device)
        pad = torch.cat([self.pad, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
        logits = self.model(idx, cache=self.cache, start_pos=self.pos, pad_mask=None if pad.all() else pad)[:, -1]
        self.pad = pad
        self.pos += 1
        return self._sample(self.rows, logits)

    def _token_loop(self):
        """An ONNX export's token loop (``onnx_loop``), when every row can use it (no nucleus sampling, no
        log-probs asked for)."""
        if not hasattr(self.model, "token_loop"):
            return None
        if any(r.req.logprobs is not None or (r.req.top_p is not None and r.req.top_p < 1) for r in self.rows):
            return None
        return self.model.token_loop(None)

    def _decode_in_graph(self, loop) -> list[TokenEvent]:
        """Several decode steps of every row in one call of the loop: as many as no row's window, token budget or
        stop id ends first (rows join and leave at chunk boundaries); the same tokens as step by step."""
        from sentcode.infer.onnx_loop import CHUNK
        from sentcode.nn.attention import LayerCache

        rows = self.rows
        n = min(CHUNK, min(r.req.max_new_tokens - r.new for r in rows),
                min(self.ctx - (len(r.ids) - r.start) + 1 for r in rows))
        cache = [t.numpy() for c in self.cache for t in (c.k, c.v)]
        steps, _, cache = loop.run_rows([r.ids[-1] for r in rows], self.pos, cache, self.pad.numpy(), n,
                                        [(r.req.temperature, r.req.top_k) for r in rows], [r.gen for r in rows],
                                        [tuple(r.stop_ids) for r in rows])
        self.cache = [LayerCache(torch.from_numpy(cache[2 * i]), torch.from_numpy(cache[2 * i + 1]))
                      for i in range(len(self.cache))]
        self.pad = torch.cat([self.pad, torch.ones(len(rows), len(steps), dtype=torch.bool)], dim=1)
        self.pos += len(steps)
        events = []
        for tokens in steps:  # only the last step can end a row: the chunk ends with the first stop
            events += self._emit(list(self.rows), tokens)
        return events

    def _prefill(self) -> list[TokenEvent]:
        rows, self.waiting = self.waiting, []
        windows = [r.ids[r.start:] for r in rows]
        L = max(len(w) for w in windows)
        if not self.rows:
            self.pos = L  # a fresh batch: positions 0.., as a request alone would get
        idx = torch.zeros(len(rows), L, dtype=torch.long, device=self.device)  # padding id: masked anyway
        pad = torch.zeros(len(rows), L, dtype=torch.bool, device=self.device)
        for b, w in enumerate(windows):
            idx[b, L - len(w):] = torch.tensor(w, device=self.device)
            pad[b, L - len(w):] = True
        cache = self.model.new_cache()
        logits = self.model(idx, cache=cache, start_pos=self.pos - L, pad_mask=None if pad.all() else pad)[:, -1]
        self._merge(rows, cache, pad)
        return self._sample(rows, logits)

    def _merge(self, rows: list[_Row], cache, pad: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.pad = list(rows), cache, pad
            return
        T = max(self.pad.shape[1], pad.shape[1])

        def left(x: torch.Tensor, dim_from_end: int) -> torch.Tensor:  # left-pad the time axis with zeros to T
            n = T - x.shape[-dim_from_end]
            return x if n == 0 else F.pad(x, (0, 0) * (dim_from_end - 1) + (n, 0))

        for mine, theirs in zip(self.cache, cache):
            mine.k = torch.cat([left(mine.k, 2), left(theirs.k, 2)])
            mine.v = torch.cat([left(mine.v, 2), left(theirs.v, 2)])
        self.pad = torch.cat([left(self.pad, 1), left(pad, 1)])
        self.rows += rows

    def _keep(self, keep: list[int]) -> None:
        """Keep only these batch rows, then cut cache columns that are padding in all of them."""
        if not keep:
            self.rows, self.cache, self.pad, self.pos = [], None, None, 0
            return
        if len(keep) < len(self.rows):
            sel = torch.tensor(keep, device=self.device)
            self.rows = [self.rows[i] for i in keep]
            for c in self.cache:
                c.k, c.v = c.k.index_select(0, sel), c.v.index_select(0, sel)
            self.pad = self.pad.index_select(0, sel)
        used = self.pad.any(dim=0)
        first = int(used.nonzero()[0]) if used.any() else self.pad.shape[1]
        if first > 0:
            for c in self.cache:
                c.k, c.v = c.k[:, :, first:], c.v[:, :, first:]
            self.pad = self.pad[:, first:]

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[TokenEvent]:
        tokens = [int(sample_next(logits[b:b + 1], r.req.temperature, r.req.top_k, r.req.top_p, generator=r.gen)[0])
                  for b, r in enumerate(rows)]
        return self._emit(rows, tokens, logits)

    def _emit(self, rows: list[_Row], tokens: list[int], logits: torch.Tensor | None = None) -> list[TokenEvent]:
        """Each row's new token as an event (with its log-probs when asked for); rows that end leave the batch."""
        events, finished = [], set()
        for b, (row, token) in enumerate(zip(rows, tokens)):
            r = row.req
            ev = TokenEvent(row.handle, token, False)
            if r.logprobs is not None:
                lp = torch.log_softmax(logits[b].float(), dim=-1)
                ev.logprob = float(lp[token])
                if r.logprobs > 0:
                    values, ids = lp.topk(min(r.logprobs, lp.shape[-1]))
                    ev.top = list(zip(ids.tolist(), values.tolist()))
                else:
                    ev.top = []
            row.ids.append(token)
            row.new += 1
            if token in row.stop_ids or row.new >= r.max_new_tokens:
                ev.done = True
                finished.add(row.handle)
            events.append(ev)
        if finished:
            self._keep([i for i, r in enumerate(self.rows) if r.handle not in finished])
        return events


def generate_batch(model, requests: list[BatchRequest], max_batch: int = 8) -> list[list[int]]:
    """Run every request to the end (continuous batching: a request joins as soon as a row is free);
    returns the generated ids of each, stop id included."""
    dec = BatchDecoder(model, max_batch)
    out: dict[int, list[int]] = {}
    order: list[int] = []
    todo = list(requests)
    while todo or dec.busy:
        while todo and dec.free > 0:
            h = dec.add(todo.pop(0))
            order.append(h)
            out[h] = []
        for ev in dec.step():
            out[ev.handle].append(ev.token)
    return [out[h] for h in order]
