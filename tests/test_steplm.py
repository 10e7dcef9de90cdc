"""The end-to-end sentence-step LM (family steplm): segments, causality, cache parity, evaluation, generation,
training through the shared loop, the CLI and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sentcode.corpus.segments import segment_document
from sentcode.data.segments import EOS, SegmentSplit, build_row, eval_windows, stack_rows
from sentcode.errors import SentcodeError
from sentcode.eval.steplm import evaluate_segments
from sentcode.infer.steplm import StepLMGenerator
from sentcode.models.sentence.steplm import StepLM, StepLMConfig, StepLMModelConfig, pool_segments, segment_floor

MICRO = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.n_kv_head=1", "model.d_plan=32",
         "model.plan_layers=1", "model.plan_heads=2", "model.plan_kv_heads=1", "model.enc_d_model=16",
         "model.enc_heads=2", "model.window=16", "model.max_segments=8", "model.max_segment_bytes=64",
         "train.seq_len=256", "train.micro_batch=2", "train.batch_tokens=512", "train.max_steps=6",
         "train.warmup_steps=2", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
         "train.final_eval=false", "train.precision=fp32"]

TEXT = ("The Congress met today. It passed three bills, one of them on roads!\n\nMr. Smith objected: the cost "
        "was $3.5 million. Nobody listened.  The session ended at noon. " * 3)


def micro_model(levels: int = 0, window: int = 16, max_segments: int = 8, pool: str = "mean") -> StepLM:
    torch.manual_seed(0)
    cfg = StepLMModelConfig(d_model=32, n_layer=2, n_head=2, n_kv_head=1, d_plan=32, plan_layers=1, plan_heads=2,
                            plan_kv_heads=1, enc_d_model=16, enc_heads=2, window=window, max_segments=max_segments,
                            max_segment_bytes=64, levels=levels, codebook_size=8, d_code=8, pool=pool)
    m = StepLM(cfg)
    for p in m.parameters():  # random, non-zero everywhere (the condition starts at zero in training)
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


def split_of(text: str, max_bytes: int = 64) -> SegmentSplit:
    segs = segment_document(text, max_bytes)
    starts = np.cumsum([0] + [len(s) for s in segs]).astype(np.int64)
    return SegmentSplit(np.frombuffer(b"".join(segs), dtype=np.uint8), starts, np.array([0, len(segs)]))


# ---- segments --------------------------------------------------------------------------------------------


def test_segments_are_lossless_and_bounded():
    text = TEXT + "caf\u00e9 \udc80 end"  # a surrogate-escaped byte too
    segs = segment_document(text, 32)
    assert b"".join(segs) == text.encode("utf-8", "surrogateescape")
    assert all(0 < len(s) <= 32 for s in segs)
    assert segs[0].startswith(b"The Congress met today. ") and segs[1].startswith(b"It passed")
    assert b"Mr. Smith objected" in b"".join(segs)  # an abbreviation does not end a segment
    assert not any(s == b"Smith objected: the cost was $3.5 million. " for s in segs)


def test_eval_windows_score_every_segment_once():
    split = split_of(TEXT)
    scored = []
    for segments, first in eval_windows(split, context=4):
        assert len(segments) <= 4
        scored.extend(segments[first:])
    assert b"".join(scored) == split.bytes.tobytes()


# ---- the model ----------------------------------------------------------------------------------------------


def _row(segs):
    x, y, seg = build_row(segs)
    return stack_rows([(x, y, seg)], "cpu")


@pytest.mark.parametrize("pool", ["mean", "attention"])
def test_planner_state_depends_on_completed_segments_only(pool):
    m = micro_model(pool=pool)
    segs = segment_document(TEXT, 64)[:6]
    changed = list(segs)
    changed[3] = b"Something else entirely was said here. "
    with torch.no_grad():
        states = []
        for s in (segs, changed):
            x, y, seg, n = _row(s)
            e, _ = m.encode_stream(x, seg, n)
            states.append(m.plan(e))
    a, b = states
    assert torch.equal(a[:, :4], b[:, :4])  # o_j for segments 0..3 reads segments < j only
    assert not torch.allclose(a[:, 4], b[:, 4])


def test_attention_pooling_starts_as_the_mean_and_stays_within_segments():
    m = micro_model(pool="attention")
    x, y, seg, n = _row(segment_document(TEXT, 64)[:5])
    with torch.no_grad():
        h = m.encoder(m.enc_embed(x))
        m.pool_query.zero_()  # a zero query weighs every position alike
        assert torch.allclose(m.encode_stream(x, seg, n)[1], pool_segments(h, seg, n), atol=1e-5)
        m.pool_query.normal_(0, 3.0)
        pooled = m.encode_stream(x, seg, n)[1]
        for j in range(n):  # each head's weights sum to one over its own segment's positions only
            inside = h[0, seg[0] == j]
            lo, hi = inside.min(0).values, inside.max(0).values
            assert bool(((pooled[0, j] >= lo - 1e-5) & (pooled[0, j] <= hi + 1e-5)).all())


@pytest.mark.parametrize("window", [16, 4])  # 4: the blocked local attention path (T > 2W)
def test_context_dropout_cuts_a_segment_off_from_earlier_bytes(window):
    m = micro_model(window=window)
    segs = segment_document(TEXT, 64)[:4]
    changed = segs[:1] + [b"Entirely other words were here. "] + segs[2:]
    cut = torch.tensor([[False, False, True, False]])
    with torch.no_grad():
        outs = []
        for s in (segs, changed):
            x, y, seg, n = _row(s)
            o = m.plan(m.encode_stream(x, seg, n)[0]) * 0  # no planner path: only bytes can carry segment 1
            cond = torch.gather(m.condition(o, None), 1, seg.clamp(min=0)[..., None].expand(-1, -1, 32))
            outs.append((m.render(x, cond, key_floor=segment_floor(seg, n, cut)), seg))
    (a, seg_a), (b, seg_b) = outs
    # segment 2 is cut off: it reads nothing of segment 1, although its window would reach it
    assert torch.allclose(a[seg_a == 2], b[seg_b == 2], atol=1e-5)
    x, _, seg = _row(segs)[:3]
    uncut = m.render(x, torch.zeros(1, x.shape[1], 32)).detach()
    assert not torch.allclose(uncut[seg == 2], a[seg_a == 2], atol=1e-5)  # the cut changes what segment 2 sees


def test_the_contrastive_term_needs_encodings_that_differ():
    cfg = StepLMModelConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_plan=32, plan_layers=1, plan_heads=2,
                            plan_kv_heads=1, enc_d_model=16, enc_heads=2, window=16, max_segments=8,
                            max_segment_bytes=64, predict_weight=0.5)
    torch.manual_seed(0)
    m = StepLM(cfg).train()
    valid = torch.ones(1, 6, dtype=torch.bool)
    o = torch.randn(1, 6, 32)
    with torch.no_grad():
        same = float(m.predict_loss(o, torch.ones(1, 6, 32), valid))  # every encoding alike: chance
        m.predict.weight.copy_(torch.eye(32))
        match = float(m.predict_loss(o, o.clone(), valid))  # each state names its own encoding
    assert same == pytest.approx(np.log(6), rel=1e-5) and match < 0.5
    x, y, seg, n = _row(segment_document(TEXT, 64)[:6])
    out = m(x, y, seg, n)
    out["predict"].backward()
    assert m.enc_embed.weight.grad.abs().sum() > 0  # the term trains the encoder
    assert float(m.eval()(x, y, seg, n)["predict"]) == 0.0  # training only: never part of the code length


def test_renderer_is_causal():
    m = micro_model()
    segs = segment_document(TEXT, 64)[:4]
    x, y, seg, n = _row(segs)
    x2 = x.clone()
    x2[0, 40] = (x2[0, 40] + 1) % 256
    with torch.no_grad():
        cond = torch.zeros(1, x.shape[1], 32)
        a, b = m.render(x, cond), m.render(x2, cond)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.allclose(a[:, 40:], b[:, 40:])


@pytest.mark.parametrize("levels", [0, 2])
def test_cached_generation_matches_the_full_forward(levels):
    """The generator's planner and renderer caches (renderer trimmed to a 16-position window, planner rebuilt
    when its 8-segment context fills) give the logits of a full forward over the same stream."""
    m = micro_model(levels)
    g = StepLMGenerator(m, StepLMConfig(model=m.cfg))
    segs = segment_document(TEXT, 64)[:6]  # 5 complete segments + one in progress
    with torch.no_grad():
        state, current = g._prime(segs)
        assert current == segs[-1]
        if levels:
            q = m.quantize(g._encode(state, current, written=False)[1])[0]
            g._set_cond(state, q)
        else:
            g._set_cond(state, None)
        last = g._feed(state, [256] + list(current[:10]))
        x, y, seg, n = _row(segs)
        e, pooled = m.encode_stream(x, seg, n)
        o = m.plan(e)
        q = m.quantize(pooled)[0] if levels else None
        cond = m.condition(o, q)
        logits = m.render(x, torch.gather(cond, 1, seg.clamp(min=0)[..., None].expand(-1, -1, 32)))
    pos = sum(len(s) + 1 for s in segs[:-1]) + 10
    assert torch.allclose(last, logits[:, pos], atol=1e-4)


def test_one_part_bits_equal_the_forward_loss():
    m = micro_model()
    split = split_of(TEXT)
    r = evaluate_segments(m, split, "cpu")
    assert r["bytes"] == split.bytes.size and r["codes"] is False
    # the whole text fits one window when the planner's context covers every segment
    m.cfg.max_segments = 64
    r64 = evaluate_segments(m, split, "cpu")
    x, y, seg, n = _row([split.segment(i) for i in range(split.n_segments)])
    with torch.no_grad():
        nats = float(m(x, y, seg, n)["render_nats"])
    assert r64["bpb"] == pytest.approx(nats / np.log(2) / split.bytes.size, rel=1e-5)


def test_two_part_report_has_its_parts():
    m = micro_model(levels=2)
    r = evaluate_segments(m, split_of(TEXT), "cpu")
    for key in ("plan_bpb", "render_bpb_oracle", "render_bpb_predicted", "render_bpb_shuffled", "render_bpb_none",
                "refund_ratio"):
        assert key in r
    assert r["bpb"] == pytest.approx(r["plan_bpb"] + r["render_bpb_oracle"], rel=1e-6)
    assert r["refund_ratio"] == pytest.approx((r["render_bpb_none"] - r["render_bpb_oracle"]) / r["plan_bpb"], rel=1e-6)


def test_blind_mode_cuts_the_planner_state_from_its_segment():
    m = micro_model()
    with torch.no_grad():  # make the renderer read its condition, so that shuffling it must cost bits
        m.cond.weight.normal_(0, 1.0)
    split = split_of(TEXT)
    r = evaluate_segments(m, split, "cpu", modes=("oracle", "blind"))
    assert r["render_bpb_blind"] != pytest.approx(r["bpb"], rel=1e-4)
    alone = evaluate_segments(m, split, "cpu", modes=("blind",))
    assert alone["bpb"] is None and alone["render_bpb_blind"] == pytest.approx(r["render_bpb_blind"], rel=1e-6)


@pytest.mark.parametrize("levels", [0, 2])
@pytest.mark.parametrize("eos_boost", [1.0, 4.0])
def test_batched_greedy_generation_matches_one_by_one(levels, eos_boost):
    m = micro_model(levels=levels)
    with torch.no_grad():  # a larger end-of-segment embedding makes segments end early as well as at full length
        m.embed.weight[EOS] *= eos_boost
    g = StepLMGenerator(m, StepLMConfig())
    prompts = ["We must act. Now", "The Congress met today. It passed", "Yes"]
    one = [g.generate(p, max_sentences=3, rerank=1, temperature=0) for p in prompts]
    assert g.generate_batch(prompts, max_sentences=3, rerank=1, temperature=0) == one
    sampled = g.generate_batch(prompts, max_sentences=2, rerank=1, temperature=0.9, seed=5)
    assert sampled == g.generate_batch(prompts, max_sentences=2, rerank=1, temperature=0.9, seed=5)
    assert len(sampled) == 3 and all(isinstance(t, str) for t in sampled)


def test_generation_reranks_with_codes_and_refuses_without():
    with_codes = StepLMGenerator(micro_model(levels=2), StepLMConfig())
    text = with_codes.generate("We must act. Now", max_sentences=2, rerank=3, seed=1, temperature=0.8)
    assert isinstance(text, str)
    assert with_codes.generate("We must act.", max_sentences=2, seed=3) == \
        with_codes.generate("We must act.", max_sentences=2, seed=3)
    no_codes = StepLMGenerator(micro_model(levels=0), StepLMConfig())
    with pytest.raises(SentcodeError, match="codes off"):
        no_codes.generate("We must act.", rerank=4)
    with pytest.raises(SentcodeError, match="empty"):
        no_codes.generate("   ")
    assert no_codes.default_rerank == 1 and with_codes.default_rerank == 4


# ---- training and the command line -----------------------------------------------------------------------


def test_training_resumes_bit_identically(tmp_path):
    from sentcode.train.steplm import train_steplm

    full = train_steplm("sample", tmp_path / "full", overrides=MICRO, progress=False, evaluate_test=False)
    assert full["status"] == "completed"
    part = train_steplm("sample", tmp_path / "part", overrides=MICRO, progress=False, stop_at=3, evaluate_test=False)
    assert part["status"] == "interrupted"
    rest = train_steplm("sample", tmp_path / "part", overrides=MICRO, progress=False, resume="auto",
                        evaluate_test=False)
    assert rest["step"] == 6
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_pipeline_eval_generate(tmp_path, capsys):
    from test_cli import assert_one_line_error, run_cli

    run = tmp_path / "run"
    sets = [x for o in MICRO + ["model.levels=2", "model.codebook_size=8"] for x in ("--set", o)]
    rc, out, err = run_cli(capsys, ["pipeline", "sentence", "--corpus", "sample", "--out", run, "--no-progress", *sets])
    assert rc == 0, err
    assert "two-part" in out and "refund ratio" in out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["family"] == "steplm" and ev["bytes"] > 0
    rc, out, _ = run_cli(capsys, ["eval", run, "--json"])
    assert rc == 0 and json.loads(out)["bpb"] == pytest.approx(ev["bpb"])
    rc, out, _ = run_cli(capsys, ["eval", run, "--split", "val"])
    assert rc == 0 and "bits per byte" in out
    rc, out, err = run_cli(capsys, ["generate", run, "--prompt", "We must", "--max-sentences", "2", "--seed", "0",
                                    "--stream"])
    assert rc == 0 and out.startswith("We must"), err
    rc, _, err = run_cli(capsys, ["generate", run, "--prompt", "We must", "--renderer", "nar"])
    assert_one_line_error(rc, err, "no NAR renderer")
    rc, _, err = run_cli(capsys, ["pipeline", "sentence", "--corpus", "sample", "--out", tmp_path / "x", "--from",
                                  "planner"])
    assert_one_line_error(rc, err, "--from and --until apply to the staged presets")
    rc, _, err = run_cli(capsys, ["pipeline", "sentence", "--corpus", "sample", "--out", tmp_path / "y", "--set",
                                  "model.window=0"])
    assert_one_line_error(rc, err, "model.window must be positive")
    rc, _, err = run_cli(capsys, ["pipeline", "sentence", "--corpus", "sample", "--out", run, *sets])
    assert_one_line_error(rc, err, "--resume auto")
