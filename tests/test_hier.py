"""The hierarchical byte autoencoder (family hier): causal segmenters, the compressor's gradient, a causal code
LM, padding never quantized, the autoencoder's figures, encode/decode, the lm-eval leak of the seed, the CLI
and its errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sentcode.corpus.cutters import Segmenter, mean_length
from sentcode.data.segments import build_row, stack_rows
from sentcode.errors import ConfigError, SentcodeError
from sentcode.models.sentence.steplm import StepLM, StepLMModelConfig

TEXT = ("The Congress met today. It passed three bills, one of them on roads!\n\nMr. Smith objected: the cost "
        "was $3.5 million. Nobody listened.  The session ended at noon. Café prices rose by 4%. " * 4)
VQ = ["model.quantizer=vq", "model.levels=1", "model.vq_norm=running"]
MICRO = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.n_kv_head=1", "model.d_plan=32",
         "model.plan_layers=1", "model.plan_heads=2", "model.plan_kv_heads=1", "model.enc_d_model=16",
         "model.enc_heads=2", "model.window=16", "model.max_segments=32", "model.max_segment_bytes=16",
         "model.codebook_size=16", "model.d_code=8", "train.seq_len=128", "train.micro_batch=2",
         "train.batch_tokens=256", "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=0",
         "train.save_every=0", "train.log_every=1", "train.final_eval=false", "train.precision=fp32",
         "data.upper_stride=0",  # one level; UPPER below adds the second
         *VQ]  # the preset's own FSQ codes: test_batch_standardised_codes_are_calibrated_on_the_final_weights


def fitted(kind: str, mode: str = "global", target: float = 6.0) -> Segmenter:
    return Segmenter(kind, target, mode, max_bytes=16).fit([TEXT] * 3)


SEGMENTERS = [("space", "global"), ("stride", "global"), ("entropy", "global"), ("entropy", "relative")]


# ---- segmenters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,mode", SEGMENTERS)
def test_a_boundary_depends_on_bytes_seen_so_far_only(kind, mode):
    seg = fitted(kind, mode)
    data = np.frombuffer(TEXT.encode(), dtype=np.uint8)
    ends = seg.ends(data)
    rng = np.random.default_rng(0)
    for t in range(0, len(data) - 1, 7):
        changed = data.copy()
        changed[t + 1:] = rng.integers(0, 256, len(data) - t - 1)
        assert np.array_equal(seg.ends(changed)[:t + 1], ends[:t + 1]), t
    # and through the whole cut (the byte cap included): a prefix's segments are the text's, but for the last
    cut = seg.cut(TEXT)
    for n in (1, 10, 57, 200):
        head = seg.cut(TEXT.encode()[:n])
        assert head[:-1] == cut[:len(head) - 1]


@pytest.mark.parametrize("kind,mode", SEGMENTERS + [("sentence", "global")])
def test_cuts_are_lossless_and_bounded(kind, mode):
    seg = fitted(kind, mode)
    parts = seg.cut(TEXT)
    assert b"".join(parts) == TEXT.encode() and all(1 <= len(p) <= 16 for p in parts)
    assert seg.cut("") == [] and seg.cut("a") == [b"a"]


def test_space_segments_are_words_with_what_follows():
    assert Segmenter("space").cut("We met, then left.") == [b"We ", b"met,", b" then ", b"left."]


@pytest.mark.parametrize("mode", ["global", "relative"])
def test_the_entropy_threshold_reaches_its_target(mode):
    for target in (3.0, 6.0):
        seg = fitted("entropy", mode, target)
        assert mean_length(seg, [TEXT]) == pytest.approx(target, rel=0.25)


def test_a_target_that_cannot_be_reached_is_refused():
    with pytest.raises(ConfigError, match="cannot be reached"):
        Segmenter("stride", target=0.5)
    with pytest.raises(ConfigError, match="cannot be reached"):
        Segmenter("entropy", target=40, max_bytes=16)
    with pytest.raises(ConfigError, match="cannot reach a mean segment length"):
        Segmenter("entropy", target=6, max_bytes=16).fit(["a" * 400])  # one context: one entropy everywhere


def test_the_segmenter_round_trips_through_the_run_directory(tmp_path):
    seg = fitted("entropy", "relative")
    seg.save(tmp_path)
    back = Segmenter.load(tmp_path)
    assert back.cut(TEXT) == seg.cut(TEXT) and back.threshold == seg.threshold


# ---- the model -----------------------------------------------------------------------------------------------


def micro(levels: int = 1, context_dropout: float = 1.0) -> StepLM:
    torch.manual_seed(0)
    cfg = StepLMModelConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_plan=32, plan_layers=1, plan_heads=2,
                            plan_kv_heads=1, enc_d_model=16, enc_heads=2, window=16, max_segments=32,
                            max_segment_bytes=16, levels=levels, codebook_size=16, d_code=8, pool="attention",
                            cond_init="normal", context_dropout=context_dropout)
    return StepLM(cfg)


def batch_of(*texts, seg=None):
    seg = seg or Segmenter("space", max_bytes=16)
    return stack_rows([build_row(seg.cut(t)) for t in texts], "cpu")


def test_the_reconstruction_loss_trains_the_compressor_through_the_quantizer():
    m = micro().train()
    x, y, seg, n = batch_of(TEXT[:120], TEXT[40:150])
    m(x, y, seg, n)  # the first batch initialises the codebook
    m.zero_grad()
    m(x, y, seg, n)["render_nats"].backward()
    for name in ("to_code.weight", "pool_query", "enc_embed.weight"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_the_code_lm_is_causal():
    m = micro().eval()
    a = "We met. Then we left the hall quickly."
    b = "We met. Then we sold the farm for less."
    xa, ya, sa, na = batch_of(a)
    xb, yb, sb, nb = batch_of(b)
    same = len(Segmenter("space").cut("We met. Then we "))  # segments shared by both texts
    with torch.no_grad():
        ea, pa = m.encode_stream(xa, sa, na)
        eb, pb = m.encode_stream(xb, sb, nb)
        oa, ob = m.plan(ea), m.plan(eb)
        qa, ca, _ = m.quantize(pa)
        qb, cb, _ = m.quantize(pb)
        la, lb = m.code_logits(oa, ca)[0], m.code_logits(ob, cb)[0]
    # the prediction for segment j reads segments < j: equal up to and including the first one that differs
    assert torch.allclose(la[:, :same + 1], lb[:, :same + 1], atol=1e-6)
    assert not torch.allclose(la[:, same + 1:same + 3], lb[:, same + 1:same + 3])
    assert torch.equal(ca[:, :same], cb[:, :same])  # a segment's codes read its bytes and earlier ones only


def test_padding_is_never_quantized_or_counted():
    m = micro().train()
    seen = []
    forward = m.rvq.forward
    m.rvq.forward = lambda z: (seen.append(z.shape[0]), forward(z))[1]
    x, y, seg, n = batch_of(TEXT[:30], TEXT[:150])  # rows of very different segment counts
    out = m(x, y, seg, n, details=True)
    real = sum(len(Segmenter("space", max_bytes=16).cut(t)) for t in (TEXT[:30], TEXT[:150]))
    assert seen == [real] and n * 2 > real
    assert float(m.rvq.books[0].cluster_size.sum()) == pytest.approx(real, rel=1e-4)
    assert out["codes"][0, real - n:].eq(0).all()  # the empty slots of the short row


def test_quantizer_statistics_stay_float32_under_bf16_autocast():
    m = micro().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(*batch_of(TEXT[:100]))
        before = m.rvq.mean.clone()
        m(*batch_of(TEXT[100:260]))
    assert m.rvq.mean.dtype == torch.float32 and m.rvq.books[0].cluster_size.dtype == torch.float32
    assert not torch.equal(before, m.rvq.mean)  # the running statistics follow the data


def test_a_segment_written_from_its_own_bytes_sees_no_earlier_byte():
    m = micro(levels=0).eval()
    xa, ya, sa, na = batch_of("We met. Then we left.")
    xb, yb, sb, nb = batch_of("Oh met. Then we left.")
    # the planner state differs (earlier segments differ), so fix it: compare the renderer alone
    cond = torch.zeros(1, xa.shape[1], 32)
    from sentcode.models.sentence.steplm import segment_floor

    floor_a = segment_floor(sa, na, torch.ones(1, na, dtype=torch.bool))
    la = m.render(xa, cond, key_floor=floor_a)
    lb = m.render(xb, cond, key_floor=segment_floor(sb, nb, torch.ones(1, nb, dtype=torch.bool)))
    first = int((sa[0] == 0).sum())
    assert torch.allclose(la[:, first:], lb[:, first:], atol=1e-5)


# ---- a trained micro run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from sentcode.train.hier import train_hier

    out = tmp_path_factory.mktemp("hier") / "run"
    s = train_hier("sample", out, overrides=MICRO, progress=False)
    assert s["status"] == "completed"
    return out


def test_eval_reports_bits_and_the_autoencoder_figures(run):
    ev = json.loads((run / "eval.json").read_text())
    assert ev["family"] == "hier" and ev["codes"] and ev["bpb"] > 0
    assert ev["bits"] == pytest.approx(ev["bpb"] * ev["bytes"])
    assert 0 <= ev["byte_accuracy"] <= 1 and 0 <= ev["segments_exact"] <= 1
    assert ev["bytes_per_code"] == pytest.approx(ev["bytes_per_segment"])  # one level: one code per segment
    assert 0 < ev["codebooks"][0]["usage"] <= 1 and ev["codebooks"][0]["perplexity"] >= 1


def test_the_plan_route_shows_segments_and_codes_per_level(run):
    """The playground's plan view of an autoencoder: each step's planned and written codes, and the whole text's
    segments with their codes."""
    pytest.importorskip("fastapi")
    from test_serve import call

    from sentcode.serve.config import ServeConfig
    from sentcode.serve.server import BackgroundServer

    with BackgroundServer(run, ServeConfig(port=0)) as server:
        status, r, _ = call(server, "/v1/plan", {"prompt": "The state of the Union", "max_tokens": 4, "seed": 1})
        assert status == 200 and r["family"] == "hier" and 1 <= len(r["segments"]) <= 4
        assert r["text"] == "The state of the Union" + "".join(s["text"] for s in r["segments"])
        levels = r["levels"]
        assert sum(levels["segments"]) == len(r["text"].encode()) and len(levels["codes"]) == len(levels["segments"])
        assert all(len(s["planned"]) == len(s["written"]) == levels["levels"] for s in r["segments"])


def test_with_code_dropout_the_better_of_two_exact_codes_is_reported(run):
    import sentcode
    from sentcode.eval.hier import evaluate_hier

    g = sentcode.load(run)
    split = g.split_arrays(TEXT)
    g.model.cfg.code_dropout = 0.0
    two = evaluate_hier(g.model, split, "cpu")
    assert "onepart_bpb" not in two and two["bpb"] == two["twopart_bpb"]
    g.model.cfg.code_dropout = 0.5  # the expander was trained without codes for half the segments
    both = evaluate_hier(g.model, split, "cpu")
    assert both["onepart_bpb"] == pytest.approx(both["render_bpb_none"])
    assert both["bpb"] == pytest.approx(min(both["onepart_bpb"], both["twopart_bpb"]))
    assert both["bits"] == pytest.approx(both["bpb"] * both["bytes"])


def test_teacher_forced_exactness_is_what_greedy_decoding_gives(run):
    import sentcode
    from sentcode.eval.hier import evaluate_hier

    g = sentcode.load(run)
    text = "We met. Then"
    codes = g.encode(text)["codes"]
    decoded = g.decode(codes)
    fig = evaluate_hier(g.model, g.split_arrays(text), "cpu")
    assert (fig["documents_exact"] == 1.0) == (decoded == text)
    # each decoded segment, re-encoded, is what the expander wrote from its code: decode is deterministic
    assert g.decode(codes) == decoded


def test_loglikelihood_counts_the_continuations_codes_and_reads_the_contexts_only(run):
    import sentcode
    from sentcode.infer.scoring import loglikelihood

    g = sentcode.load(run)
    ctx, cont = "The Congress met today. It ", "passed three bills."
    ll, greedy = loglikelihood(g, ctx, cont)
    full, head = g.score_details(ctx + cont), g.score_details(ctx)
    assert ll == pytest.approx(-(full["bits"] - head["bits"]) * math.log(2), rel=1e-5) and not greedy
    # the code bits are charged: a reconstruction score (render bits given true codes) would be far higher
    assert full["plan_bpb"] > 0 and full["bits"] > full["render_bpb_oracle"] * full["bytes"]
    # the context's codes do not read the continuation
    n = len(g.segments(ctx)) - 1  # the context's last segment may grow with the continuation
    assert g.encode(ctx + cont)["codes"][:n] == g.encode(ctx)["codes"][:n]


def test_generate_and_load_work_for_the_family(run):
    import sentcode

    g = sentcode.load(run)
    assert g.family == "hier"
    text = g.generate("The Congress ", max_sentences=5, seed=0, temperature=0.8)
    assert isinstance(text, str)
    assert list(g.stream("The Congress ", max_sentences=3, seed=0, temperature=0.0)) == \
        list(g.stream("The Congress ", max_sentences=3, seed=1, temperature=0.0))
    assert g.generate_batch(["We ", "The "], max_sentences=2, temperature=0.0) == \
        [g.generate(p, max_sentences=2, temperature=0.0) for p in ("We ", "The ")]


def test_decode_refuses_bad_codes(run):
    import sentcode

    g = sentcode.load(run)
    with pytest.raises(SentcodeError, match="codes are integers from 0 to 15"):
        g.decode([[16]])
    with pytest.raises(SentcodeError, match="this run has 1 code levels"):
        g.decode([[1, 2]])
    with pytest.raises(SentcodeError, match="non-empty list"):
        g.decode([])
    with pytest.raises(SentcodeError, match="cannot encode empty text"):
        g.encode("")
    assert len(g.encode("a")["codes"]) == 1  # a one-byte document is one segment


def test_cli_encode_decode_eval_and_errors(run, tmp_path, capsys):
    from test_cli import assert_one_line_error, run_cli

    src = tmp_path / "in.txt"
    src.write_text("The Congress met today.")
    codes = tmp_path / "codes.json"
    rc, _, err = run_cli(capsys, ["hier", "encode", run, "--text-file", src, "--out", codes, "--check"])
    assert rc == 0 and "bytes per code" in err and "round trip" in err, err
    rc, out, err = run_cli(capsys, ["hier", "decode", run, "--codes", codes])
    assert rc == 0, err
    rc, out, _ = run_cli(capsys, ["eval", run])
    assert rc == 0 and "reconstruction from true codes" in out and "codebooks" in out
    rc, out, _ = run_cli(capsys, ["eval", run, "--text-file", src, "--json"])
    assert rc == 0 and json.loads(out)["source"] == str(src)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"levels": 1, "codes": [[99]]}))
    rc, _, err = run_cli(capsys, ["hier", "decode", run, "--codes", bad])
    assert_one_line_error(rc, err, "codes are integers from 0 to 15")
    bad.write_text(json.dumps({"levels": 2, "codes": [[1, 2]]}))
    rc, _, err = run_cli(capsys, ["hier", "decode", run, "--codes", bad])
    assert_one_line_error(rc, err, "holds codes of 2 levels; this run has 1")
    bad.write_text("not json")
    rc, _, err = run_cli(capsys, ["hier", "decode", run, "--codes", bad])
    assert_one_line_error(rc, err, "cannot read codes")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = run_cli(capsys, ["hier", "encode", run, "--text-file", empty])
    assert rc != 0 and err.count("\n") == 1
    rc, _, err = run_cli(capsys, ["pipeline", "hier", "--corpus", "sample", "--out", tmp_path / "x", "--preset",
                                  "sentence-tiny"])
    assert_one_line_error(rc, err, "sentence-step LM config; train it with `sentcode pipeline sentence")
    rc, _, err = run_cli(capsys, ["pipeline", "sentence", "--corpus", "sample", "--out", tmp_path / "y", "--preset",
                                  "hier-tiny"])
    assert_one_line_error(rc, err, "hierarchical byte autoencoder config; train it with `sentcode pipeline hier")
    rc, _, err = run_cli(capsys, ["pipeline", "hier", "--corpus", "sample", "--out", tmp_path / "z", "--set",
                                  "data.segmenter=entropy", "--set", "data.segment_bytes=100"])
    assert_one_line_error(rc, err, "cannot be reached")


def test_a_run_of_another_family_is_refused(run, tmp_path, capsys):
    from test_cli import run_cli

    from sentcode.infer.steplm import load_steplm

    with pytest.raises(SentcodeError):
        load_steplm(run)
    src = tmp_path / "in.txt"
    src.write_text("Hello there.")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "config.yaml").write_text("family: steplm\n")
    rc, _, err = run_cli(capsys, ["hier", "encode", flat, "--text-file", src])
    assert rc != 0 and err.count("\n") == 1


def test_the_server_and_the_chat_serve_the_family(run):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import io

    import sentcode
    from test_serve import call

    from sentcode.serve.chat import Chat
    from sentcode.serve.config import ServeConfig
    from sentcode.serve.server import BackgroundServer

    g = sentcode.load(run)
    with BackgroundServer(g, ServeConfig(port=0, max_queue=2)) as server:
        status, r, _ = call(server, "/v1/completions", {"prompt": "The Congress ", "max_tokens": 4, "temperature": 0})
        assert status == 200, r
        want = list(g.stream("The Congress ", max_sentences=4, temperature=0.0))
        assert r["choices"][0]["text"] == "".join(want) and r["usage"]["completion_tokens"] == len(want)
        status, r, _ = call(server, "/v1/completions", {"prompt": "The", "max_tokens": 100_000})
        assert status == 400 and "segments" in r["error"]["message"]
    out = io.StringIO()
    chat = Chat(g, temperature=0.0, max_len=3, out=out)
    assert chat.unit == "segments"


def test_the_chat_command_starts_and_answers(run):
    """Guards the chat's banner, which asked a sentence-step or autoencoder generator for a planner config it
    does not have (a traceback before the first prompt)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sentcode.cli", "chat", str(run), "--max", "2", "--temperature", "0"],
                       input="The Congress met.\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "hierarchical byte autoencoder, 31 segments of history" in r.stdout and "Traceback" not in r.stderr


def test_the_training_log_has_the_loss_terms_and_codebook_health(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "loss_render" in r]
    assert step and {"loss_plan", "loss_commit", "code_used_l1", "code_perplexity_l1"} <= set(step[-1])
    assert step[-1]["loss_render"] > 0 and step[-1]["code_perplexity_l1"] >= 1


def test_lm_eval_scores_the_family(run):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'sentcode[lmeval]')")
    import sentcode
    import sentcode.lmeval.model  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from test_lmeval import check_against_scoring

    from sentcode.lmeval import TASKS_DIR

    out = simple_evaluate(model="sentcode", model_args=f"run={run}", tasks=["sentcode_sotu"],
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                          device="cpu", log_samples=True)
    assert out["config"]["sentcode_family"] == "hier"
    check_against_scoring(sentcode.load(run), out["results"], out["samples"])


# ---- a second level ------------------------------------------------------------------------------------------

UPPER = ["data.upper_stride=4", "upper.d_model=32", "upper.n_layer=1", "upper.n_head=2", "upper.n_kv_head=1",
         "upper.d_plan=32", "upper.plan_layers=1", "upper.plan_heads=2", "upper.plan_kv_heads=1",
         "upper.enc_d_model=16", "upper.enc_heads=2", "upper.window=16", "upper.max_segments=16",
         "upper.codebook_size=16", "upper.d_code=8"]


def test_level1_codes_become_level2_segments_within_documents():
    from sentcode.data.segments import SegmentSplit
    from sentcode.models.hier import code_split

    split = SegmentSplit(np.zeros(10, np.uint8), np.arange(11), np.array([0, 6, 6, 10]))  # docs of 6, 0, 4 segments
    codes = np.arange(10) * 3
    up = code_split(split, codes, 4)
    assert up.n_docs == 3 and [len(up.segment(i)) for i in range(up.n_segments)] == [4, 2, 4]
    assert np.concatenate([up.segment(i) for i in range(up.n_segments)]).tolist() == codes.tolist()


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    from sentcode.train.hier import train_hier

    out = tmp_path_factory.mktemp("hier2") / "run"
    s = train_hier("sample", out, overrides=MICRO + UPPER, progress=False)
    assert s["status"] == "completed" and s["upper"]["status"] == "completed"
    return out


def test_two_levels_train_score_and_count_every_part(run2):
    ev = json.loads((run2 / "eval.json").read_text())
    u = ev["level2"]
    assert u["level1_codes_per_segment"] == pytest.approx(4, rel=0.2) and u["bytes_per_code"] > ev["bytes_per_code"]
    assert 0 <= u["code_accuracy"] <= 1 and u["codebooks"][0]["perplexity"] >= 1
    # the two-level code: level 1's expander bits given its codes + level 2's bits for those codes
    assert ev["two_level_bpb"] > ev["render_bpb_oracle"]
    assert ev["bpb"] == pytest.approx(min(ev["two_level_bpb"], ev["one_level_bpb"]))


def test_batched_level1_codes_are_the_ones_encode_gives(run2):
    import sentcode
    from sentcode.models.hier import level1_codes

    g = sentcode.load(run2)
    text = TEXT[:300]
    assert level1_codes(g.model, g.split_arrays(text), "cpu").tolist() == [c[0] for c in g.encode(text)["codes"]]


def test_level2_codes_decode_through_level1(run2):
    import sentcode

    g = sentcode.load(run2)
    render = g.upper.render
    eos = g.upper.model.cfg.symbols + 1

    def no_early_end(*a, **k):  # the micro model ends segments at once; make it write each one in full
        logits = render(*a, **k)
        logits[..., eos - 1:] = -1e4  # BOS, EOS and PAD: each would end the segment
        return logits

    g.upper.render = no_early_end
    enc = g.encode("The Congress met today. It passed three bills.")
    top = enc["level2"]["codes"]
    assert sum(enc["level2"]["segments"]) == len(enc["codes"]) and len(top) == -(-len(enc["codes"]) // 4)
    stream = [int(c) for seg in g.upper.decode_segments(g.upper.check_codes(top)) for c in seg]
    assert len(stream) == 4 * len(top)
    assert g.decode(top, level=2) == g.decode([[c] for c in stream])
    with pytest.raises(SentcodeError, match="codes are integers from 0 to 15"):
        g.decode([[99]], level=2)
    with pytest.raises(SentcodeError, match="level must be 1 or 2"):
        g.decode(top, level=3)


def test_cli_round_trips_both_levels(run2, run, tmp_path, capsys):
    from test_cli import assert_one_line_error, run_cli

    src = tmp_path / "in.txt"
    src.write_text("The Congress met today.")
    codes = tmp_path / "codes.json"
    rc, _, err = run_cli(capsys, ["hier", "encode", run2, "--text-file", src, "--out", codes, "--check"])
    assert rc == 0 and "level 2:" in err and "round trip from level-2 codes" in err, err
    rc, out, err = run_cli(capsys, ["hier", "decode", run2, "--codes", codes])
    assert rc == 0, err
    rc, out, _ = run_cli(capsys, ["eval", run2])
    assert rc == 0 and "two levels:" in out
    rc, _, err = run_cli(capsys, ["hier", "decode", run, "--codes", codes])  # a one-level run
    assert_one_line_error(rc, err, "one level")


def test_cli_generate_writes_segments(run, capsys):
    from test_cli import run_cli

    rc, out, err = run_cli(capsys, ["generate", run, "--prompt", "The Congress", "--seed", "0", "--temperature", "0"])
    assert rc == 0 and out.startswith("The Congress"), err
    import sentcode

    want = sentcode.load(run).generate("The Congress", max_sentences=40, temperature=0.0)
    assert out == "The Congress" + want + "\n"


def test_batch_standardisation_spreads_a_drifting_batch_over_codes():
    from sentcode.nn.rvq import ResidualVQ

    torch.manual_seed(0)
    first = torch.randn(256, 8) * 0.01 + 5.0
    for norm in ("running", "batch"):
        vq = ResidualVQ(8, 1, 16, normalize=norm).train()
        vq(first)  # statistics and codebook from the first batch
        drifted = torch.randn(256, 8) * 0.01 + 5.5  # the mean moved 50 spreads away; the spread stayed
        _, codes, _ = vq(drifted)
        used = len(codes.unique())
        assert (used == 1) if norm == "running" else (used > 4), (norm, used)
        assert vq.mean.dtype == torch.float32 and vq.mean[0] > 5.0  # running statistics follow in both modes


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_batch_standardised_codes_are_calibrated_on_the_final_weights(tmp_path, quantizer):
    # the lagging running statistics sent every scored segment to one code; with vq_norm batch, the run ends
    # by recomputing them from the exported weights' own inputs
    from sentcode.data.segments import RowSource, SegmentSplit
    from sentcode.models.sentence.steplm import WEIGHTS, StepLM
    from sentcode.runs.weights import load_weights
    from sentcode.train.hier import train_hier
    from sentcode.train.steplm import CALIBRATION_BATCHES, load_steplm_config
    from sentcode.models.hier import HierConfig

    # fsq: the preset's own quantizer settings (8 coordinates of 4 values, batch statistics) at micro sizes
    sets = (MICRO + ["model.vq_norm=batch"] if quantizer == "vq" else MICRO[:-len(VQ)] + ["model.codebook_size=4"])
    sets = sets + ["train.seed=3"]
    out = tmp_path / "run"
    assert train_hier("sample", out, overrides=sets, progress=False, evaluate_test=False)["status"] == "completed"
    cfg = load_steplm_config("hier-tiny", sets + ["data.corpus=sample"], HierConfig)
    m = load_weights(StepLM(cfg.model), out, WEIGHTS)
    t = cfg.train
    cal = RowSource(SegmentSplit.load(out / "data" / "train.npz"), t.seq_len, t.micro_batch, cfg.model.max_segments,
                    t.seed + 1, "cpu")
    saved = m.quant.mean.clone()
    n = m.calibrate_codes([cal.next_batch() for _ in range(CALIBRATION_BATCHES)])
    assert n > 1
    assert torch.allclose(m.quant.mean, saved, atol=1e-5)  # what the run exported is what its final weights give
    if quantizer == "fsq":  # the preset's codes: 8 coordinates of 4 values per segment, and back to text
        import sentcode

        g = sentcode.load(out)
        enc = g.encode(TEXT[:200])
        assert enc["levels"] == 8 and all(len(t) == 8 and all(0 <= v < 4 for v in t) for t in enc["codes"])
        assert enc["bytes_per_code"] == pytest.approx(enc["bytes"] / len(enc["codes"]))  # a tuple is one code
        assert isinstance(g.decode(enc["codes"][:3]), str)


def test_set_statistics_needs_a_standardising_quantizer():
    from sentcode.nn.fsq import FSQ
    from sentcode.nn.rvq import ResidualVQ

    x = torch.randn(64, 4) * 0.01 + 3.0
    for q in (FSQ(4, 5, normalize="batch"), ResidualVQ(4, 1, 8, normalize="batch")):
        q.set_statistics(x)
        assert torch.allclose(q.mean, x.mean(0)) and bool(q.norm_ready)
    for q in (FSQ(4, 5), ResidualVQ(4, 1, 8)):
        with pytest.raises(ValueError, match="statistics"):
            q.set_statistics(x)
