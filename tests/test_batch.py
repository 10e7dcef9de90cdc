"""Batched generation (sentcode.infer.batch) and the causal padding mask it rests on."""

import pytest
import torch

from sentcode.config import ModelConfig
from sentcode.errors import SentcodeError
from sentcode.infer import batch
from sentcode.infer.batch import BatchDecoder, BatchRequest, generate_batch
from sentcode.infer.engine import generate_ids
from sentcode.models.lm import LM


def tiny_lm(pos="rope", window=None, ffn="swiglu", ctx=48, seed=0) -> LM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=ctx, pos=pos,
                      attn_window=window, ffn=ffn)
    return LM(cfg).eval()


PROMPTS = [[1, 5, 7, 9, 11, 3, 2], [1, 30], [1, 4, 4, 8, 15, 16, 23, 42 % 40, 7, 7, 1, 2, 3]]


@pytest.mark.parametrize("pos,window", [("rope", None), ("alibi", None), ("rope", 5), ("alibi", 4)])
def test_left_padded_batch_gives_each_rows_own_logits(pos, window):
    """Guards the causal padding mask: prompts of different lengths, left-padded into one batch and decoded
    with a shared KV cache, give every row the logits it gets alone (prefill and three decode steps)."""
    model = tiny_lm(pos, window)
    follow = [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    L = max(len(p) for p in PROMPTS)
    idx = torch.zeros(len(PROMPTS), L, dtype=torch.long)
    pad = torch.zeros(len(PROMPTS), L, dtype=torch.bool)
    for b, p in enumerate(PROMPTS):
        idx[b, L - len(p):] = torch.tensor(p)
        pad[b, L - len(p):] = True
    with torch.no_grad():
        cache = model.new_cache()
        batched = [model(idx, cache=cache, start_pos=0, pad_mask=pad)[:, -1]]
        for s in range(3):
            pad = torch.cat([pad, torch.ones(len(PROMPTS), 1, dtype=torch.bool)], dim=1)
            step = torch.tensor([[f[s]] for f in follow])
            batched.append(model(step, cache=cache, start_pos=L + s, pad_mask=pad)[:, -1])
        for b, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p + follow[b]]))[0]  # uncached, unpadded, positions from 0
            for s in range(4):
                torch.testing.assert_close(batched[s][b], alone[len(p) - 1 + s], atol=2e-5, rtol=1e-4)
    assert not torch.isnan(cache[0].k).any()  # padding queries attend to themselves, never to nothing


def test_pad_mask_is_refused_by_bidirectional_attention():
    from sentcode.nn import CausalSelfAttention, rope_cos_sin

    attn = CausalSelfAttention(32, 4, 2, causal=False)
    pos = torch.arange(3)
    with pytest.raises(ValueError, match="pad_mask"):
        attn(torch.zeros(1, 3, 32), pos, rope_cos_sin(pos, 8), pad_mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("pos,rebase", [("rope", 4), ("alibi", 4), ("rope", 1)])
def test_greedy_batch_matches_one_at_a_time(pos, rebase, monkeypatch):
    """Guards continuous batching: 5 requests through 2 rows (joins at step boundaries, rows leaving at
    different times, windows jumping past a 16-token context, the whole batch re-prefilled when the shared
    position grows) give each request's batch-1 tokens."""
    monkeypatch.setattr(batch, "_REBASE_CONTEXTS", rebase)
    model = tiny_lm(pos, ctx=16)
    prompts = [[1, 2, 3], [1] + list(range(5, 17)), [1, 9], [1, 33, 34, 35, 36], [1, 7, 7, 7, 7, 7, 7, 7]]
    lengths = [30, 5, 12, 1, 40]
    reqs = [BatchRequest(p, n, temperature=0.0) for p, n in zip(prompts, lengths)]
    got = generate_batch(model, reqs, max_batch=2)
    want = [list(generate_ids(model, p, n, temperature=0.0)) for p, n in zip(prompts, lengths)]
    assert got == want
    assert [len(g) for g in got] == lengths


def test_seeded_sampling_batch_matches_one_at_a_time():
    """Guards per-row sampling settings: each row draws from its own seeded generator with its own
    temperature/top-k/top-p, so a batched request samples exactly what it samples alone."""
    model = tiny_lm()
    settings = [dict(temperature=1.0, seed=1), dict(temperature=0.7, top_k=5, seed=2),
                dict(temperature=1.3, top_p=0.8, seed=3), dict(temperature=0.0)]
    prompts = [[1, 2, 3, 4], [1], [1, 20, 21], [1, 8, 9, 10, 11, 12]]
    reqs = [BatchRequest(p, 25, **s) for p, s in zip(prompts, settings)]
    got = generate_batch(model, reqs, max_batch=4)
    want = [list(generate_ids(model, p, 25, **s)) for p, s in zip(prompts, settings)]
    assert got == want
    assert got[0] != got[2]  # different seeds and settings really give different rows


def test_stop_ids_cancel_and_logprobs():
    model = tiny_lm()
    alone = list(generate_ids(model, [1, 2, 3], 20, temperature=0.0))
    stop = alone[6]
    first = alone.index(stop)
    dec = BatchDecoder(model, max_batch=3)
    a = dec.add(BatchRequest([1, 2, 3], 20, temperature=0.0, stop_ids=(stop,), logprobs=3))
    b = dec.add(BatchRequest([1, 5], 50, temperature=0.0))
    assert dec.free == 1
    events: dict[int, list] = {a: [], b: []}
    while not events[a] or not events[a][-1].done:
        for ev in dec.step():
            events[ev.handle].append(ev)
    toks = [e.token for e in events[a]]
    assert toks == alone[: first + 1]  # ends on the stop id, which is returned
    # log-probs are those of the unscaled distribution, most likely first
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3] + toks]))[0, 2:]
    lp = torch.log_softmax(logits.float(), dim=-1)
    for i, ev in enumerate(events[a]):
        assert ev.logprob == pytest.approx(float(lp[i, ev.token]), abs=1e-4)
        assert [t for t, _ in ev.top] == lp[i].topk(3).indices.tolist()
        assert ev.top[0][0] == ev.token  # greedy: the chosen token is the most likely
    assert events[b] and not events[b][-1].done and events[b][0].logprob is None
    assert dec.cancel(b) and not dec.busy and dec.free == 3
    assert not dec.cancel(b)


def test_dual_ffn_decodes_one_row_at_a_time_and_bad_requests_fail():
    assert BatchDecoder(tiny_lm(ffn="dual"), max_batch=8).max_batch == 1
    dec = BatchDecoder(tiny_lm(ctx=16), max_batch=1)
    with pytest.raises(SentcodeError, match="context"):
        dec.add(BatchRequest(list(range(1, 18)), 4))
    with pytest.raises(SentcodeError, match="max_new_tokens"):
        dec.add(BatchRequest([1], 0))
    with pytest.raises(SentcodeError, match="temperature"):
        dec.add(BatchRequest([1], 3, temperature=-1.0))
    with pytest.raises(SentcodeError, match=r"\[0, 40\)"):
        dec.add(BatchRequest([1, 99], 3))
    dec.add(BatchRequest([1], 3))
    with pytest.raises(SentcodeError, match="full"):
        dec.add(BatchRequest([1], 3))
