"""ONNX export, its check, and the onnx backend: same logits and tokens as the PyTorch model, clean refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import sentcode
from sentcode.config import ModelConfig
from sentcode.errors import SentcodeError
from sentcode.infer.batch import BatchRequest, generate_batch
from sentcode.infer.engine import generate_ids
from sentcode.models.lm import LM
from sentcode.models.decode_step import LMStep, attention_mask
from sentcode.nn.attention import LayerCache
from sentcode.nn.layers import alibi_slopes, rope_cos_sin

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _step_logits(model, idx, start, cache, pad_mask=None):
    """Run ``LMStep`` (in PyTorch) the way ``OnnxLM`` feeds the graph."""
    cfg = model.cfg
    B, T = idx.shape
    P = cache[0].length if cache[0].k is not None else 0
    pos = torch.arange(start, start + T)
    cos, sin = rope_cos_sin(pos, cfg.d_model // cfg.n_head, cfg.rope_theta)
    slopes = alibi_slopes(cfg.n_head) if cfg.pos == "alibi" else None
    mask = attention_mask(cfg, B, pos, P + T, pad_mask, slopes)
    empty = torch.zeros(B, cfg.n_kv_head, 0, cfg.d_model // cfg.n_head)
    past = [t if t is not None else empty for c in cache for t in (c.k, c.v)]
    out = LMStep(model)(idx, cos.expand(B, -1, -1), sin.expand(B, -1, -1), mask, past)
    for i, c in enumerate(cache):
        c.k, c.v = out[1 + 2 * i], out[2 + 2 * i]
    return out[0]


@pytest.mark.parametrize("pos,window", [("rope", None), ("rope", 5), ("alibi", None)])
@torch.no_grad()
def test_export_step_computes_what_the_model_computes(pos, window):
    """The graph's module, run in PyTorch, against ``LM`` with a cache: prefill, decode steps, left padding."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32, pos=pos,
                      attn_window=window)
    model = LM(cfg).eval()
    idx = torch.randint(0, 40, (2, 12))
    want = model(idx)
    cache = [LayerCache() for _ in range(cfg.n_layer)]
    got = torch.cat([_step_logits(model, idx[:, :7], 0, cache), _step_logits(model, idx[:, 7:9], 7, cache),
                     _step_logits(model, idx[:, 9:10], 9, cache), _step_logits(model, idx[:, 10:], 10, cache)], 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :4] = False  # row 1 is left-padded
    lm_cache = model.new_cache()
    want = model(idx, cache=lm_cache, start_pos=0, pad_mask=pad)
    got = _step_logits(model, idx, 0, [LayerCache() for _ in range(cfg.n_layer)], pad)
    torch.testing.assert_close(got[:, 4:], want[:, 4:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 5])
@torch.no_grad()
def test_decode_loop_in_the_graph_picks_the_tokens_the_engine_picks(window, tmp_path):
    """The token loop inside one ONNX graph (``onnx_loop``) against ``LM`` on PyTorch: greedy, seeded sampling with
    and without top-k, a stop id, past the context window (the window jumps); nucleus sampling takes the per-token
    path."""
    from sentcode.infer.onnx_graph import write_graph
    from sentcode.infer.onnx_lm import OnnxLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=24,
                      attn_window=window)
    model = LM(cfg).eval()
    write_graph(LMStep(model), tmp_path / "step.onnx")
    fast = OnnxLM(tmp_path / "step.onnx", cfg)
    assert fast.token_loop(None) is not None and fast.token_loop(0.9) is None
    prompt = [3, 1, 4, 1, 5]
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 2}, {"temperature": 0.7, "top_k": 5, "seed": 9},
               {"temperature": 1.0, "top_p": 0.9, "seed": 1}):
        want = list(generate_ids(model, prompt, 70, **kw))
        assert list(generate_ids(fast, prompt, 70, **kw)) == want, kw
    free = list(generate_ids(model, prompt, 70, temperature=1.0, seed=5))
    stop = free[40]  # a stop id met inside the second chunk of the loop, or earlier
    stopped = list(generate_ids(fast, prompt, 70, temperature=1.0, seed=5, stop_ids=(stop,)))
    assert stopped == free[:free.index(stop) + 1]
    assert list(generate_ids(fast, [2], 3, temperature=0.0)) == list(generate_ids(model, [2], 3, temperature=0.0))
    # the batch decoder's chunks: left-padded rows of their own settings, in and out of the window, past the context
    reqs = [BatchRequest(p, 40 + 7 * i, temperature=(0.0, 1.0, 0.8)[i % 3], top_k=(None, 4)[i % 2], seed=i)
            for i, p in enumerate(([1], [3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [7] * 12, [2, 7, 1]))]
    assert generate_batch(fast, reqs, max_batch=3) == generate_batch(model, reqs, max_batch=3)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    from sentcode.infer.export import export_run

    out = tmp_path_factory.mktemp("export") / "fp32"
    info = export_run(trained_run[0], out)
    return out, info


def test_export_writes_a_checked_self_describing_directory(exported):
    out, info = exported
    assert {p.name for p in out.iterdir()} == {"model.onnx", "config.yaml", "run.json", "tokenizer", "export.json"}
    assert json.loads((out / "export.json").read_text()) == info
    assert info["ok"] and info["greedy_identical"] == "6/6" and info["max_logit_diff"] < 1e-3
    assert abs(info["bpb_onnx"] - info["bpb_torch"]) < 1e-4 * info["bpb_torch"]
    assert info["tokens_per_s_batch1"]["onnx"] > 0


def test_onnx_backend_generates_the_same_tokens(trained_run, exported):
    """Greedy and seeded sampling: the same tokens from the export as from the PyTorch run."""
    torch_gen, onnx_gen = sentcode.load(trained_run[0]), sentcode.load(exported[0])
    assert type(onnx_gen.model).__name__ == "OnnxLM"
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 20, "seed": 3}):
        a = torch_gen.generate("We must", max_bytes=60, **kw)
        b = onnx_gen.generate("We must", max_bytes=60, **kw)
        assert a == b, kw
    # past the context: the window jumps and the cache is rebuilt the same way
    ids = [1, 2, 3]
    n = torch_gen.context + 20
    assert list(generate_ids(torch_gen.model, ids, n, temperature=0.0)) == \
        list(generate_ids(onnx_gen.model, ids, n, temperature=0.0))
    text = "The Congress of the United States has met."
    assert onnx_gen.score(text) == pytest.approx(torch_gen.score(text), rel=1e-5)


def test_onnx_backend_batches_left_padded_rows_like_torch(trained_run, exported):
    """The batch decoder on the export runs several steps of every row per call (the loop in the graph): the same
    tokens as PyTorch step by step, for left-padded rows with their own settings, seeds and stop ids, rows that join
    and leave, past the context; nucleus rows and log-probs take the per-step path."""
    torch_gen, onnx_gen = sentcode.load(trained_run[0]), sentcode.load(exported[0])
    tok = torch_gen.tokenizer
    reqs = [BatchRequest([tok.eos_id] + tok.encode(p), 20, temperature=0.0)
            for p in ("We", "The state of the Union", "Our nation is")]
    assert generate_batch(torch_gen.model, reqs, max_batch=3) == generate_batch(onnx_gen.model, reqs, max_batch=3)
    prompts = ("We", "The state of the Union", "Our nation is", "Congress", "Let us")
    mixed = [BatchRequest([tok.eos_id] + tok.encode(p), 50 + 30 * i, temperature=(0.0, 0.9, 1.2)[i % 3],
                          top_k=(None, 7)[i % 2], seed=i, stop_ids=(tok.encode(" ")[0],) if i == 3 else ())
             for i, p in enumerate(prompts)]
    want = generate_batch(torch_gen.model, mixed, max_batch=3)
    assert generate_batch(onnx_gen.model, mixed, max_batch=3) == want
    assert want[3][-1] == tok.encode(" ")[0] and max(len(w) for w in want) > onnx_gen.context  # stopped; jumped
    nucleus = [BatchRequest([tok.eos_id] + tok.encode("We"), 30, temperature=1.0, top_p=0.8, seed=1), mixed[1]]
    assert generate_batch(onnx_gen.model, nucleus, max_batch=2) == generate_batch(torch_gen.model, nucleus, max_batch=2)


def test_int8_export_keeps_bits_per_byte(trained_run, tmp_path):
    from sentcode.infer.export import export_run

    info = export_run(trained_run[0], tmp_path / "q", quantize="int8")
    assert info["quantize"] == "int8" and abs(info["bpb_cost"]) <= 0.01
    g = sentcode.load(tmp_path / "q")
    assert len(g.generate("We", max_bytes=20, temperature=0.0).encode()) <= 20


def test_backend_onnx_on_a_run_exports_once_into_it(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    g = sentcode.load(run, backend="onnx")
    assert (run / "onnx" / "export.json").is_file() and type(g.model).__name__ == "OnnxLM"
    stamp = (run / "onnx" / "model.onnx").stat().st_mtime_ns
    sentcode.load(run, backend="onnx")
    assert (run / "onnx" / "model.onnx").stat().st_mtime_ns == stamp  # reused, not written again
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # the run's weights change (a resumed run, say)
    sentcode.load(run, backend="onnx")
    assert (run / "onnx" / "model.onnx").stat().st_mtime_ns != stamp  # a stale export is made again


def test_export_refusals_write_nothing(trained_run, sentence_run, tmp_path, monkeypatch):
    from sentcode.infer import export as ex

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(SentcodeError, match="not an empty directory"):
        ex.export_run(trained_run[0], busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(SentcodeError, match="flat LM runs only"):
        ex.export_run(sentence_run, tmp_path / "s")
    with pytest.raises(SentcodeError, match="onnx backend runs flat LM, sentence-step and autoencoder runs"):
        sentcode.load(sentence_run, backend="onnx")
    with pytest.raises(SentcodeError, match="unknown backend"):
        sentcode.load(trained_run[0], backend="tensorrt")
    untrained = tmp_path / "untrained"
    shutil.copytree(trained_run[0], untrained, ignore=shutil.ignore_patterns("*.safetensors", "checkpoints", "onnx"))
    with pytest.raises(SentcodeError, match="no trained weights"):
        ex.export_run(untrained, tmp_path / "u")
    # a check that fails leaves nothing behind
    monkeypatch.setattr(ex, "LOGIT_TOL", -1.0)
    with pytest.raises(SentcodeError, match="failed its check.*logits differ"):
        ex.export_run(trained_run[0], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_a_run_the_backend_cannot_write_into_is_one_line(trained_run, tmp_path, monkeypatch):
    from sentcode.infer import export as ex

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run, ignore=shutil.ignore_patterns("onnx"))

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ex, "atomic_dir", read_only)
    with pytest.raises(SentcodeError, match="cannot write the ONNX export into .*Permission denied.*sentcode export"):
        sentcode.load(run, backend="onnx")
    assert not (run / "onnx").exists()


def test_dual_ffn_is_refused_by_name():
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=1, n_head=4, n_kv_head=2, max_seq_len=16, ffn="dual")
    with pytest.raises(SentcodeError, match="dual-FFN"):
        LMStep(LM(cfg))


def test_missing_extra_is_named(trained_run, tmp_path):
    """Without ONNX Runtime installed, the backend and the exporter name the extra to install."""
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import sentcode\n"
            "from sentcode.errors import SentcodeError\n"
            f"try:\n    sentcode.load({str(trained_run[0])!r}, backend='onnx')\n"
            "except SentcodeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'sentcode[onnx]'" in out.stdout, out.stderr


def test_cli_export_and_generate_with_the_backend(trained_run, tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "sentcode.cli", "export", str(trained_run[0]), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "greedy continuations identical 6/6" in r.stdout
    r = subprocess.run([sys.executable, "-m", "sentcode.cli", "export", str(trained_run[0]), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "not an empty directory" in r.stderr
    gen = [sys.executable, "-m", "sentcode.cli", "generate", "--prompt", "We", "--max-bytes", "30", "--temperature",
           "0"]
    a = subprocess.run(gen + [str(trained_run[0])], capture_output=True, text=True, timeout=120)
    b = subprocess.run(gen + [str(out)], capture_output=True, text=True, timeout=120)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


@pytest.mark.parametrize("levels", [0, 2])
def test_core_export_writes_the_same_text(levels, tmp_path):
    """A sentence-step generator running its renderer, planner and encoder through their ONNX exports: the same
    text, greedy and sampled, one by one and batched, with codes and reranking too."""
    from sentcode.infer.export_core import use_onnx_core
    from sentcode.infer.onnx_graph import RUN_EXPORT_DIR
    from sentcode.infer.steplm import StepLMGenerator
    from sentcode.models.sentence.steplm import StepLM, StepLMConfig, StepLMModelConfig

    torch.manual_seed(0)
    cfg = StepLMModelConfig(d_model=32, n_layer=2, n_head=2, n_kv_head=1, d_plan=32, plan_layers=1, plan_heads=2,
                            plan_kv_heads=1, enc_d_model=16, enc_heads=2, window=16, max_segments=8,
                            max_segment_bytes=40, levels=levels, codebook_size=8, cond_init="normal")
    model = StepLM(cfg).eval()
    ref = StepLMGenerator(model, StepLMConfig())
    fast = use_onnx_core(StepLMGenerator(model, StepLMConfig()), tmp_path)
    report = json.loads((tmp_path / RUN_EXPORT_DIR / "export.json").read_text())
    assert report["ok"] and report["greedy_identical"] == "6/6" and set(report["max_diff"]) == {
        "renderer", "planner", "encoder"}
    assert all(type(f.__self__).__name__ == "OnnxLM" for f in (fast.render, fast.planner, fast.encoder_states))
    prompts = ["We must act. Now", "The Congress met today. It passed", "Yes"]
    for kw in ({"temperature": 0.0, "rerank": 1}, {"temperature": 0.9, "seed": 4}):
        assert [fast.generate(p, max_sentences=3, **kw) for p in prompts] == \
            [ref.generate(p, max_sentences=3, **kw) for p in prompts]
    assert fast.generate_batch(prompts, max_sentences=2, rerank=1, temperature=0.0) == \
        ref.generate_batch(prompts, max_sentences=2, rerank=1, temperature=0.0)
    again = use_onnx_core(StepLMGenerator(model, StepLMConfig()), tmp_path)  # reused, not exported again
    assert again.generate("Yes", max_sentences=1, temperature=0.0) == ref.generate("Yes", max_sentences=1, temperature=0.0)
