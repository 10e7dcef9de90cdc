"""Log-likelihoods of text under any run: the one scoring API behind the HTTP server and lm-eval.

Every function takes what ``sentcode.load(run_dir)`` returns: a flat LM (``FlatGenerator``) or a sentence-step
LM (``SentenceGenerator``). Log-likelihoods are natural logs (nats).

Flat LM (bytes or BPE)

- A document starts with the end-of-text token, as in training and generation: the first token of a text is
  predicted from it.
- A text longer than the context is scored with the windows of ``sentcode.eval.bpb`` (stride: half the
  context). Every token is predicted once; tokens in the first window see everything before them, later ones
  at least half a window. So ``loglikelihood_rolling(g, t) == -g.score_details(t)["nats"]``.
- End of text: ``loglikelihood_rolling`` includes the log-probability of the end-of-text token after the text
  (as bits per byte does: the end is part of the text's code length). ``token_logprobs`` lists only the text's
  own tokens, so their sum is ``loglikelihood_rolling`` minus that end-of-text term (both are computed on the
  same windows: the text followed by end-of-text).
- ``loglikelihood(context, continuation)`` tokenizes context and continuation separately and scores the
  continuation's tokens after the context's tokens. With the byte tokenizer this is exactly
  log P(continuation | context). With BPE a merge that would cross the boundary is not made: the scored path
  is a valid tokenization of context + continuation (a lower bound on the probability of the string), the
  scored tokens hold exactly the continuation's bytes and nothing of the context, a continuation gets the
  same tokens whatever the context (choices of a multiple-choice item are compared on equal terms), and it is
  the path generation takes, which encodes the prompt alone. ``is_greedy``: every continuation token is the
  most likely one given what precedes it. The continuation's tokens see as much context as fits: the window
  ends at the continuation's last token (a continuation longer than the context falls back to the windows
  above).
- Requests are windowed, sorted by length and run in padded batches. A model with the dual-FFN router runs
  one window at a time, unpadded: its experts' capacity is shared by all tokens of a forward, so padding or
  other requests would change a request's result.

Sentence-step LM (the two-part approximation)

A sentence run scores whole sentences, not tokens: ``token_logprobs`` is not defined. ``loglikelihood_rolling``
is minus the two-part code length (plan bits + render bits, ``sentcode.eval.sentence``) times ln 2, and
``loglikelihood(context, continuation)`` is the difference of the two-part log-likelihoods of
context + continuation and of context (0 for an empty context). This is an approximation of a conditional
log-likelihood: the sentence split and the codes of the context's last sentence may change once the
continuation is appended. ``is_greedy`` is always False (greedy sentence generation plans codes and reranks
rendered candidates; no single most likely continuation is defined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sentcode.errors import SentcodeError
from sentcode.registry import family_of
from sentcode.tokenizer.base import to_bytes

LN2 = math.log(2)
SPECIAL_NAMES = ("<|bos|>", "<|eos|>", "<|pad|>")
# Largest logits tensor one batch may produce (floats); keeps memory bounded for big vocabularies.
_MAX_BATCH_LOGITS = 2**24
_MAX_BATCH = 32


def is_sentence(gen) -> bool:
    return family_of(gen).steps_by_sentence


def _check_text(value, name: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        raise SentcodeError(f"{name} must be a string, got {type(value).__name__}")
    return value


# ---- flat LM: windows and batched forwards -------------------------------------------------------------------


@dataclass
class _Window:
    seq: int  # which request
    start: int  # inputs are ids[start:end]; logits at input j predict ids[start + j + 1]
    end: int
    first: int  # scored target positions: first .. end (inclusive)


def _bpb_windows(n: int, ctx: int) -> list[tuple[int, int, int]]:
    """(start, end, first) of the windows ``sentcode.data.loader.eval_batches`` uses on a stream of n tokens."""
    stride = max(1, ctx // 2)
    count = 1 + max(0, -(-(n - 1 - ctx) // stride))
    out = []
    for k in range(count):
        s = k * stride
        out.append((s, min(s + ctx, n - 1), 1 if s == 0 else s - stride + ctx + 1))
    return out


def _windows_for(seq: int, n: int, a: int, ctx: int) -> list[_Window]:
    """Windows that score positions a..n-1 of a sequence of n tokens, each with as much context as fits."""
    if n - 1 <= ctx:
        return [_Window(seq, 0, n - 1, a)]
    if a >= n - ctx:  # one window ending at the last token holds every scored token
        return [_Window(seq, n - 1 - ctx, n - 1, a)]
    return [_Window(seq, s, e, max(f, a)) for s, e, f in _bpb_windows(n, ctx) if e >= a]


@dataclass
class _Scored:
    logprobs: list[float]  # one per scored position
    greedy: list[bool]
    top: list[list[tuple[int, float]]]  # (token id, logprob), most likely first; empty lists when top=0


@torch.no_grad()
def _score_positions(gen, seqs: Sequence[list[int]], firsts: Sequence[int], top: int = 0) -> list[_Scored]:
    """For each id sequence (starting with the document-start token), score positions first..len-1."""
    model, tok = gen.model, gen.tokenizer
    ctx = gen.context
    device = next(model.parameters()).device
    windows = [w for i, (ids, a) in enumerate(zip(seqs, firsts)) if a < len(ids)
               for w in _windows_for(i, len(ids), a, ctx)]
    windows.sort(key=lambda w: w.end - w.start)  # similar lengths share a batch: little padding
    dual = getattr(model.cfg, "ffn", "swiglu") == "dual"
    vocab = model.cfg.vocab_size
    parts: list[list[tuple[int, _Scored]]] = [[] for _ in seqs]  # per request: (window start, its scores)
    was_training = model.training
    model.eval()
    i = 0
    while i < len(windows):
        size = 1 if dual else max(1, min(_MAX_BATCH, _MAX_BATCH_LOGITS // (vocab * ctx)))
        batch = windows[i : i + size]
        i += len(batch)
        longest = max(w.end - w.start for w in batch)
        x = torch.full((len(batch), longest), tok.pad_id, dtype=torch.long)
        for b, w in enumerate(batch):
            x[b, : w.end - w.start] = torch.tensor(seqs[w.seq][w.start : w.end])
        logp = torch.log_softmax(model(x.to(device)).float(), dim=-1)  # [B, T, V]
        for b, w in enumerate(batch):
            rows = logp[b, w.first - w.start - 1 : w.end - w.start]  # predictions of positions first..end
            targets = torch.tensor(seqs[w.seq][w.first : w.end + 1], device=rows.device)
            lp = rows.gather(1, targets[:, None])[:, 0]
            alts: list[list[tuple[int, float]]] = [[] for _ in range(len(targets))]
            if top:
                values, idx = rows.topk(min(top, vocab), dim=-1)
                alts = [list(zip(r_i, r_v)) for r_i, r_v in zip(idx.tolist(), values.double().tolist())]
            parts[w.seq].append((w.start, _Scored(lp.double().tolist(), (rows.argmax(-1) == targets).tolist(), alts)))
    model.train(was_training)
    out = []
    for p in parts:  # windows back in text order
        p.sort(key=lambda item: item[0])
        out.append(_Scored([v for _, s in p for v in s.logprobs], [v for _, s in p for v in s.greedy],
                           [v for _, s in p for v in s.top]))
    return out


def _flat_only(gen, what: str) -> None:
    if is_sentence(gen):
        raise SentcodeError(f"{what} are not defined for sentence-step runs (they score whole sentences, not "
                            "tokens): use loglikelihood or loglikelihood_rolling")


def token_text(tokenizer, token_id: int) -> str:
    """A token as text: special tokens by name; bytes that are only part of a UTF-8 character as \\xNN."""
    if token_id in tokenizer.special_ids:
        return SPECIAL_NAMES[list(tokenizer.special_ids).index(token_id)]
    return tokenizer.token_bytes(token_id).decode("utf-8", "backslashreplace")


def _char_offsets(data: bytes) -> list[int]:
    """For each byte of UTF-8 ``data``, the index of the character it belongs to in the decoded text."""
    text = data.decode("utf-8", "surrogateescape")
    owner = []
    for c, ch in enumerate(text):
        owner += [c] * len(ch.encode("utf-8", "surrogateescape"))
    return owner


# ---- the API --------------------------------------------------------------------------------------------------


def token_logprobs(gen, text: str, top: int = 0) -> list[dict]:
    """One dict per token of ``text`` (flat LM): ``token`` (its text, see ``token_text``), ``offset`` (character
    offset of its first byte in ``text``), ``logprob`` (nats, the first token conditioned on the document
    start) and ``top`` (the ``top`` most likely tokens at that position and their logprobs; if two tokens have
    the same text, the more likely one is kept)."""
    _flat_only(gen, "per-token log-probs")
    text = _check_text(text, "text")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise SentcodeError(f"top must be an integer >= 0, got {top!r}")
    tok = gen.tokenizer
    data = to_bytes(text)
    ids = tok.encode(data)
    if not ids:
        return []
    # The same windows as loglikelihood_rolling (text + end-of-text), whose last entry is left out.
    scored = _score_positions(gen, [[tok.eos_id] + ids + [tok.eos_id]], [1], top)[0]
    owner = _char_offsets(data)
    rows, pos = [], 0
    for t, lp, alts in zip(ids, scored.logprobs, scored.top):
        alt: dict[str, float] = {}
        for a_id, a_lp in alts:
            alt.setdefault(token_text(tok, a_id), a_lp)
        rows.append({"token": token_text(tok, t), "offset": owner[pos] if pos < len(owner) else len(text),
                     "logprob": lp, "top": alt})
        pos += len(tok.token_bytes(t))
    return rows


def loglikelihood_batch(gen, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """``loglikelihood`` of many (context, continuation) pairs, batched."""
    requests = [(_check_text(c, "context"), _check_text(x, "continuation")) for c, x in requests]
    if is_sentence(gen):
        cache: dict[str, float] = {}  # multiple-choice items share a context: score it once

        def ll(text: str) -> float:
            if text not in cache:
                cache[text] = _sentence_loglikelihood(gen, text)
            return cache[text]

        return [(ll(c + x) - ll(c), False) for c, x in requests]
    tok = gen.tokenizer
    ctx_ids = tok.encode_batch([c for c, _ in requests])
    cont_ids = tok.encode_batch([x for _, x in requests])
    seqs = [[tok.eos_id] + c + x for c, x in zip(ctx_ids, cont_ids)]
    scored = _score_positions(gen, seqs, [1 + len(c) for c in ctx_ids])
    return [(float(sum(s.logprobs)), all(s.greedy)) for s in scored]


def loglikelihood(gen, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) in nats and whether the continuation is the greedy one (see the module
    docstring for the tokenization at the boundary and the sentence-step approximation)."""
    return loglikelihood_batch(gen, [(context, continuation)])[0]


def loglikelihood_rolling_batch(gen, texts: Sequence[str]) -> list[float]:
    """``loglikelihood_rolling`` of many texts, batched."""
    texts = [_check_text(t, "text") for t in texts]
    if is_sentence(gen):
        return [_sentence_loglikelihood(gen, t) for t in texts]
    tok = gen.tokenizer
    seqs = [[tok.eos_id] + ids + [tok.eos_id] for ids in tok.encode_batch(texts)]
    return [float(sum(s.logprobs)) for s in _score_positions(gen, seqs, [1] * len(seqs))]


def loglikelihood_rolling(gen, text: str) -> float:
    """Total log-likelihood in nats of ``text`` as one document: flat LM, from the document start through the
    end-of-text token after it; sentence run, minus its two-part bits times ln 2."""
    return loglikelihood_rolling_batch(gen, [text])[0]


def _sentence_loglikelihood(gen, text: str) -> float:
    if not gen.split(text):
        return 0.0  # an empty document costs nothing in the two-part code
    return -gen.score_details(text)["bits"] * LN2
