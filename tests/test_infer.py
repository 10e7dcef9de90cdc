import math

import numpy as np
import pytest
import torch

import sentcode
from sentcode.config import ModelConfig
from sentcode.data import DataDir
from sentcode.errors import SentcodeError
from sentcode.eval.bpb import evaluate_bpb, token_byte_lengths
from sentcode.infer.engine import generate_ids
from sentcode.nn.sampling import filter_logits, make_generator, sample_next
from sentcode.models.lm import LM

# ---------------------------------------------------------------- sampling


def test_temperature_zero_and_top_k_one_are_argmax():
    """Guards greedy decoding: temperature 0 and top_k 1 both pick the argmax, whatever the seed."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(dim=-1)
    for seed in range(3):
        assert torch.equal(sample_next(logits, temperature=0, generator=make_generator(seed)), best)
        assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=make_generator(seed)), best)
        assert torch.equal(sample_next(logits, temperature=5.0, top_k=1, top_p=0.9, generator=make_generator(seed)), best)
    # plain sampling at temperature 1 is not argmax everywhere
    assert not torch.equal(sample_next(logits, 1.0, generator=make_generator(0)), best)


def test_top_k_zero_samples_not_greedy():
    """Guards a-lm's defect: its README said top-k 0 is greedy; top_k=0 means no limit and must sample."""
    flat = torch.zeros(1, 50)
    draws = {int(sample_next(flat, 1.0, top_k=0, generator=make_generator(s))[0]) for s in range(40)}
    assert len(draws) > 10  # many different tokens, not one greedy choice
    peaked = torch.tensor([[0.0, 0.1, 0.2]])
    tokens = [int(sample_next(peaked, 1.0, top_k=0, generator=make_generator(s))[0]) for s in range(100)]
    assert set(tokens) == {0, 1, 2}
    assert torch.equal(filter_logits(peaked, top_k=0), peaked)


def test_top_k_limits_to_k_most_likely():
    """Guards top-k: only the k largest logits can be sampled."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 2.5, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=3))[0].nonzero().flatten().tolist()
    assert kept == [1, 3, 4]
    seen = {int(sample_next(logits, 2.0, top_k=3, generator=make_generator(s))[0]) for s in range(200)}
    assert seen == {1, 3, 4}


@pytest.mark.parametrize(
    "top_p,nucleus",
    [(0.3, {0}), (0.45, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.85, {0, 1, 2}), (0.97, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_nucleus(top_p, nucleus):
    """Guards nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[[2, 0, 3, 1]][None]  # shuffled: token order must not matter
    order = [1, 3, 0, 2]  # token ids holding probabilities 0.5, 0.3, 0.15, 0.05
    expected = {order[i] for i in nucleus}
    kept = set(torch.isfinite(filter_logits(logits, top_p=top_p))[0].nonzero().flatten().tolist())
    assert kept == expected
    seen = {int(sample_next(logits, 1.0, top_p=top_p, generator=make_generator(s))[0]) for s in range(300)}
    assert seen == expected


def test_seeded_sampling_is_reproducible():
    """Guards reproducibility: the same seed gives the same tokens, another seed other tokens."""
    logits = torch.zeros(1, 259)
    a = [int(sample_next(logits, 1.0, generator=g)[0]) for g in [make_generator(11)] for _ in range(30)]
    g = make_generator(11)
    b = [int(sample_next(logits, 1.0, generator=g)[0]) for _ in range(30)]
    g = make_generator(12)
    c = [int(sample_next(logits, 1.0, generator=g)[0]) for _ in range(30)]
    assert a == b and a != c

    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=40, d_model=32, n_layer=1, n_head=4, n_kv_head=2, max_seq_len=32))
    run = lambda seed: list(generate_ids(model, [1, 2, 3], 40, temperature=1.0, seed=seed))  # noqa: E731
    assert run(5) == run(5)
    assert run(5) != run(6)


# ---------------------------------------------------------------- evaluation


def _untrained(vocab_size: int, max_seq_len: int = 64) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layer=1, n_head=4, n_kv_head=2, max_seq_len=max_seq_len)
    return LM(cfg).eval()


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_evaluate_bpb_counts_every_token_and_byte_once(kind, bytes_data, bpe_data):
    """Guards bpb bookkeeping: every held-out token scored once, bytes = the split's UTF-8 bytes (EOS counts 0)."""
    data = DataDir(bytes_data if kind == "bytes" else bpe_data)
    tok = data.tokenizer
    model = _untrained(tok.vocab_size)
    for split in ("val", "test"):
        tokens = data.tokens(split)
        r = evaluate_bpb(model, tokens, tok, seq_len=64, batch_size=16)
        info = data.meta["splits"][split]
        assert r["tokens"] == len(tokens) == info["tokens"]  # the leading EOS makes the first token scored too
        assert r["bytes"] == info["bytes"] == data.split_bytes(split)
        assert r["bpb"] == pytest.approx(r["nats"] / math.log(2) / r["bytes"], rel=1e-12)
        if kind == "bytes":
            assert r["bytes"] == r["tokens"] - info["documents"]  # one EOS per document, zero bytes each
        else:
            assert r["tokens"] < r["bytes"] / 1.5  # BPE tokens cover several bytes
    assert token_byte_lengths(tok)[[tok.bos_id, tok.eos_id, tok.pad_id]].tolist() == [0, 0, 0]


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_evaluate_bpb_matches_direct_computation(kind, bytes_data, bpe_data):
    """Guards the bpb formula: same nats as one plain forward pass, divided by UTF-8 bytes, for both tokenizers."""
    data = DataDir(bytes_data if kind == "bytes" else bpe_data)
    tok = data.tokenizer
    model = _untrained(tok.vocab_size, max_seq_len=128)
    tokens = np.asarray(data.tokens("val")[:100], dtype=np.int64)
    r = evaluate_bpb(model, tokens, tok, seq_len=128)  # one window covers the whole stream
    stream = torch.tensor(np.concatenate([[tok.eos_id], tokens]))[None]
    with torch.no_grad():
        logits = model(stream[:, :-1])
    nats = float(torch.nn.functional.cross_entropy(logits[0], stream[0, 1:], reduction="sum"))
    n_bytes = len(tok.decode(tokens.tolist()))
    assert r["tokens"] == 100 and r["bytes"] == n_bytes
    assert r["nats"] == pytest.approx(nats, rel=1e-5)
    assert r["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    # a sliding pass with shorter windows scores the same tokens and bytes
    r2 = evaluate_bpb(model, tokens, tok, seq_len=16, batch_size=3)
    assert (r2["tokens"], r2["bytes"]) == (r["tokens"], r["bytes"])
    assert r2["bpb"] == pytest.approx(r["bpb"], rel=0.05)


def test_score_returns_finite_positive_bpb(trained_run):
    """Guards Generator.score: a finite positive bpb, lower on in-domain text than on noise."""
    g = sentcode.load(trained_run[0])
    good = g.score("The state of the Union is strong, and the people of the United States are at work.")
    noise = g.score(bytes(np.random.default_rng(0).integers(0, 256, 80, dtype=np.uint8)))
    assert math.isfinite(good) and good > 0
    assert good < noise
    d = g.score_details("abc")
    assert d["bytes"] == 3 and d["tokens"] == 4  # 3 bytes + the closing EOS
    with pytest.raises(SentcodeError):
        g.score("")


# ---------------------------------------------------------------- generation API


def test_generate_respects_max_bytes(trained_run):
    """Guards the byte budget: generate never returns more than max_bytes bytes."""
    g = sentcode.load(trained_run[0])
    for seed in range(3):
        text = g.generate("The", max_bytes=50, seed=seed)
        assert isinstance(text, str)
        assert 0 < len(g.tokenizer.encode(text)) <= 50
    # a hot sample emits invalid UTF-8; its U+FFFD replacements (3 bytes each) still fit in the budget
    for seed in range(3):
        hot = g.generate("The", max_bytes=50, seed=seed, temperature=3.0)
        assert "\ufffd" in hot
        assert 40 <= len(hot.encode("utf-8")) <= 50
    greedy = g.generate("The", max_bytes=50, temperature=0)
    assert len(greedy.encode()) == 50  # a trained model does not end a document within 50 bytes of "The"
    assert g.generate("The", max_bytes=0) == ""


def test_stream_joins_to_generate(trained_run):
    """Guards stream/generate consistency: same seed, same text, pieces in order."""
    g = sentcode.load(trained_run[0])
    pieces = list(g.stream("The", max_bytes=60, seed=3))
    assert len(pieces) > 1 and all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == g.generate("The", max_bytes=60, seed=3)
    assert g.generate("The", max_bytes=60, temperature=0) == g.generate("The", max_bytes=60, temperature=0, use_cache=False)


def test_stop_truncates_before_stop_string(trained_run):
    """Guards stop=: the output ends right before the first occurrence of the stop string."""
    g = sentcode.load(trained_run[0])
    kw = dict(max_bytes=80, temperature=0.8, seed=2)  # seeded: the same tokens are drawn with or without stop
    full = g.generate("The", **kw)
    # pick stop strings that first occur well inside the text
    candidates = [full[i : i + n] for n in (1, 2, 3) for i in range(3, len(full) - n)]
    stops = [s for s in candidates if full.find(s) >= 3][:6]
    assert len(stops) >= 3
    for stop in stops:
        out = g.generate("The", stop=stop, **kw)
        assert out == full[: full.find(stop)]
        assert stop not in out
        assert "".join(g.stream("The", stop=stop, **kw)) == out
    # a stop string that never occurs changes nothing
    assert g.generate("The", stop="\x00never\x00", **kw) == full
