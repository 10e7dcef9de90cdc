"""The sentence renderer: what its loss counts, exact log-probs, cached generation, and that codes help."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sentcode.runs.parts import load_renderer
from sentcode.config import config_from_dict
from sentcode.errors import ConfigError, DataError, SentcodeError
from sentcode.models.sentence.renderer import (
    BOS, EOS, PAD, SEP, ARRenderer, RendererConfig, RendererRunConfig, collate_render, tail,
)
from sentcode.train.renderer import RenderBatches, RenderDoc, ValRender, contexts_of, train_renderer

torch.set_num_threads(1)

TINY = dict(levels=2, codebook_sizes=[8, 8], d_model=32, n_layer=2, n_head=4, n_kv_head=2, context_bytes=16,
            max_sentence_bytes=24)
TINY_RUN = [
    "renderer.levels=2", "renderer.codebook_sizes=[8, 8]", "renderer.d_model=32", "renderer.n_layer=2",
    "renderer.n_head=4", "renderer.n_kv_head=2", "renderer.context_bytes=16", "renderer.max_sentence_bytes=24",
    "renderer.code_noise=0.0", "train.seq_len=24", "train.micro_batch=16", "train.batch_tokens=384",
    "train.eval_every=0", "train.save_every=0", "train.log_every=10", "train.warmup_steps=5", "train.lr=1.0e-2",
]
WORDS = ["ant", "bee", "cat", "dog", "elk", "fox", "gnu", "hen"]


def tiny(seed=0, **kw) -> ARRenderer:
    torch.manual_seed(seed)
    return ARRenderer(RendererConfig(**{**TINY, **kw})).eval()


def code_docs(n_docs: int, per_doc: int, seed: int) -> list[RenderDoc]:
    """Sentences that are a function of their codes ("cat hen."), codes drawn at random: without the codes
    a sentence carries 6 bits no context can predict; with them, none."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        codes = rng.integers(0, 8, size=(per_doc, 2))
        docs.append(RenderDoc([f"{WORDS[a]} {WORDS[b]}." for a, b in codes], codes))
    return docs


def slow_input(model: ARRenderer, codes, residual, head: list[int]) -> torch.Tensor:
    """The trunk's input for one sequence, written out for each way codes can enter."""
    pre = model.prefix(codes, residual)  # [1, K, d]
    tok = model.embed(torch.tensor([head]))
    if model.cfg.code_input == "add" and model.cfg.use_codes:
        return tok + pre.sum(dim=1, keepdim=True)
    return torch.cat([pre, tok], dim=1)


@torch.no_grad()
def slow_log_prob(model: ARRenderer, codes, residual, context: bytes, sentence: bytes) -> float:
    """One full uncached forward per predicted token, one sentence at a time."""
    cfg = model.cfg
    total = 0.0
    for t in range(len(sentence) + 1):
        head = [SEP, *tail(context, cfg.context_bytes), BOS, *sentence[:t]]
        c = torch.as_tensor([codes], dtype=torch.long)
        r = None if residual is None else torch.as_tensor(np.asarray(residual)[None], dtype=torch.float32)
        x = slow_input(model, c, r, head)
        logp = torch.log_softmax(model.trunk(x)[0, -1], dim=-1)
        total += float(logp[sentence[t] if t < len(sentence) else EOS])
    return total


@torch.no_grad()
def slow_greedy(model: ARRenderer, codes, residual, context: bytes, max_bytes: int) -> tuple[bytes, float]:
    out, lp = b"", 0.0
    for _ in range(max_bytes + 1):
        head = [SEP, *tail(context, model.cfg.context_bytes), BOS, *out]
        r = None if residual is None else torch.as_tensor(np.asarray(residual)[None], dtype=torch.float32)
        x = slow_input(model, torch.as_tensor([codes]), r, head)
        logp = torch.log_softmax(model.trunk(x)[0, -1], dim=-1)
        tok = int(logp.argmax())
        if tok != EOS and len(out) >= max_bytes:
            break
        lp += float(logp[tok])
        if tok == EOS:
            break
        out += bytes([tok])
    return out, lp


# ---- what is counted, and exact scores ---------------------------------------------------------------------


def test_loss_counts_only_sentence_bytes_and_eos():
    cfg = RendererConfig(**TINY)
    sents = [b"Hi.", b"A longer one here.", b""]
    ctxs = [b"some earlier text that is long", b"", b"x"]
    b = collate_render(cfg, [[1, 2], [3, 4], [5, 6]], None, ctxs, sents)
    assert b.counted.sum(1).tolist() == [len(s) + 1 for s in sents]
    for i, s in enumerate(sents):
        assert b.tokens[i][b.counted[i]].tolist() == [*s, EOS]
        assert b.tokens[i, 0] == SEP and int((b.tokens[i] == BOS).sum()) == 1
    # Another context changes the inputs but not which tokens are scored.
    b2 = collate_render(cfg, [[1, 2], [3, 4], [5, 6]], None, [b"zz", b"other context", b""], sents)
    assert [row[m].tolist() for row, m in zip(b2.tokens, b2.counted)] == [row[m].tolist() for row, m in zip(b.tokens, b.counted)]
    # Only the last context_bytes bytes are read.
    assert b.tokens[0, 1 : 1 + 16].tolist() == list(ctxs[0][-16:])
    model = tiny()
    lp = model.log_prob([[1, 2], [3, 4], [5, 6]], None, ctxs, sents).detach()
    n = sum(len(s) + 1 for s in sents)
    assert float(model(b).detach()) == pytest.approx(-float(lp.sum()) / n, rel=1e-5)


@pytest.mark.parametrize("kw", [{}, {"use_codes": False}, {"use_residual": True, "d_emb": 8}, {"code_input": "add"}])
def test_log_prob_equals_slow_reference_and_ignores_padding(kw):
    model = tiny(1, **kw)
    rng = np.random.default_rng(0)
    codes = [[1, 7], [0, 3], [5, 5]]
    res = rng.standard_normal((3, 8)).astype(np.float32) if kw.get("use_residual") else None
    ctxs = [b"The text before.", b"", "\u00e9t\u00e9 chaud".encode()]
    sents = [b"Short.", b"A much longer sentence!", b""]
    batched = model.log_prob(codes, res, ctxs, sents).detach()
    for i in range(3):
        ref = slow_log_prob(model, codes[i], None if res is None else res[i], ctxs[i], sents[i])
        assert float(batched[i]) == pytest.approx(ref, abs=1e-4)
        alone = model.log_prob(codes[i : i + 1], None if res is None else res[i : i + 1], ctxs[i : i + 1],
                               sents[i : i + 1]).detach()
        assert float(alone[0]) == pytest.approx(float(batched[i]), abs=1e-4)


@torch.no_grad()
def test_step_distribution_is_over_bytes_and_eos():
    model = tiny(2)
    x = torch.cat([model.prefix(torch.tensor([[1, 2]]), None), model.embed(torch.tensor([[SEP, 65, BOS, 66]]))], 1)
    p = torch.softmax(model.trunk(x)[0], dim=-1)  # [T, 259]
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))
    assert float(p[:, BOS].max()) == 0 and float(p[:, PAD].max()) == 0
    # The empty sentence is exactly "EOS first", and a sentence's score includes its EOS.
    first = torch.log_softmax(model.trunk(x[:, : model.cfg.prefix_len + 3])[0, -1], -1)  # after "SEP A BOS"
    assert float(model.log_prob([[1, 2]], None, [b"A"], [b""])[0]) == pytest.approx(float(first[EOS]), abs=1e-5)
    one = float(model.log_prob([[1, 2]], None, [b"A"], [b"B"])[0])
    assert one < float(first[66]) - 1e-3  # below the first byte's log-prob: the EOS after it is charged too


@pytest.mark.parametrize("kw", [{}, {"use_codes": False}, {"use_residual": True, "d_emb": 8}, {"code_input": "add"}])
def test_cached_generation_equals_uncached_greedy(kw):
    model = tiny(3, **kw)
    res = np.linspace(-1, 1, 8).astype(np.float32) if kw.get("use_residual") else None
    for ctx, max_bytes in ((b"Before this one.", 12), (b"", 3)):
        got = model.generate([2, 6], res, ctx, max_bytes=max_bytes, temperature=0, n=2)
        ref = slow_greedy(model, [2, 6], res, ctx, max_bytes)
        for text, lp in got:
            assert text == ref[0]
            assert lp == pytest.approx(ref[1], abs=1e-4)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    with pytest.raises(SentcodeError, match="max_sentence_bytes"):
        model.log_prob([[0, 0]], None, [b""], [b"x" * 25])
    with pytest.raises(SentcodeError, match="level 1"):
        model.log_prob([[0, 8]], None, [b""], [b"x"])
    with pytest.raises(SentcodeError, match="max_bytes"):
        model.generate([0, 0], max_bytes=25)
    with pytest.raises(SentcodeError, match="residual"):
        tiny(use_residual=True, d_emb=8).log_prob([[0, 0]], None, [b""], [b"x"])
    with pytest.raises(ConfigError, match="codebook_sizes"):
        RendererConfig(**{**TINY, "codebook_sizes": [8]}).validate()
    with pytest.raises(ConfigError, match="use_residual"):
        RendererConfig(**{**TINY, "use_codes": False, "use_residual": True}).validate()
    with pytest.raises(ConfigError, match="seq_len"):
        config_from_dict({"renderer": {"max_sentence_bytes": 24}}, cls=RendererRunConfig)
    cfg = config_from_dict({"renderer": {"levels": 2, "codebook_sizes": [8, 16], "max_sentence_bytes": 32},
                            "train": {"seq_len": 32, "batch_tokens": 512}}, cls=RendererRunConfig)
    assert cfg.renderer.codebook_sizes == [8, 16] and cfg.family == "sentence-renderer-ar"
    with pytest.raises(DataError, match="codes"):
        ValRender([RenderDoc(["a."], np.zeros((2, 2), np.int64))], RendererConfig(**TINY), 4)


# ---- batches -----------------------------------------------------------------------------------------------


def test_contexts_are_the_preceding_sentences_of_the_document():
    sents = [b"One.", b"Two two.", b"Three three three."]
    assert contexts_of(sents, 64) == [b"", b"One.", b"One. Two two."]
    assert contexts_of(sents, 6) == [b"", b"One.", b"o two."]
    assert contexts_of(sents, 0) == [b"", b"", b""]
    data = RenderBatches([RenderDoc(["a.", "b."], [[0, 0], [1, 1]]), RenderDoc(["c."], [[2, 2]])],
                         RendererConfig(**TINY), 4).data
    assert data.contexts == [b"", b"a.", b""]  # a document's first sentence has no context


def test_batch_source_resumes_identically():
    cfg = RendererConfig(**{**TINY, "code_noise": 0.3})
    docs = code_docs(6, 5, seed=0)
    a = RenderBatches(docs, cfg, 4, seed=7)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    expect = [a.next_batch() for _ in range(2)]
    b = RenderBatches(docs, cfg, 4, seed=7)
    b.load_state_dict(state)
    for e, g in zip(expect, [b.next_batch() for _ in range(2)]):
        assert torch.equal(e.codes, g.codes) and torch.equal(e.tokens, g.tokens) and torch.equal(e.counted, g.counted)
    other = RenderBatches(docs, cfg, 4, seed=7, rank=1, world_size=2)
    assert not torch.equal(other.next_batch().tokens, RenderBatches(docs, cfg, 4, seed=7, world_size=2).next_batch().tokens)


def test_code_corruption_only_in_training_batches():
    docs = code_docs(10, 10, seed=1)
    true = {s.encode(): tuple(c) for d in docs for s, c in zip(d.sentences, d.codes)}
    noisy = RenderBatches(docs, RendererConfig(**{**TINY, "code_noise": 0.5}), 64, seed=0)
    changed = total = 0
    for step in range(4):
        codes, _, _, sents = noisy.examples(step)
        for c, s in zip(codes, sents):
            changed += int(sum(a != b for a, b in zip(c, true[s])))
            total += 2
    assert 0.3 < changed / total < 0.55  # replaced with p=0.5 by a uniform code over 8 (7/8 of them differ)
    # The planner's predictions are read instead of the truth with probability predicted_mix.
    # Documents without predictions end their sentences in "!", so a sentence tells which kind it came from.
    plain = [RenderDoc([s[:-1] + "!" for s in d.sentences], d.codes) for d in docs[5:]]
    true.update({s.encode(): tuple(c) for d in plain for s, c in zip(d.sentences, d.codes)})
    pred_docs = [RenderDoc(d.sentences, d.codes, predicted_codes=(d.codes + 1) % 8) for d in docs[:5]] + plain
    pred_of = {s.encode(): tuple((c + 1) % 8) for d in docs[:5] for s, c in zip(d.sentences, d.codes)}
    mixed = RenderBatches(pred_docs, RendererConfig(**{**TINY, "code_noise": 0.0, "predicted_mix": 1.0}), 64, seed=0)
    codes, _, _, sents = mixed.examples(0)
    for c, s in zip(codes, sents):
        assert tuple(c) == pred_of.get(s, true[s])
    # Evaluation reads the true codes, uncorrupted, over every sentence.
    model = tiny(4)
    val = ValRender(pred_docs, RendererConfig(**{**TINY, "code_noise": 0.5, "predicted_mix": 1.0}), 16)
    out = val.evaluate(model)
    data = val.data
    nats = -float(model.log_prob(data.codes, None, data.contexts, data.sentences).detach().sum())
    n_bytes = sum(len(s) for s in data.sentences)
    assert out["sentences"] == 100 and out["bytes"] == n_bytes
    assert out["render_bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert val.evaluate(model) == out  # deterministic
    assert "predicted_render_bits_per_byte" in out


# ---- training: codes must carry the sentence -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    train, val = code_docs(40, 8, seed=10), code_docs(6, 8, seed=11)
    runs = {}
    for name, extra in (("codes", []), ("codes_add", ["renderer.code_input=add"]), ("nocode", ["renderer.use_codes=false"])):
        run = tmp_path_factory.mktemp("renderer") / name
        summary = train_renderer(train, val, run, overrides=TINY_RUN + extra, max_steps=150, device="cpu",
                                 progress=False)
        runs[name] = (run, summary)
    return runs, val


def test_codes_lower_render_bits_far_below_the_no_code_ablation(trained):
    runs, _ = trained
    with_codes = runs["codes"][1]["final_eval"]["render_bits_per_byte"]
    without = runs["nocode"][1]["final_eval"]["render_bits_per_byte"]
    # Without codes each 8-byte sentence carries 6 unpredictable bits (0.75 bits per byte at best); with
    # them it is determined. Measured: 0.77 against 0.025 after 150 steps.
    assert without > 0.65
    assert with_codes < 0.15 and with_codes < 0.2 * without
    # the same with the codes added to every position instead of a prefix
    assert runs["codes_add"][1]["final_eval"]["render_bits_per_byte"] < 0.15


def test_loaded_renderer_scores_and_generates(trained):
    runs, val = trained
    run, summary = runs["codes"]
    model = load_renderer(run)
    again = ValRender(val, model.cfg, 16).evaluate(model)
    assert again["render_bits_per_byte"] == pytest.approx(summary["final_eval"]["render_bits_per_byte"], rel=1e-5)
    g = torch.Generator().manual_seed(0)
    doc = val[0]
    cands = model.generate(doc.codes[1], None, doc.sentences[0].encode(), max_bytes=20, temperature=1.0, generator=g, n=4)
    assert len(cands) == 4
    for text, lp in cands:
        assert math.isfinite(lp) and lp <= 0 and len(text) <= 20
        if len(text) < 20:  # it stopped at EOS, so its score is the sentence's log-prob, EOS included
            ref = float(model.log_prob([doc.codes[1]], None, [doc.sentences[0].encode()], [text]).detach()[0])
            assert lp == pytest.approx(ref, abs=1e-3)
    a, b = doc.codes[1]
    assert model.generate(doc.codes[1], None, b"", temperature=0)[0][0] == f"{WORDS[a]} {WORDS[b]}.".encode()


def test_interrupted_training_resumes_to_the_same_losses(tmp_path):
    import json

    train, val = code_docs(8, 4, seed=20), code_docs(2, 4, seed=21)
    run_args = dict(overrides=TINY_RUN + ["train.log_every=1", "train.final_eval=false"], max_steps=6, device="cpu",
                    progress=False)
    train_renderer(train, val, tmp_path / "full", **run_args)
    assert train_renderer(train, val, tmp_path / "cut", stop_at=3, **run_args)["status"] == "interrupted"
    with pytest.raises(SentcodeError, match="other documents"):
        train_renderer(code_docs(8, 4, seed=22), val, tmp_path / "cut", resume="auto", **run_args)
    train_renderer(train, val, tmp_path / "cut", resume="auto", **run_args)

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    cut, full = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert [s for s, _ in cut] == [s for s, _ in full] == list(range(1, 7))
    assert [v for _, v in cut] == pytest.approx([v for _, v in full], rel=1e-6)


def test_code_tables_start_from_the_centroids():
    """code_init centroids: equal centroids give equal table rows, the geometry is kept (a linear map of the
    centered centroids), the scale is the default one; wrong shapes are errors, and training through
    train_renderer without codebooks is refused."""
    m = tiny()
    rng = np.random.default_rng(0)
    books = [torch.from_numpy(rng.normal(size=(8, 5)).astype(np.float32)) for _ in range(2)]
    books[0][3] = books[0][1]
    m.init_code_embeddings(books)
    w0 = m.code_emb[0].weight.detach()
    assert torch.equal(w0[3], w0[1]) and not torch.equal(w0[2], w0[1])
    assert float(w0.std()) == pytest.approx(0.02, rel=1e-3)
    # rows are an affine image of the centroids: least squares on [centroid, 1] recovers them exactly
    X = torch.cat([books[1], torch.ones(8, 1)], 1)
    w1 = m.code_emb[1].weight.detach()
    fit = X @ torch.linalg.lstsq(X, w1).solution
    assert torch.allclose(fit, w1, atol=1e-6)
    with pytest.raises(SentcodeError, match="codebook 1 must have 8 rows"):
        m.init_code_embeddings([books[0], books[1][:4]])
    with pytest.raises(SentcodeError, match="expected 2 codebooks"):
        m.init_code_embeddings(books[:1])
    with pytest.raises(ConfigError, match="code_init"):
        RendererConfig(**{**TINY, "code_init": "pca"}).validate()


def test_centroid_init_needs_codebooks_and_trains(tmp_path):
    train, val = code_docs(10, 4, seed=1), code_docs(2, 4, seed=2)
    with pytest.raises(ConfigError, match="needs the RVQ codebooks"):
        train_renderer(train, val, tmp_path / "a", overrides=TINY_RUN + ["renderer.code_init=centroids"],
                       max_steps=2, device="cpu", progress=False)
    assert not (tmp_path / "a").exists()
    books = [torch.randn(8, 6) for _ in range(2)]
    s = train_renderer(train, val, tmp_path / "b", overrides=TINY_RUN + ["renderer.code_init=centroids"],
                       max_steps=3, device="cpu", progress=False, codebooks=books)
    assert s["status"] == "completed" and math.isfinite(s["final_eval"]["render_bits_per_byte"])
