"""The scoring API (sentcode.infer.scoring) against direct model forwards, bits per byte and the sentence family."""

from __future__ import annotations

import math

import pytest
import torch

import sentcode
from sentcode.errors import SentcodeError
from sentcode.infer import scoring

from conftest import TINY

TEXT = "The state of the Union is strong, and our economy grows."
LONG = ("Fellow citizens of the Senate and of the House of Representatives: the year has brought peace, trade and "
        "a harvest of plenty to every part of the Union.")


def direct_logprobs(model, ids: list[int]) -> list[float]:
    """log P(ids[p] | ids[:p]) for p = 1..len-1, from one plain forward (ids must fit the context)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).float(), dim=-1)[0]
    return [float(logp[p - 1, ids[p]]) for p in range(1, len(ids))]


@pytest.fixture(scope="module")
def flat(trained_run):
    return sentcode.load(trained_run[0])


@pytest.fixture(scope="module")
def bpe_flat(bpe_data, tmp_path_factory):
    from sentcode.train.lm import train_lm

    out = tmp_path_factory.mktemp("runs") / "bpe"
    train_lm(bpe_data, out, preset="tiny", overrides=TINY, max_steps=5, progress=False)
    return sentcode.load(out)


@pytest.fixture(scope="module")
def sent(sentence_run):
    return sentcode.load(sentence_run)


def test_token_logprobs_equal_a_direct_forward(flat):
    tok = flat.tokenizer
    ids = [tok.eos_id] + tok.encode(TEXT) + [tok.eos_id]
    expected = direct_logprobs(flat.model, ids)
    rows = scoring.token_logprobs(flat, TEXT, top=3)
    assert len(rows) == len(TEXT)
    assert [r["token"] for r in rows] == list(TEXT)
    assert [r["offset"] for r in rows] == list(range(len(TEXT)))
    assert [r["logprob"] for r in rows] == pytest.approx(expected[:-1], abs=1e-5)
    for r in rows:
        assert len(r["top"]) == 3
        best = max(r["top"].values())
        assert best >= r["logprob"] - 1e-6
        assert all(v <= 0 for v in r["top"].values())
        if r["logprob"] >= best - 1e-9:  # the token was the most likely one
            assert r["token"] in r["top"]
    assert all(r["top"] == {} for r in scoring.token_logprobs(flat, TEXT))
    # The rolling log-likelihood adds the end-of-text term, which is the last direct prediction.
    rolling = scoring.loglikelihood_rolling(flat, TEXT)
    assert rolling == pytest.approx(sum(expected), abs=1e-4)
    assert sum(r["logprob"] for r in rows) == pytest.approx(rolling - expected[-1], abs=1e-4)


def test_offsets_are_characters_and_partial_bytes_are_escaped(flat):
    text = "café, naïve"
    rows = scoring.token_logprobs(flat, text)
    assert len(rows) == len(text.encode("utf-8"))
    assert [r["offset"] for r in rows] == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 8, 9, 10]
    assert rows[3]["token"] == "\\xc3" and rows[4]["token"] == "\\xa9"
    assert scoring.token_logprobs(flat, "") == []


def test_sliding_window_matches_direct_windows_and_bpb(flat):
    ctx = flat.context  # 64 in the test config; stride 32
    tok = flat.tokenizer
    text = LONG[: ctx + 31]  # with the two end-of-text tokens: ctx + 33 tokens, two windows: [0, ctx) and [32, ctx + 32)
    ids = [tok.eos_id] + tok.encode(text) + [tok.eos_id]
    assert len(ids) == ctx + 33
    first = direct_logprobs(flat.model, ids[: ctx + 1])  # positions 1..ctx, full window from the start
    second = direct_logprobs(flat.model, ids[32:])  # positions 33..ctx+32; only ctx+1.. are new
    expected = first + second[ctx - 32 :]
    assert len(expected) == len(ids) - 1
    rows = scoring.token_logprobs(flat, text)
    assert [r["logprob"] for r in rows] == pytest.approx(expected[:-1], abs=1e-5)
    rolling = scoring.loglikelihood_rolling(flat, text)
    assert rolling == pytest.approx(sum(expected), abs=1e-4)
    # The same pass as bits per byte: one number, two implementations.
    details = flat.score_details(LONG)
    long_rolling = scoring.loglikelihood_rolling(flat, LONG)
    assert -long_rolling == pytest.approx(details["nats"], rel=1e-5)
    assert -long_rolling / math.log(2) / len(LONG.encode()) == pytest.approx(flat.score(LONG), rel=1e-5)
    assert sum(r["logprob"] for r in scoring.token_logprobs(flat, LONG)) > long_rolling  # minus the end term


def test_loglikelihood_is_exact_for_bytes(flat):
    tok = flat.tokenizer
    context, cont = "The state of the", " Union is strong."
    ids = [tok.eos_id] + tok.encode(context + cont)
    direct = direct_logprobs(flat.model, ids)
    ll, _ = scoring.loglikelihood(flat, context, cont)
    assert ll == pytest.approx(sum(direct[len(context):]), abs=1e-4)
    assert ll < 0
    # Chain rule: an empty context is the document start, so the sum of the text's token logprobs.
    full, _ = scoring.loglikelihood(flat, "", context + cont)
    assert full == pytest.approx(sum(r["logprob"] for r in scoring.token_logprobs(flat, context + cont)), abs=1e-4)
    assert scoring.loglikelihood(flat, context, "") == (0.0, True)


def test_long_context_sees_the_last_window(flat):
    tok = flat.tokenizer
    ctx = flat.context
    context, cont = LONG, " We shall prosper."
    ids = [tok.eos_id] + tok.encode(context + cont)
    assert len(ids) > ctx + 1
    direct = direct_logprobs(flat.model, ids[-(ctx + 1):])  # the newest ctx + 1 tokens, one window
    ll, _ = scoring.loglikelihood(flat, context, cont)
    assert ll == pytest.approx(sum(direct[-len(cont):]), abs=1e-4)
    # A continuation longer than the context: every token still scored once, through the bpb windows.
    ll_long, _ = scoring.loglikelihood(flat, "", LONG)
    rows = scoring.token_logprobs(flat, LONG)
    assert ll_long == pytest.approx(sum(r["logprob"] for r in rows), abs=1e-4)
    # Tokens come out in text order whatever order the windows ran in (the last, shorter one runs first).
    assert [r["logprob"] for r in rows[:ctx]] == pytest.approx(direct_logprobs(flat.model, ids[: ctx + 1]), abs=1e-5)
    assert [r["token"] for r in rows] == list(LONG)


def test_batched_requests_equal_single_requests(flat):
    reqs = [("The state", " of the Union"), ("We", " must act"), (LONG, " Amen."), ("", "Peace."),
            ("The state", " of the Union is strong and growing")]
    batched = scoring.loglikelihood_batch(flat, reqs)
    for (c, x), (ll, greedy) in zip(reqs, batched):
        one, g1 = scoring.loglikelihood(flat, c, x)
        assert ll == pytest.approx(one, abs=1e-5) and greedy == g1
    rolled = scoring.loglikelihood_rolling_batch(flat, [TEXT, LONG, "x"])
    assert rolled == pytest.approx([scoring.loglikelihood_rolling(flat, t) for t in (TEXT, LONG, "x")], abs=1e-5)


def test_greedy_flag_on_a_temperature_zero_continuation(flat):
    context = "The state of the Union"
    cont = flat.generate(context, max_bytes=24, temperature=0)
    assert cont and "\ufffd" not in cont
    ll, greedy = scoring.loglikelihood(flat, context, cont)
    assert greedy is True
    assert ll == pytest.approx(sum(r["logprob"] for r in scoring.token_logprobs(flat, context + cont)[len(context):]),
                               abs=1e-4)
    # Replace the first byte by a less likely one: no longer greedy, and less likely.
    alts = scoring.token_logprobs(flat, context + cont, top=10)[len(context)]["top"]
    second = [t for t in sorted(alts, key=alts.get, reverse=True) if len(t) == 1 and t != cont[0]][0]
    ll2, greedy2 = scoring.loglikelihood(flat, context, second + cont[1:])
    assert greedy2 is False


def test_dual_ffn_model_is_scored_one_window_at_a_time():
    from sentcode.config import config_from_dict
    from sentcode.infer.generator import FlatGenerator
    from sentcode.models.lm import LM
    from sentcode.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = config_from_dict({"family": "lm", "model": {"vocab_size": 259, "d_model": 32, "n_layer": 1, "n_head": 2,
                                                      "n_kv_head": 1, "max_seq_len": 32, "ffn": "dual"},
                           "train": {"seq_len": 32}})
    gen = FlatGenerator(LM(cfg.model), ByteTokenizer())
    tok = gen.tokenizer
    ids = [tok.eos_id] + tok.encode("Short one.") + [tok.eos_id]
    expected = direct_logprobs(gen.model, ids)
    rolled = scoring.loglikelihood_rolling_batch(gen, ["Short one.", "A rather longer text to batch with."])
    assert rolled[0] == pytest.approx(sum(expected), abs=1e-5)


def test_bpe_run(bpe_flat):
    tok = bpe_flat.tokenizer
    rows = scoring.token_logprobs(bpe_flat, TEXT, top=2)
    assert "".join(r["token"] for r in rows) == TEXT
    assert len(rows) < len(TEXT)  # merges happened
    offsets = [r["offset"] for r in rows]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert [TEXT[o:].startswith(r["token"]) for o, r in zip(offsets, rows)] == [True] * len(rows)
    ids = [tok.eos_id] + tok.encode(TEXT) + [tok.eos_id]
    expected = direct_logprobs(bpe_flat.model, ids)
    assert [r["logprob"] for r in rows] == pytest.approx(expected[:-1], abs=1e-5)
    assert -scoring.loglikelihood_rolling(bpe_flat, TEXT) == pytest.approx(bpe_flat.score_details(TEXT)["nats"],
                                                                          rel=1e-5)
    # Context and continuation are tokenized separately: the continuation's own tokens after the context's.
    context, cont = "The state of the Un", "ion is strong"
    c_ids, x_ids = tok.encode(context), tok.encode(cont)
    direct = direct_logprobs(bpe_flat.model, [tok.eos_id] + c_ids + x_ids)
    ll, _ = scoring.loglikelihood(bpe_flat, context, cont)
    assert ll == pytest.approx(sum(direct[len(c_ids):]), abs=1e-4)


def test_sentence_family(sent):
    with pytest.raises(SentcodeError, match="not defined for sentence-step runs"):
        scoring.token_logprobs(sent, TEXT)
    bits = sent.score_details(TEXT)["bits"]
    rolling = scoring.loglikelihood_rolling(sent, TEXT)
    assert rolling == pytest.approx(-bits * math.log(2), rel=1e-6)
    assert rolling < 0
    context, cont = "The state of the Union is strong.", " We must act now."
    ll, greedy = scoring.loglikelihood(sent, context, cont)
    assert greedy is False
    expected = scoring.loglikelihood_rolling(sent, context + cont) - scoring.loglikelihood_rolling(sent, context)
    assert ll == pytest.approx(expected, rel=1e-6)
    assert ll < 0
    assert scoring.loglikelihood(sent, "", cont)[0] == pytest.approx(scoring.loglikelihood_rolling(sent, cont),
                                                                     rel=1e-6)
    assert scoring.loglikelihood_rolling(sent, "   ") == 0.0
    batched = scoring.loglikelihood_batch(sent, [(context, cont), (context, " Peace.")])
    assert batched[0][0] == pytest.approx(ll, rel=1e-6)


def test_bad_input(flat):
    with pytest.raises(SentcodeError, match="top must be"):
        scoring.token_logprobs(flat, TEXT, top=-1)
    with pytest.raises(SentcodeError, match="must be a string"):
        scoring.loglikelihood(flat, None, "x")
    with pytest.raises(SentcodeError, match="must be a string"):
        scoring.loglikelihood_rolling(flat, 3)
