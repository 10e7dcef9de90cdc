"""The sentence planner: causal over steps, level-by-level tuples, residual head, training task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentcode.runs.parts import load_planner
from sentcode.config import config_from_dict
from sentcode.errors import ConfigError, DataError
from sentcode.models.sentence import Planner, PlannerConfig, PlannerRunConfig, join_embeddings, split_embeddings
from sentcode.models.sentence.planner import load_planner_config
from sentcode.nn.rvq import ResidualVQ
from sentcode.train.planner import PlanBatches, PlanDocs, eval_windows, train_planner

torch.set_num_threads(1)

K, V, E = 3, [8, 8, 8], 8
TINY = {"levels": K, "codebook_sizes": V, "d_model": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "max_steps": 16,
        "d_emb": E}
TINY_RUN = [
    "planner.levels=3", "planner.codebook_sizes=[8,8,8]", "planner.d_model=32", "planner.n_layer=2",
    "planner.n_head=4", "planner.n_kv_head=2", "planner.max_steps=16", "planner.d_emb=8",
    "train.seq_len=16", "train.micro_batch=8", "train.batch_tokens=128", "train.eval_every=0",
    "train.save_every=0", "train.log_every=1", "train.warmup_steps=5", "train.lr=1.0e-2", "train.precision=fp32",
]


def tiny(seed=0, **kw) -> Planner:
    torch.manual_seed(seed)
    return Planner(PlannerConfig(**{**TINY, **kw})).eval()


def rand_codes(B, S, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8, (B, S, K), generator=g)


def all_logits(model, codes, residual=None):
    logits, _ = model.level_outputs(model.hidden(codes, residual), codes)
    return logits  # K x [B, S, V]


def pattern_docs(n_docs: int, length: int, seed: int, noise: float = 0.1) -> list[np.ndarray]:
    """tuple_{t+1} = f(tuple_t), each level replaced by a random code with probability ``noise``.

    Level 2 is a function of levels 0 and 1 of the same tuple, so it is only predictable given them.
    """
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        c = np.zeros((length, K), dtype=np.int64)
        c[0] = rng.integers(0, 8, K)
        for t in range(1, length):
            c[t, 0] = (c[t - 1, 0] + 1) % 8
            c[t, 1] = (c[t - 1, 1] + 3) % 8
            c[t, 2] = (c[t, 0] + c[t, 1]) % 8
            flip = rng.random(K) < noise
            c[t, flip] = rng.integers(0, 8, int(flip.sum()))
        docs.append(c)
    return docs


@pytest.mark.parametrize("use_residual", [False, True])
def test_steps_are_causal(use_residual):
    model = tiny(use_residual=use_residual)
    codes = rand_codes(2, 10)
    res = torch.randn(2, 10, E) if use_residual else None
    t = 4
    codes2, res2 = codes.clone(), None if res is None else res.clone()
    codes2[:, t + 1] = (codes2[:, t + 1] + 1) % 8
    if res2 is not None:
        res2[:, t + 1] += 1.0
    with torch.no_grad():
        a, b = all_logits(model, codes, res), all_logits(model, codes2, res2)
    for la, lb in zip(a, b):
        torch.testing.assert_close(la[:, : t + 1], lb[:, : t + 1])
        assert not torch.allclose(la[:, t + 2], lb[:, t + 2])  # later steps do read it


def test_level_sees_earlier_levels_of_its_tuple_only():
    model = tiny()
    codes = rand_codes(1, 6)
    p = 3
    for j in range(K):
        changed = codes.clone()
        changed[0, p, j] = (changed[0, p, j] + 1) % 8
        with torch.no_grad():
            a, b = all_logits(model, codes), all_logits(model, changed)
        for level in range(K):
            same = torch.allclose(a[level][0, p], b[level][0, p])
            assert same == (level <= j), (j, level)  # level l reads levels < l of the tuple it predicts


def test_padding_never_counts():
    model = tiny(use_residual=True)
    codes, res = rand_codes(2, 12), torch.randn(2, 12, E)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    codes2, res2 = codes.clone(), res.clone()
    codes2[1, 7:] = 99  # garbage, even out of range
    res2[1, 7:] = 1e3
    with torch.no_grad():
        a, b = model(codes, res, mask), model(codes2, res2, mask)
        alone = model.log_prob(codes[1:, :7], res[1:, :7])
        padded = model.log_prob(codes2[1:], res2[1:], mask[1:])
    for k in ("loss", "level_nll", "level_acc", "exact_match", "residual_mse"):
        torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(padded[:, :7], alone)
    assert (padded[:, 7:] == 0).all()


def test_residual_target_is_what_inference_feeds_back():
    torch.manual_seed(0)
    rvq = ResidualVQ(E, K, V)
    rvq.fit(torch.randn(300, E), iters=3)
    emb = torch.randn(1, 9, E)
    codes, res = split_embeddings(rvq, emb)
    torch.testing.assert_close(res, emb - rvq.decode(codes))
    torch.testing.assert_close(join_embeddings(rvq, codes, res), emb)
    model = tiny(use_residual=True)
    with torch.no_grad():
        out = model(codes, res)
    # The trained target is the residual e - decode(c), the same quantity the steps read as input.
    want = (out["residual_pred"] - (emb - rvq.decode(codes))).pow(2).mean()
    torch.testing.assert_close(out["residual_mse"], want)
    # Inference returns that head's output for the tuple it chose; history + (codes, residual) is then a
    # valid next input and joins back to an embedding.
    c, r, _ = model.sample_next(codes[:, :5], res[:, :5], temperature=0)
    ext_c = torch.cat([codes[:, :5], c[None, None]], 1)
    ext_r = torch.cat([res[:, :5], r[None, None]], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ext_c, ext_r)["residual_pred"][0, 5], r)
    assert join_embeddings(rvq, c, r).shape == (E,)


def test_log_prob_is_minus_summed_level_nll():
    model = tiny()
    codes = rand_codes(1, 9, seed=3)
    with torch.no_grad():
        lp = model.log_prob(codes)
        out = model(codes)
    assert lp.shape == (1, 9)
    torch.testing.assert_close(lp.sum(), -out["level_nll"].sum() * 9)


def test_greedy_sample_is_argmax_per_level_and_scores_itself():
    model = tiny(seed=1)
    hist = rand_codes(1, 5, seed=4)
    c, r, logprob = model.sample_next(hist, temperature=0)
    assert r is None and c.shape == (K,)
    ext = torch.cat([hist, c[None, None]], 1)
    with torch.no_grad():
        logits = all_logits(model, ext)
        lp = model.log_prob(ext)
    for level in range(K):
        assert int(logits[level][0, 5].argmax()) == int(c[level])
    assert abs(float(lp[0, 5]) - logprob) < 1e-4
    # sampling is reproducible under a seeded generator; an empty history predicts the first sentence
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    empty = torch.zeros(1, 0, K, dtype=torch.long)
    a = model.sample_next(empty, temperature=1.0, top_k=5, generator=g1)[0]
    b = model.sample_next(empty, temperature=1.0, top_k=5, generator=g2)[0]
    assert torch.equal(a, b)


def test_long_history_keeps_the_most_recent_steps():
    model = tiny(seed=2)
    hist = rand_codes(1, 20, seed=5)  # more than max_steps = 16
    c, _, logprob = model.sample_next(hist, temperature=0)
    # = a training window starting inside the document: the oldest kept tuple stands in for BOS
    window = torch.cat([hist[:, -15:], c[None, None]], 1)
    with torch.no_grad():
        lp = model.log_prob(window, prev_codes=hist[:, -16])
    assert abs(float(lp[0, -1]) - logprob) < 1e-4


def test_batch_source_resumes_and_marks_document_starts():
    cfg = PlannerConfig(**TINY)
    docs = PlanDocs(pattern_docs(5, 12, seed=0) + [np.zeros((0, K), dtype=np.int64)], cfg, "training")
    src = PlanBatches(docs, 8, 6, seed=3)
    first = [src.next_batch() for _ in range(5)]
    again = PlanBatches(docs, 8, 6, seed=0)
    again.load_state_dict({"seed": 3, "step": 3})
    for want in first[3:]:
        got = again.next_batch()
        assert torch.equal(got.codes, want.codes) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.prev_codes, want.prev_codes)
    assert not torch.equal(first[0].codes, first[1].codes)
    for i, (d, o, _, end) in enumerate(src.windows(0)):
        want_prev = docs.codes[d][o - 1] if o > 0 else np.full(K, -1)
        assert np.array_equal(first[0].prev_codes[i].numpy(), want_prev)
        assert int(first[0].mask[i].sum()) == end - o


def test_eval_windows_score_every_sentence_once():
    lengths = [0, 3, 16, 40]
    seen = {}
    for d, o, s, end in eval_windows(lengths, 16):
        assert o <= s < end <= o + 16
        for t in range(s, end):
            seen[(d, t)] = seen.get((d, t), 0) + 1
    assert sorted(seen) == [(d, t) for d, n in enumerate(lengths) for t in range(n)]
    assert set(seen.values()) == {1}


def test_training_beats_the_unigram_baseline(tmp_path):
    train, val = pattern_docs(40, 24, seed=1), pattern_docs(8, 24, seed=2)
    summary = train_planner(train, val, tmp_path / "run", overrides=TINY_RUN, max_steps=60, device="cpu",
                            progress=False)
    ev = summary["final_eval"]
    assert summary["status"] == "completed" and ev["sentences"] == 8 * 24
    assert ev["unigram_bits_per_sentence"] > 8.5  # ~3 bits per level
    assert ev["plan_bits_per_sentence"] < 0.45 * ev["unigram_bits_per_sentence"], ev  # about 0.3 when written
    assert ev["level_acc_0"] > 0.6 and ev["exact_match"] > 0.4, ev
    assert (tmp_path / "run" / "planner.safetensors").is_file()
    model = load_planner(tmp_path / "run")
    assert model.cfg.codebook_sizes == V
    codes, _, _ = model.sample_next(torch.as_tensor(val[0][None, :5]), temperature=0)
    assert codes.shape == (K,)


def test_bad_configs_and_data_are_rejected():
    with pytest.raises(ConfigError, match="codebook_sizes"):
        PlannerConfig(levels=3, codebook_sizes=[8, 8]).validate()
    with pytest.raises(ConfigError, match="codebook_sizes"):
        config_from_dict({"planner": {"levels": 1, "codebook_sizes": 8}}, cls=PlannerRunConfig)
    with pytest.raises(ConfigError, match="max_steps"):
        load_planner_config(overrides=["planner.max_steps=8", "train.seq_len=16", "train.batch_tokens=256"])
    with pytest.raises(ConfigError, match="n_head"):
        Planner(PlannerConfig(**{**TINY, "n_head": 3}))
    cfg = load_planner_config(overrides=["planner.levels=2", "planner.codebook_sizes=[4,5]"])
    assert cfg.planner.codebook_sizes == [4, 5]
    assert config_from_dict(cfg.to_dict(), cls=PlannerRunConfig) == cfg
    good = PlannerConfig(**TINY)
    with pytest.raises(DataError, match="level 1"):
        PlanDocs([np.array([[0, 8, 0]])], good, "training")
    with pytest.raises(DataError, match="residual"):
        PlanDocs([np.zeros((2, K), dtype=np.int64)], PlannerConfig(**TINY, use_residual=True), "training")


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    rng = np.random.default_rng(0)
    docs = [(c, rng.standard_normal((len(c), E)).astype(np.float32)) for c in pattern_docs(12, 20, seed=3)]
    run = TINY_RUN + ["planner.use_residual=true", "train.save_every=2"]
    straight = train_planner(docs, docs[:3], tmp_path / "a", overrides=run, max_steps=4, device="cpu", progress=False)
    part = train_planner(docs, docs[:3], tmp_path / "b", overrides=run, max_steps=4, stop_at=2, device="cpu",
                         progress=False)
    assert part["status"] == "interrupted"
    resumed = train_planner(docs, docs[:3], tmp_path / "b", overrides=run, max_steps=4, resume="auto", device="cpu",
                            progress=False)
    assert resumed["final_eval"] == straight["final_eval"]
    assert "residual_mse" in resumed["final_eval"]
