"""The sentence-step pipeline end to end on the sample corpus, with micro models (tens of steps per stage):
stage caching, --from, the generator facade, the two-part evaluation, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sentcode
from sentcode.cli import main
from sentcode.errors import ConfigError, SentcodeError
from sentcode.pipeline import run_pipeline
from sentcode.runs.staged_config import STAGES
from sentcode.runs.staged_store import read_codes, read_sentences, stage_dir

from conftest import MICRO

torch.set_num_threads(1)

ACTIVE = [s for s in STAGES if s != "renderer-nar"]
PROMPT = "The state of the Union is strong. We must keep it so."


def run(out, **kw):
    return run_pipeline("sample", out, preset="staged-tiny", overrides=MICRO, progress=False, **kw)


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def stamps(run_dir: Path) -> dict:
    return {s: (stage_dir(run_dir, s) / "stage.json").stat().st_mtime_ns for s in ACTIVE}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    return out, run(out)


@pytest.fixture
def copy(pipe, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(pipe[0], dst)
    return dst


def test_pipeline_runs_every_stage(pipe):
    out, result = pipe
    assert result["ran"] == ACTIVE and result["skipped"] == []
    for s in ACTIVE:
        rec = json.loads((stage_dir(out, s) / "stage.json").read_text())
        assert rec["stage"] == s and rec["seconds"] >= 0 and len(rec["input_hash"]) == 64
        assert {"config", "seed", "versions", "output_hash", "output"} <= set(rec)
    stats = json.loads((stage_dir(out, "sentences") / "stats.json").read_text())
    assert stats["train"]["split_long"] > 0  # max_bytes 64 cuts many sentences
    codes = read_codes(out, "test")
    assert codes.shape == (sum(map(len, read_sentences(out, "test"))), 2)
    assert (stage_dir(out, "rvq") / "report.json").is_file() and (stage_dir(out, "rvq") / "rvq.safetensors").is_file()
    assert np.load(stage_dir(out, "embed") / "train.npy", mmap_mode="r").shape[1] == 16


def test_rerun_skips_everything(copy):
    before = stamps(copy)
    again = run(copy)
    assert again["ran"] == [] and again["skipped"] == ACTIVE
    assert stamps(copy) == before
    assert "bpb" in again["eval"]


def test_from_planner_redoes_planner_and_later_only(copy):
    before = stamps(copy)
    r = run(copy, from_stage="planner")
    assert r["ran"] == ["planner", "renderer", "renderer-nocode", "eval"]
    assert r["skipped"] == ["corpus", "sentences", "encoder", "embed", "rvq"]
    after = stamps(copy)
    assert all(after[s] == before[s] for s in r["skipped"])
    assert all(after[s] != before[s] for s in r["ran"])


def test_config_change_redoes_only_dependent_stages(copy):
    out = run_pipeline("sample", copy, preset="staged-tiny", overrides=MICRO + ["rvq.iters=2"], progress=False)
    # The no-code renderer reads sentences only, so a new quantizer leaves it alone.
    assert out["ran"] == ["rvq", "planner", "renderer", "eval"]
    assert "renderer-nocode" in out["skipped"]


def test_generate_and_stream(pipe):
    g = sentcode.load(pipe[0])
    assert g.family == "sentence"
    pieces = list(g.stream(PROMPT, max_sentences=3, rerank=2, seed=0))
    assert 1 <= len(pieces) <= 3 and all(isinstance(p, str) and p.strip() for p in pieces)
    text = g.generate(PROMPT, max_sentences=3, rerank=2, seed=0)
    assert text == " ".join(pieces)  # same seed, same sentences
    one = g.generate(PROMPT, max_sentences=1, rerank=0, seed=1, temperature=0.0)
    assert isinstance(one, str)
    # No sentence boundary: the whole prompt is one sentence; a prompt longer than the planner's context
    # (16 steps) keeps its most recent sentences.
    assert isinstance(g.generate("a prompt with no full stop", max_sentences=1, seed=0), str)
    long_prompt = " ".join(f"Sentence number {i} is here." for i in range(40))
    assert isinstance(g.generate(long_prompt, max_sentences=1, seed=0), str)


def test_generate_batch_matches_one_at_a_time(pipe):
    """Greedy, so each document's sentences do not depend on the draws of the others: a batch of documents
    (two sharing history and context lengths, one on its own) gives what each gives alone."""
    g = sentcode.load(pipe[0])
    prompts = [PROMPT, "The budget is balanced. Our army is ready.", "Short one."]
    batch = g.generate_batch(prompts, max_sentences=2, rerank=2, temperature=0.0)
    assert batch == [g.generate(p, max_sentences=2, rerank=2, temperature=0.0) for p in prompts]
    with pytest.raises(SentcodeError, match="non-empty"):
        g.generate_batch([])
    with pytest.raises(SentcodeError, match="empty"):
        g.generate_batch([PROMPT, ""])


def test_planner_batch_sampling_matches_single_rows(pipe):
    g = sentcode.load(pipe[0])
    hist = torch.from_numpy(np.random.default_rng(0).integers(0, 16, size=(3, 5, 2)))
    codes, _, lp = g.planner.sample_next_batch(hist, temperature=0.0)
    for b in range(3):
        one, _, one_lp = g.planner.sample_next(hist[b : b + 1], temperature=0.0)
        assert one.tolist() == codes[b].tolist() and one_lp == pytest.approx(float(lp[b]), abs=1e-5)


def test_nar_renderer_choice_needs_the_stage(pipe):
    with pytest.raises(SentcodeError, match="no NAR renderer"):
        sentcode.load(pipe[0], renderer="nar")
    with pytest.raises(SentcodeError, match="'ar' or 'nar'"):
        sentcode.load(pipe[0], renderer="fast")


def test_generation_with_a_nar_renderer(pipe):
    """The closed loop with the NAR renderer writing (an untrained one: the loop, not its quality): every
    candidate is scored by the NAR model's own log-prob, batch and single generation agree when greedy."""
    from sentcode.infer.sentence import SentenceGenerator
    from sentcode.models.sentence.renderer_nar import NARRenderer, NARRendererConfig

    g = sentcode.load(pipe[0])
    torch.manual_seed(0)
    nar = NARRenderer(NARRendererConfig(levels=2, codebook_sizes=[16, 16], context_bytes=8, max_bytes=24,
                                        d_model=32, n_layer=1, n_head=2)).eval()
    gn = SentenceGenerator(g.run_dir, g.cfg, g.encoder, g.rvq, g.planner, g.renderer, g.nocode, nar, "nar")
    step = gn.step(np.zeros((1, 2), np.int64), b"Our Union.", 3, 1.0, torch.Generator().manual_seed(0))
    for c in step.candidates:
        with torch.no_grad():
            lp = float(nar.log_prob(step.planned[None], None, [c.data], [b"Our Union."])[0])
        assert len(c.data) <= 24 and c.logprob == pytest.approx(lp, abs=1e-4)
    prompts = [PROMPT, "Short one."]
    assert gn.generate_batch(prompts, max_sentences=2, rerank=2, temperature=0.0) == \
        [gn.generate(p, max_sentences=2, rerank=2, temperature=0.0) for p in prompts]
    with pytest.raises(SentcodeError, match="top-k"):
        gn.generate(PROMPT, max_sentences=1, top_k=5)


def test_rerank_prefers_agreement_then_logprob(pipe):
    g = sentcode.load(pipe[0])
    step = g.step(np.zeros((0, 2), np.int64), b"", 4, 1.0, torch.Generator().manual_seed(0))
    best = step.best
    for c in step.candidates:
        if c.data.strip():
            assert (c.agreement, c.logprob_per_byte) <= (best.agreement, best.logprob_per_byte)


@pytest.mark.parametrize("kw, match", [
    (dict(prompt=""), "empty"), (dict(prompt="   \n"), "empty"), (dict(max_sentences=0), ">= 1"),
    (dict(max_sentences=65), "<= 64"), (dict(rerank=-1), "rerank"), (dict(temperature=-1.0), "temperature"),
])
def test_bad_generate_arguments(pipe, kw, match):
    g = sentcode.load(pipe[0])
    args = {"prompt": PROMPT, **kw}
    with pytest.raises(SentcodeError, match=match):
        g.generate(args.pop("prompt"), **args)


def test_two_part_bits_are_the_sum_of_independently_computed_parts(pipe):
    g = sentcode.load(pipe[0])
    text = "We hold these truths. They are self-evident. All of us agree on them."
    d = g.score_details(text)
    assert d["bits"] == pytest.approx(d["plan_bits"] + d["render_bits"])
    assert d["bpb"] == pytest.approx(d["bits"] / d["bytes"]) and g.score(text) == pytest.approx(d["bpb"])
    sents = g.split(text)
    assert d["bytes"] == len(" ".join(sents).encode())  # sentences + one separator between each pair
    codes = torch.from_numpy(g.codes_of([s.encode() for s in sents]))[None]
    ctx = [b"", *[b" ".join(s.encode() for s in sents[:i])[-16:] for i in range(1, len(sents))]]
    with torch.no_grad():
        plan = -float(g.planner.log_prob(codes).sum()) / math.log(2)
        render = -float(g.renderer.log_prob(codes[0], None, ctx, [s.encode() for s in sents]).sum()) / math.log(2)
    assert d["plan_bits"] == pytest.approx(plan, rel=1e-5)
    assert d["render_bits"] == pytest.approx(render, rel=1e-5)


def test_eval_json_via_cli(pipe, capsys):
    rc, out, _ = cli(capsys, "eval", pipe[0], "--json")
    assert rc == 0
    r = json.loads(out)
    for key in ("bpb", "plan_bits", "render_bits", "render_bits_oracle", "render_bits_predicted", "render_bits_nocode",
                "level_acc", "level_bits", "exact_match", "rvq", "closed_loop", "judge"):
        assert key in r, key
    assert r["bpb"] == pytest.approx((r["plan_bits"] + r["render_bits"]) / r["bytes"])
    assert len(r["level_acc"]) == 2 and r["closed_loop"]["contexts"] == 4
    assert "not an independent judge" in r["judge"] or r["closed_loop"]["judge_independent"]
    rc, out, _ = cli(capsys, "eval", pipe[0])
    assert rc == 0 and "two-part" in out


def test_cli_pipeline_generate_and_stage_commands(copy, capsys):
    sets = [a for o in MICRO for a in ("--set", o)]
    rc, out, _ = cli(capsys, "pipeline", "sentence", "--corpus", "sample", "--out", copy, "--preset", "staged-tiny", "--no-progress", *sets)
    assert rc == 0 and f"skipped {len(ACTIVE)} up to date" in out
    rc, out, _ = cli(capsys, "generate", copy, "--prompt", PROMPT, "--max-sentences", "2", "--seed", "0", "--stream")
    assert rc == 0 and out.startswith(PROMPT)
    rc, out, _ = cli(capsys, "generate", copy, "--prompt", PROMPT, "--no-rerank", "--seed", "0")
    assert rc == 0
    rc, out, _ = cli(capsys, "rvq", "report", copy, "--json")
    assert rc == 0 and len(json.loads(out)) == 2
    rc, out, _ = cli(capsys, "rvq", "encode", copy)
    assert rc == 0 and "unchanged" in out
    rc, out, _ = cli(capsys, "train", "planner", copy, "--no-progress")
    assert rc == 0 and "stage planner done" in out


@pytest.mark.parametrize("argv", [
    ["generate", "RUN", "--prompt", ""], ["generate", "RUN", "--prompt", "x", "--max-sentences", "0"],
    ["generate", "RUN", "--prompt", "x", "--stop", "."], ["eval", "RUN/missing"],
])
def test_cli_bad_input_is_one_line_error(pipe, capsys, argv):
    rc, _, err = cli(capsys, *[str(pipe[0]) if a == "RUN" else a.replace("RUN", str(pipe[0])) for a in argv])
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_missing_stage_is_named(copy, capsys):
    (stage_dir(copy, "planner") / "stage.json").unlink()
    with pytest.raises(SentcodeError, match="stage 'planner'"):
        sentcode.load(copy)
    rc, _, err = cli(capsys, "train", "renderer", copy, "--kind", "ar")
    assert rc == 2 and "stage 'planner'" in err
    rc, _, err = cli(capsys, "eval", copy)
    assert rc == 2 and "'planner'" in err


def test_rvq_level_mismatch_is_a_clear_error(copy):
    meta = json.loads((stage_dir(copy, "rvq") / "rvq.json").read_text())
    meta.update(levels=3, codebook_sizes=[16, 16, 16])
    (stage_dir(copy, "rvq") / "rvq.json").write_text(json.dumps(meta))
    with pytest.raises(SentcodeError, match="K=3"):
        sentcode.load(copy)
    # The stored codebooks disagree with the stored config: the safetensors check names both files.
    meta.update(levels=2, codebook_sizes=[16, 32])
    (stage_dir(copy, "rvq") / "rvq.json").write_text(json.dumps(meta))
    with pytest.raises(SentcodeError, match="sizes|does not match"):
        sentcode.load(copy)


@pytest.mark.parametrize("override, match", [
    ("planner.model.levels=3", "derived"), ("renderer.model.use_residual=true", "residual"),
    ("rvq.codebook_sizes=[16]", "codebook_sizes"), ("renderer.model.max_sentence_bytes=32", "max_sentence_bytes"),
    ("nonsense.key=1", "unknown"),
])
def test_bad_pipeline_config(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        run_pipeline("sample", tmp_path / "r", overrides=MICRO + [override], progress=False)
    assert not (tmp_path / "r").exists()  # checked before anything is written


def test_flat_preset_is_rejected(tmp_path, capsys):
    rc, _, err = cli(capsys, "pipeline", "sentence", "--corpus", "sample", "--preset", "tiny", "--out", tmp_path / "r")
    assert rc == 2 and "'tiny' is a flat LM config" in err and "sentcode train lm --data DATA --preset tiny" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [
    ["pipeline", "sentence"], ["sentences"], ["encoder", "train"], ["embed"], ["rvq", "fit"], ["rvq", "encode"],
    ["rvq", "report"], ["train", "planner"], ["train", "renderer"], ["generate"],
])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


NAR = ["renderer_nar.enabled=true", "renderer_nar.reward_encoder_steps=5", "renderer_nar.model.max_bytes=64",
       "renderer_nar.model.d_model=32", "renderer_nar.model.n_layer=1", "renderer_nar.model.n_head=2",
       "renderer_nar.model.context_bytes=16", "renderer_nar.train.micro_batch=4", "renderer_nar.train.batch_tokens=256",
       "renderer_nar.train.n_samples=2", "budgets.renderer_nar.max_steps=5"]


def test_optional_nar_stage(copy):
    r = run_pipeline("sample", copy, preset="staged-tiny", overrides=MICRO + NAR, progress=False)
    assert r["ran"] == ["renderer-nar", "eval"]  # the evaluation reads the NAR renderer too
    rec = json.loads((stage_dir(copy, "renderer-nar") / "stage.json").read_text())
    assert rec["output"]["status"] == "completed" and (stage_dir(copy, "renderer-nar") / "reward-encoder").is_dir()
    ev = r["eval"]
    # max_bytes 64 = sentences.max_bytes: every sentence fits, so the NAR code length is finite
    assert ev["nar_sentences_too_long"] == 0 and ev["nar_bpb"] > ev["plan_bpb"]
    assert ev["nar_bpb"] == pytest.approx(ev["plan_bpb"] + ev["nar_render_bits"] / ev["bytes"])
    assert ev["closed_loop_nar"]["contexts"] == ev["closed_loop"]["contexts"]
    g = sentcode.load(copy, renderer="nar")
    assert g.renderer_kind == "nar" and isinstance(g.generate(PROMPT, max_sentences=2, seed=0), str)


def test_side_by_side_demo(tmp_path, capsys):
    """The README's main job on the sample corpus with micro budgets: both models trained, evaluated on the
    test split and printed in one table with speed and a sample."""
    from sentcode.demo import run_demo

    from test_steplm import MICRO as STEP_MICRO

    r = run_demo(tmp_path / "demo", corpus="sample", minutes=0.05,
                 sentence_overrides=[o for o in STEP_MICRO if not o.startswith("train.max_steps")])
    out = capsys.readouterr().out
    assert [row["model"] for row in r["table"]] == ["flat LM (bpe)", "sentence-step LM"]
    assert r["table"][0]["bpb"] == pytest.approx(r["flat"]["bpb"]) and r["table"][1]["bpb"] == pytest.approx(r["sentence"]["bpb"])
    for row in r["table"]:
        assert row["bytes_s"] > 0 and row["params"] > 0 and 0 < row["bpb"] < 20
        assert row["model"] in out and (0 <= row["real_words"] <= 1 or row["real_words"] != row["real_words"])
    assert "[flat LM (bpe)]" in out and "[sentence-step LM]" in out and "occur in the training text" in out
    assert f"generation on {r['engine']}" in out
    assert r["engine"].startswith("ONNX Runtime") or "ONNX export was not used" in r["engine"]  # dev installs onnx


def test_word_share_counts_words_of_the_training_text():
    from sentcode.eval.words import vocabulary, word_share

    vocab = vocabulary("The nation's economy grew. We must act!")
    assert word_share("the Nation's economy discribition", vocab) == (0.75, 4)
    share, n = word_share(["", "123 --"], vocab)
    assert n == 0 and share != share  # no words: no figure
