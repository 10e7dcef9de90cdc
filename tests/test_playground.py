"""Several runs served side by side, a run that is still loading, the plan route and the page's files (over HTTP;
the page itself in a browser is tests/test_page.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sentcode
from sentcode.errors import SentcodeError

pytest.importorskip("fastapi")

from sentcode.serve.config import ServeConfig  # noqa: E402
from sentcode.serve.server import BackgroundServer  # noqa: E402
from test_serve import assert_error, call, stream  # noqa: E402


def planning_generator(levels: int = 2):
    """A micro end-to-end sentence-step model with codes on (random weights: what it writes is noise, what matters
    is that it plans, writes and reranks)."""
    from sentcode.infer.steplm import StepLMGenerator
    from sentcode.models.sentence.steplm import StepLM, StepLMConfig, StepLMModelConfig

    torch.manual_seed(0)
    cfg = StepLMModelConfig(d_model=32, n_layer=1, n_head=2, n_kv_head=1, d_plan=32, plan_layers=1, plan_heads=2,
                            plan_kv_heads=1, enc_d_model=16, enc_heads=2, window=16, max_segments=8,
                            max_segment_bytes=24, levels=levels, codebook_size=8, cond_init="normal")
    return StepLMGenerator(StepLM(cfg).eval(), StepLMConfig())


@pytest.fixture(scope="module")
def multi(trained_run):
    runs = {"flat": sentcode.load(trained_run[0]), "planner": planning_generator()}
    with BackgroundServer(runs, ServeConfig(port=0, max_tokens=100)) as server:
        yield server


def test_several_runs_each_under_its_name(multi, trained_run):
    status, m, _ = call(multi, "/v1/models")
    assert status == 200 and [c["id"] for c in m["data"]] == ["flat", "planner"]
    flat, planner = m["data"]
    assert flat["family"] == "lm" and flat["status"] == "ok" and flat["tokenizer"]["kind"] == "bytes"
    assert flat["parameters"] > 0 and flat["context"] == 64 and not flat.get("plan")
    assert planner["family"] == "steplm" and planner["plan"] and planner["codes"]
    body = {"prompt": "We must", "max_tokens": 12, "temperature": 0}
    status, r, _ = call(multi, "/v1/completions", {**body, "model": "flat"})
    want = sentcode.load(trained_run[0]).generate("We must", max_bytes=12, temperature=0)
    assert status == 200 and r["model"] == "flat" and r["choices"][0]["text"] == want
    status, r, _ = call(multi, "/v1/completions", {**body, "model": "planner", "max_tokens": 2})
    assert status == 200 and r["model"] == "planner" and r["usage"]["completion_tokens"] <= 2
    status, r, _ = call(multi, "/v1/completions", body)
    assert "this server serves 'flat', 'planner'" in assert_error(status, r, 400, "model")["message"]
    status, r, _ = call(multi, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})
    assert assert_error(status, r, 400, "model")["code"] == "model_not_found"
    status, r, _ = call(multi, "/tokenize", {"model": "planner", "prompt": "x"})
    assert assert_error(status, r, 400)["code"] == "unsupported"
    status, r, _ = call(multi, "/tokenize", {"model": "flat", "prompt": "ab"})
    assert status == 200 and r["tokens"] == [97, 98]
    status, h, _ = call(multi, "/health")
    assert status == 200 and [x["model"] for x in h["models"]] == ["flat", "planner"]


def test_the_plan_route_says_what_each_step_planned_and_wrote(multi):
    gen = multi.served.states["planner"].gen
    prompt = "We met. The Congress"
    body = {"model": "planner", "prompt": prompt, "max_tokens": 3, "temperature": 0.9, "seed": 5, "rerank": 3}
    status, r, _ = call(multi, "/v1/plan", body)
    assert status == 200 and r["family"] == "steplm" and 1 <= len(r["segments"]) <= 3
    want = gen.generate(prompt, max_sentences=3, rerank=3, temperature=0.9, seed=5)
    assert "".join(s["text"] for s in r["segments"]) == want  # the same text as plain generation
    for seg in r["segments"]:
        assert len(seg["planned"]) == len(seg["written"]) == 2 and len(seg["candidates"]) == 3
        kept = seg["candidates"][seg["chosen"]]
        assert kept["text"] == seg["text"] and kept["codes"] == seg["written"]
        assert max(c["agreement"] for c in seg["candidates"]) == seg["agreement"]
        w = [1.0, 0.5]
        agree = sum(wi for wi, p, c in zip(w, seg["planned"], seg["written"]) if p == c) / sum(w)
        assert seg["agreement"] == pytest.approx(agree)
    events = [e for e in stream(multi, "/v1/plan", {**body, "stream": True}) if e != "[DONE]"]
    assert [e["segment"] for e in events if "segment" in e] == r["segments"]
    assert events[-1]["done"] is True
    status, r, _ = call(multi, "/v1/plan", {"model": "flat", "prompt": "We"})
    assert "no plan to show" in assert_error(status, r, 400, "model")["message"]
    status, r, _ = call(multi, "/v1/plan", {"model": "planner", "prompt": "We", "temperature": 3})
    assert assert_error(status, r, 400, "temperature")


def test_the_staged_recipe_shows_its_plan_too(sentence_run):
    with BackgroundServer(sentence_run, ServeConfig(port=0)) as server:
        gen = server.state.gen
        body = {"prompt": "The state of the Union is strong.", "max_tokens": 2, "seed": 4, "rerank": 2}
        status, r, _ = call(server, "/v1/plan", body)
        assert status == 200 and r["family"] == gen.family and r["segments"]
        assert "".join(s["text"] for s in r["segments"]) == " " + gen.generate(
            body["prompt"], max_sentences=2, rerank=2, temperature=0.8, seed=4)
        for seg in r["segments"]:
            assert len(seg["planned"]) == len(seg["written"]) == gen.levels and len(seg["candidates"]) == 2
            assert seg["candidates"][seg["chosen"]]["codes"] == seg["written"]
        assert call(server, "/v1/models")[1]["data"][0]["plan"] is True


def test_a_run_still_loading_is_a_clear_503_and_then_serves(trained_run):
    from sentcode.serve.app import build_app

    st = build_app({"late": None}, ServeConfig(port=0)).state.served.states["late"]
    assert st.status == "loading" and st.card()["status"] == "loading" and "family" not in st.card()
    with BackgroundServer({"late": sentcode.load(trained_run[0])}, ServeConfig(port=0)) as server:
        server.served.states["late"].gen = None  # as a server looks while the run loads
        status, m, _ = call(server, "/v1/models")
        assert status == 200 and m["data"][0]["status"] == "loading"
        status, r, headers = call(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert "still loading" in assert_error(status, r, 503, "model")["message"] and headers.get("retry-after")
        assert call(server, "/health")[1]["status"] == "loading"
        assert call(server, "/")[0] == 200  # the page is there from the start
        server.served.states["late"].gen = sentcode.load(trained_run[0])
        assert call(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_bad_serve_commands_are_one_line(trained_run, tmp_path):
    same = [str(trained_run[0]), str(trained_run[0])]
    with pytest.raises(SentcodeError, match="both be served as"):
        BackgroundServer(same, ServeConfig(port=0))
    cli = [sys.executable, "-m", "sentcode.cli", "serve", "--port", "0"]
    for args, want in ((same, "both be served as"), ([str(tmp_path)], "not a sentcode run directory"),
                       ([str(trained_run[0]), "--model-name", "a", "b"], "2 model names for 1 runs")):
        r = subprocess.run(cli + args, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and want in r.stderr, r.stderr


def test_a_directory_that_is_not_a_run_is_served_as_failed_beside_the_others(trained_run, tmp_path):
    """`sentcode serve GOOD BAD`: the server comes up, says why BAD cannot be served (its card, a 503 naming it),
    and serves GOOD."""
    import json
    import re
    import time
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "sentcode.cli", "serve", str(trained_run[0]), str(tmp_path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        assert "not a sentcode run directory" in proc.stderr.readline()

        def get(path, body=None):
            req = urllib.request.Request(url + path, None if body is None else json.dumps(body).encode(),
                                         {"content-type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        deadline = time.monotonic() + 60
        while get("/v1/models")[1]["data"][0]["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        cards = {c["id"]: c for c in get("/v1/models")[1]["data"]}
        good, bad = trained_run[0].name, tmp_path.name
        assert cards[good]["status"] == "ok" and cards[bad]["status"] == "failed"
        assert "not a sentcode run directory" in cards[bad]["error"]
        status, r = get("/v1/completions", {"model": bad, "prompt": "x", "max_tokens": 2})
        assert status == 503 and r["error"]["code"] == "load_failed" and r["error"]["param"] == "model"
        assert get("/v1/completions", {"model": good, "prompt": "We", "max_tokens": 2})[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_page_is_served_with_a_strict_policy(multi):
    status, html, headers = call(multi, "/")
    assert status == 200 and "<title>sentcode playground</title>" in html
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    for name in ("app.js", "style.css", "icon.svg"):
        assert call(multi, f"/page/{name}")[0] == 200
    assert call(multi, "/page/..%2Fapp.py")[0] == 404
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


def test_the_card_reads_the_runs_held_out_figure(tmp_path):
    """The model card's held-out bits per byte: the run's own test evaluation, else the training loop's last
    validation pass, else nothing."""
    import json

    from sentcode.serve.state import heldout_bpb

    assert heldout_bpb(None) is None and heldout_bpb(tmp_path) is None
    (tmp_path / "train_summary.json").write_text(json.dumps({"final_eval": None, "last_eval": {"bpb": 2.5}}))
    assert heldout_bpb(tmp_path) == {"bpb": 2.5, "split": "validation"}
    (tmp_path / "demo.json").write_text(json.dumps({"bpb": 2.25}))
    assert heldout_bpb(tmp_path) == {"bpb": 2.25, "split": "test"}
    (tmp_path / "eval.json").write_text(json.dumps({"bpb": 2.125}))
    assert heldout_bpb(tmp_path) == {"bpb": 2.125, "split": "test"}
    import os

    (tmp_path / "model.safetensors").write_bytes(b"")  # weights newer than every figure: a resumed run
    for name in ("eval.json", "demo.json"):
        os.utime(tmp_path / name, (1_000_000, 1_000_000))
    assert heldout_bpb(tmp_path) == {"bpb": 2.5, "split": "validation"}
