"""The HTTP server over real HTTP on loopback: uvicorn on a free port in a background thread, plain http.client."""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra: pip install 'sentcode[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra: pip install 'sentcode[serve]'")

import sentcode  # noqa: E402
from sentcode.infer.engine import generate_ids  # noqa: E402
from sentcode.serve.config import ServeConfig  # noqa: E402
from sentcode.serve.server import BackgroundServer  # noqa: E402

# ---- HTTP helpers ----------------------------------------------------------------------------------------------


def _conn(server) -> http.client.HTTPConnection:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def call(server, path: str, body=None, raw: bytes | None = None, method: str | None = None, headers=None):
    """(status, parsed JSON or text, headers) of one request."""
    conn = _conn(server)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"content-type": "application/json", **(headers or {})}
    conn.request(method or ("GET" if data is None else "POST"), path, body=data, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, parsed, dict(resp.getheaders())


def stream(server, path: str, body: dict) -> list:
    """Every ``data:`` payload of a server-sent event stream, in order ([DONE] as the string)."""
    conn = _conn(server)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("content-type").startswith("text/event-stream")
    out = []
    for line in resp:
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return out


def assert_error(status, body, want_status, param=None):
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    return err


# ---- servers -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat(trained_run):
    cfg = ServeConfig(port=0, max_batch=4, max_queue=4, max_tokens=120, max_prompt_bytes=2000, max_body_bytes=8192)
    with BackgroundServer(sentcode.load(trained_run[0]), cfg) as server:
        yield server


@pytest.fixture(scope="module")
def tight(trained_run):
    """One row, no queue: the second concurrent request is refused."""
    cfg = ServeConfig(port=0, max_batch=1, max_queue=0, max_tokens=100_000, model_name="tight")
    with BackgroundServer(sentcode.load(trained_run[0]), cfg) as server:
        yield server


@pytest.fixture(scope="module")
def sent(sentence_run):
    with BackgroundServer(sentence_run, ServeConfig(port=0, max_queue=2)) as server:
        yield server


def greedy_text(server, prompt: str, n: int, seed=None, temperature=0.0) -> tuple[str, int]:
    """What the engine alone generates for this prompt: (text, tokens generated)."""
    gen = server.state.gen
    tok = gen.tokenizer
    ids = list(generate_ids(gen.model, [tok.eos_id] + tok.encode(prompt), n, temperature=temperature, seed=seed,
                            stop_ids=(tok.eos_id,)))
    return tok.decode([t for t in ids if t != tok.eos_id]).decode("utf-8", "replace"), len(ids)


# ---- /generate: the seeds' bodies ---------------------------------------------------------------------------------


def test_generate_accepts_both_seed_bodies_flat(flat):
    """Guards the seeds' contract on a flat LM: both bodies answer {text, completion, sentences, ...}; text is
    the prompt plus the continuation, which is the engine's own continuation cut after N sentences."""
    prompt = "The state of the Union"
    body = {"prompt": prompt, "steps": 2, "sample": True, "temperature": 1.0, "params": {"seed": 3}}
    status, a, _ = call(flat, "/generate", body)
    assert status == 200, a
    assert a["text"] == prompt + a["completion"]
    full, _ = greedy_text(flat, prompt, 120, seed=3, temperature=1.0)
    assert a["completion"] and full.startswith(a["completion"])
    assert 1 <= len(a["sentences"]) <= 2 and a["meta"]["sample"] is True and a["meta"]["max_sentences"] == 2
    assert a["usage"]["prompt_tokens"] == len(prompt.encode())
    assert a["finish_reason"] == "stop" or a["usage"]["completion_tokens"] == 120  # sentence count or the cap
    status, b, _ = call(flat, "/generate", {"prompt": prompt, "max_sentences": 2, "params": {"rerank": True}})
    assert status == 200 and b["meta"]["sample"] is False  # the sentence-step seed's default: greedy
    assert b["completion"] == greedy_text(flat, prompt, 120)[0][: len(b["completion"])]
    status, c, _ = call(flat, "/generate", {"prompt": prompt, "max_sentences": 3,
                                             "params": {"do_sample": True, "seed": 5, "temp": 0.9}})
    assert status == 200 and c["meta"]["sample"] is True and c["meta"]["temperature"] == 0.9


def test_text_assembler_cuts_sentences_stops_and_characters():
    """Guards the token -> text step of the server: whole UTF-8 characters only, nothing sent that could
    still be the start of a stop string, a cut after N sentences."""
    from sentcode.serve.worker import TextAssembler
    from sentcode.tokenizer.bytes import ByteTokenizer

    tok = ByteTokenizer()

    def run(text: str, **kw) -> tuple[list[str], str, bool]:
        ta = TextAssembler(tok, **kw)
        sent = []
        for t in tok.encode(text):
            ta.feed_token(t)
            sent.append(ta.take()[0])
            if ta.finished:
                break
        sent.append(ta.take(final=True)[0])
        return [p for p in sent if p], "".join(sent), ta.finished

    pieces, text, cut = run("One. Two three! Four five. Six.", sentences=2)
    assert text == "One. Two three!" and cut and pieces == [text]  # held back until the count is known
    pieces, text, cut = run("abc END def", stops=("END",))
    assert text == "abc " and cut and "E" not in "".join(pieces)
    pieces, text, cut = run("naïve €", stops=("zz",))
    assert text == "naïve €" and not cut and "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert len(pieces) == len("naïve €")  # one piece per character: multi-byte ones arrive whole


def test_generate_accepts_both_seed_bodies_sentence(sent):
    """On a sentence-step run, steps/max_sentences are sentences: the greedy answer is the library's."""
    prompt = "The state of the Union is strong. We must act."
    status, a, _ = call(sent, "/generate", {"prompt": prompt, "steps": 2})
    assert status == 200, a
    want = list(sent.state.gen.stream(prompt, max_sentences=2, temperature=0.0))
    assert a["sentences"] == want
    assert a["text"] == prompt + " " + " ".join(want) and a["usage"]["completion_tokens"] == len(want)
    assert a["usage"]["prompt_tokens"] == 2  # two prompt sentences
    status, b, _ = call(sent, "/generate", {"prompt": prompt, "max_sentences": 1, "params": {"rerank": False}})
    assert status == 200 and b["sentences"] == want[:1] and b["meta"]["rerank"] == 1


# ---- OpenAI endpoints ---------------------------------------------------------------------------------------------


def test_completions_match_the_engine_and_seeds_reproduce(flat):
    body = {"model": flat.state.name, "prompt": "We must", "max_tokens": 25, "temperature": 0}
    status, r, _ = call(flat, "/v1/completions", body)
    assert status == 200, r
    want, n = greedy_text(flat, "We must", 25)
    choice = r["choices"][0]
    assert choice["text"] == want and r["object"] == "text_completion" and r["model"] == flat.state.name
    assert r["usage"] == {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
    assert choice["finish_reason"] == ("length" if n == 25 else "stop")
    body = {"prompt": "We must", "max_tokens": 25, "temperature": 1.0, "seed": 7}
    one, two = call(flat, "/v1/completions", body)[1], call(flat, "/v1/completions", body)[1]
    assert one["choices"][0]["text"] == two["choices"][0]["text"] == greedy_text(flat, "We must", 25, 7, 1.0)[0]


def test_concurrent_requests_are_batched_and_each_gets_its_own_tokens(flat):
    """Guards batching: 4 concurrent seeded requests each get exactly what they would get alone, in far
    fewer decode steps than one request after another would take."""
    prompts = ["We must", "The Union", "Our", "In the year"]
    results = [None] * 4
    go = threading.Barrier(4)

    def run(i):
        go.wait()
        results[i] = call(flat, "/v1/completions", {"prompt": prompts[i], "max_tokens": 60, "temperature": 1.0,
                                                    "seed": i})[1]

    before = flat.state.worker.steps
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = flat.state.worker.steps - before
    generated = 0
    for i, r in enumerate(results):
        want, n = greedy_text(flat, prompts[i], 60, seed=i, temperature=1.0)
        assert r["choices"][0]["text"] == want
        generated += n
    assert steps < 0.75 * generated, (steps, generated)


def test_echo_logprobs_for_lm_eval(flat):
    """Guards what lm-eval's local-completions sends to score text (echo, logprobs 1, max_tokens 0 or 1): the
    prompt's tokens with their log-probs from sentcode.infer.scoring, offsets, top alternatives."""
    from sentcode.infer.scoring import token_logprobs

    text = "We must act now."
    status, r, _ = call(flat, "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1,
                                                  "temperature": 0})
    assert status == 200, r
    lp = r["choices"][0]["logprobs"]
    want = token_logprobs(flat.state.gen, text, top=1)
    assert r["choices"][0]["text"] == text and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"] == pytest.approx([w["logprob"] for w in want], abs=1e-5)
    assert lp["text_offset"] == list(range(len(text)))
    assert all(len(t) == 1 and max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    assert all(v < 0 for v in lp["token_logprobs"])
    # lm-eval's current payload: one greedy token more, its log-prob the best of its alternatives
    status, r, _ = call(flat, "/v1/completions", {"prompt": [text, "Yes"], "max_tokens": 1, "echo": True,
                                                  "logprobs": 1, "temperature": 0})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1]
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(text) + 1 and lp["text_offset"][-1] == len(text)
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-6)
    assert r["choices"][1]["text"].startswith("Yes")
    # and what lm-eval makes of it (its parse_logprobs: the continuation's entries, the generated one left out)
    from sentcode.infer.scoring import loglikelihood

    context, continuation = "We must", " act now."
    r = call(flat, "/v1/completions", {"prompt": context + continuation, "max_tokens": 1, "echo": True,
                                       "logprobs": 1, "temperature": 0})[1]
    lp = r["choices"][0]["logprobs"]
    ctxlen = len(context.encode())
    got = sum(lp["token_logprobs"][ctxlen:-1])
    pairs = zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1])
    greedy = all(t == max(top.values()) for t, top in pairs)
    want, want_greedy = loglikelihood(flat.state.gen, context, continuation)
    assert got == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_tokenizer_endpoints_and_token_id_prompts(flat, sent):
    """Guards what lm-eval's remote tokenizer relies on (vLLM's /tokenizer_info, /tokenize, /detokenize) and
    token-id prompts that start with the document-start token, as lm-eval sends them."""
    from sentcode.infer.scoring import loglikelihood

    tok = flat.state.gen.tokenizer
    status, info, _ = call(flat, "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|eos|>" and info["bos_token"] is None
    assert info["model_max_length"] == 64
    status, r, _ = call(flat, "/tokenize", {"prompt": info["eos_token"] + "We", "add_special_tokens": False})
    assert status == 200 and r["tokens"] == [tok.eos_id] + tok.encode("We") and r["count"] == 3
    assert call(flat, "/detokenize", {"tokens": r["tokens"] + [0xC3]})[1]["prompt"] == "<|eos|>We\ufffd"
    assert_error(*call(flat, "/detokenize", {"tokens": [999]})[:2], 400, "tokens")
    assert_error(*call(sent, "/tokenize", {"prompt": "x"})[:2], 400)
    context, continuation = tok.encode("We must"), tok.encode(" act.")
    ids = [tok.eos_id] + context + continuation  # lm-eval: prefix token, context, continuation
    status, r, _ = call(flat, "/v1/completions", {"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1,
                                                  "temperature": 0})
    assert status == 200, r
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"][0] == "<|eos|>" and lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids) + 1
    ctxlen = 1 + len(context)
    want, _ = loglikelihood(flat.state.gen, "We must", " act.")
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(want, abs=1e-4)
    assert r["choices"][0]["text"].startswith("<|eos|>We must act.") and r["usage"]["prompt_tokens"] == len(ids)
    # generation from token ids equals generation from the same text
    by_ids = call(flat, "/v1/completions", {"prompt": context, "max_tokens": 8, "seed": 1})[1]
    by_text = call(flat, "/v1/completions", {"prompt": "We must", "max_tokens": 8, "seed": 1})[1]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert_error(*call(flat, "/v1/completions", {"prompt": [1, tok.pad_id]})[:2], 400, "prompt")
    assert_error(*call(sent, "/v1/completions", {"prompt": [1, 2]})[:2], 400, "prompt")


def test_lm_eval_local_completions_scores_the_server(flat):
    """lm-eval's own local-completions client, auto-detecting the server's tokenizer, gets the same
    log-likelihoods as sentcode's scoring API."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    pytest.importorskip("tenacity", reason="lm-eval's API models need tenacity and aiohttp")
    pytest.importorskip("aiohttp", reason="lm-eval's API models need tenacity and aiohttp")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from sentcode.infer.scoring import loglikelihood

    lm = LocalCompletionsAPI(base_url=flat.url + "/v1/completions", model=flat.state.name, max_length=64)
    assert lm.tokenizer_backend == "remote"
    pairs = [("We must", " act."), ("The state of the Union", " is strong")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        want, want_greedy = loglikelihood(flat.state.gen, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_chat_completions(flat, sent):
    msgs = [{"role": "system", "content": "We must"}, {"role": "user", "content": [{"type": "text", "text": "act"}]}]
    status, r, _ = call(flat, "/v1/chat/completions", {"messages": msgs, "max_tokens": 12, "temperature": 1.0,
                                                       "seed": 2})
    assert status == 200, r
    choice = r["choices"][0]
    assert r["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == greedy_text(flat, "We must act ", 12, seed=2, temperature=1.0)[0]
    assert r["usage"]["prompt_tokens"] == len("We must act ")
    status, r, _ = call(sent, "/v1/chat/completions", {"messages": [{"role": "user", "content": "We must act."}],
                                                       "max_tokens": 2, "temperature": 0})
    assert status == 200, r
    want = list(sent.state.gen.stream("We must act.", max_sentences=2, temperature=0.0))
    assert r["choices"][0]["message"]["content"] == " ".join(want) and r["usage"]["completion_tokens"] == len(want)


def test_streams_arrive_in_order_and_end_with_done(flat, sent):
    body = {"prompt": "We must", "max_tokens": 20, "temperature": 1.0, "seed": 4, "logprobs": 1}
    whole = call(flat, "/v1/completions", body)[1]["choices"][0]
    events = stream(flat, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and "usage" in events[-2] and events[-2]["choices"] == []
    chunks = [e["choices"][0] for e in events[:-2]]
    assert len(chunks) > 2 and all(c["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    offsets = [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"] and offsets == sorted(offsets)
    assert events[-2]["usage"]["completion_tokens"] == 20 or whole["finish_reason"] == "stop"

    chat = {"messages": [{"role": "user", "content": "We must"}], "max_tokens": 10, "temperature": 1.0, "seed": 1}
    events = stream(flat, "/v1/chat/completions", {**chat, "stream": True})
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content == call(flat, "/v1/chat/completions", chat)[1]["choices"][0]["message"]["content"]

    events = stream(sent, "/v1/chat/completions", {**chat, "max_tokens": 2, "temperature": 0, "stream": True})
    pieces = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert pieces == [s if i == 0 else " " + s for i, s in
                      enumerate(sent.state.gen.stream("We must", max_sentences=2, temperature=0.0))]


def test_stop_strings_cut_the_text(flat):
    full, _ = greedy_text(flat, "We must", 40, seed=9, temperature=1.0)
    stop = full[10:12]
    body = {"prompt": "We must", "max_tokens": 40, "temperature": 1.0, "seed": 9}
    r = call(flat, "/v1/completions", {**body, "stop": [stop, "\x00"]})[1]
    assert r["choices"][0]["text"] == full[: full.find(stop)] and r["choices"][0]["finish_reason"] == "stop"
    events = stream(flat, "/v1/completions", {**body, "stop": stop, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == full[: full.find(stop)]


# ---- bad requests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),  # wrong type, not coerced
    ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature"),  # out of range
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 121}, "max_tokens"),  # over the server's cap
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "max_tokenz": 3}, "max_tokenz"),  # unknown field
    ("/v1/completions", {"prompt": "y" * 2001}, "prompt"),  # over --max-prompt-bytes
    ("/v1/completions", {"prompt": "z" * 200}, "prompt"),  # over the model's context
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ("/generate", {"prompt": "x", "steps": 0}, "steps"),
    ("/generate", {"prompt": "x", "steps": 1.5}, "steps"),
    ("/generate", {"prompt": "x", "params": {"rerank": "yes"}}, "params.rerank"),
    ("/generate", {"steps": 2}, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, "prompt"),  # a missing prompt is not an empty one
    ("/generate", {"prompt": "\ud800"}, "prompt"),  # a lone surrogate is not text
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}, "messages"),
])
def test_bad_requests_are_4xx_naming_the_field(flat, path, body, param):
    status, r, _ = call(flat, path, body)
    assert_error(status, r, 400, param)
    assert param.split("[")[0].split(".")[-1] in r["error"]["message"]


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -Infinity}', "temperature"),
])
def test_non_finite_numbers_are_named_as_such(flat, raw, param):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    status, r, _ = call(flat, path, raw=raw)
    assert "finite number" in assert_error(status, r, 400, param)["message"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_json_body_is_read_whatever_its_content_type(flat, ctype):
    conn = _conn(flat)
    headers = {} if ctype is None else {"content-type": ctype}
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "The", "max_tokens": 2}).encode(),
                 headers=headers)
    resp = conn.getresponse()
    r = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and len(r["choices"]) == 1


def test_malformed_oversized_and_unknown(flat, sent):
    status, r, _ = call(flat, "/v1/completions", raw=b'{"prompt": "x",')
    assert assert_error(status, r, 400)["code"] == "json_invalid"
    status, r, _ = call(flat, "/v1/completions", raw=b"[1, 2]")
    assert "JSON object" in assert_error(status, r, 400)["message"]
    status, r, _ = call(flat, "/v1/completions", raw=json.dumps({"prompt": "x" * 9000}).encode())
    assert assert_error(status, r, 413)["code"] == "body_too_large"
    status, r, _ = call(flat, "/v1/nothing", {"a": 1})
    assert_error(status, r, 404)
    status, r, _ = call(sent, "/v1/completions", {"prompt": "We act.", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert "sentence" in assert_error(status, r, 400, "logprobs")["message"]  # scoring's own refusal
    status, r, _ = call(sent, "/v1/completions", {"prompt": "We act.", "max_tokens": 65})
    assert_error(status, r, 400, "max_tokens")  # sentences, at most 64
    assert call(flat, "/health")[0] == 200  # none of it hurt the server


# ---- limits, disconnects, failures ----------------------------------------------------------------------------------


def _open_stream(server, body):
    conn = _conn(server)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    while not first.startswith(b"data: "):
        first = resp.readline()
    return conn, resp


def _wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = call(server, "/health")[1]
        if h["in_flight"] == 0 and h["active"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {h}")


def test_queue_full_is_429_and_a_disconnect_frees_the_slot(tight):
    conn, resp = _open_stream(tight, {"prompt": "We", "max_tokens": 50_000, "temperature": 1.0})
    status, r, headers = call(tight, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert assert_error(status, r, 429)["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    resp.close()
    conn.close()
    _wait_idle(tight)
    steps = tight.state.worker.steps
    time.sleep(0.2)
    assert tight.state.worker.steps == steps  # generation really stopped
    status, r, _ = call(tight, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert status == 200 and r["usage"]["completion_tokens"] <= 2

    # a client that gives up on a non-streamed request frees its slot as well
    sock = socket.create_connection(tight.url.removeprefix("http://").rsplit(":", 1))
    body = json.dumps({"prompt": "We", "max_tokens": 50_000}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 5
    while call(tight, "/health")[1]["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    _wait_idle(tight)


def test_a_model_error_is_a_500_and_the_server_stays_up(tight):
    model = tight.state.gen.model

    def broken(*a, **k):
        raise RuntimeError("simulated fault")

    model.forward = broken
    try:
        status, r, _ = call(tight, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    finally:
        del model.forward
    err = assert_error(status, r, 500)
    assert err["code"] == "model_error" and "simulated fault" in err["message"]
    status, r, _ = call(tight, "/v1/completions", {"prompt": "x", "max_tokens": 3, "temperature": 0})
    assert status == 200 and len(r["choices"][0]["text"]) <= 3 * 3


def test_a_failed_worker_makes_every_request_503(trained_run, monkeypatch):
    """A bug that kills the model worker (not a model error, which is a 500 for one step) must not leave
    clients waiting: the request in flight and every later one get 503, and /health says so."""
    from sentcode.infer.batch import BatchDecoder

    def dies(self):
        raise SystemExit("simulated worker bug")

    with BackgroundServer(sentcode.load(trained_run[0]), ServeConfig(port=0)) as server:
        monkeypatch.setattr(BatchDecoder, "step", dies)
        status, r, _ = call(server, "/v1/completions", {"prompt": "x", "max_tokens": 3})
        assert assert_error(status, r, 503)["code"] == "worker_failed" and "simulated" in r["error"]["message"]
        status, r, _ = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert assert_error(status, r, 503)["code"] == "worker_failed"
        status, h, _ = call(server, "/health")
        assert status == 503 and h["status"] == "failed"


def test_shutting_down_is_503(tight):
    tight.state.closing = True
    try:
        status, r, _ = call(tight, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert assert_error(status, r, 503)["code"] == "shutting_down"
        assert call(tight, "/health")[0] == 503
    finally:
        tight.state.closing = False


# ---- models, health, OpenAPI, CLI ------------------------------------------------------------------------------------


def test_models_health_and_openapi(flat, sent):
    status, m, _ = call(flat, "/v1/models")
    card = m["data"][0]
    assert status == 200 and m["object"] == "list" and card["id"] == flat.state.name and card["family"] == "lm"
    assert card["context"] == 64 and card["max_tokens"] == 120
    assert call(sent, "/v1/models")[1]["data"][0]["token_unit"] == "sentences"
    status, h, _ = call(flat, "/health")
    assert status == 200 and h["status"] == "ok" and h["capacity"] == 4 + 4
    status, doc, _ = call(flat, "/openapi.json")
    assert status == 200 and {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/models",
                              "/health"} <= set(doc["paths"])
    assert "temperature" in json.dumps(doc["components"]["schemas"]["CompletionRequest"])
    status, html, _ = call(flat, "/docs")
    assert status == 200 and "swagger" in html.lower()


def test_cli_serve_errors_are_one_line(trained_run, monkeypatch, capsys):
    from sentcode.cli import main

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        assert main(["serve", str(trained_run[0]), "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot listen on 127.0.0.1:") and "\n" not in err
    assert main(["serve", str(trained_run[0]), "--max-batch", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-batch must be >= 1, got 0"
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    assert main(["serve", str(trained_run[0])]) == 2
    assert capsys.readouterr().err.strip() == "error: serving needs FastAPI and uvicorn: pip install 'sentcode[serve]'"


def test_log_probs_are_natural_logs(flat):
    """Per-token log-probs are nats: over the 259-token byte vocabulary each is above -ln(259) * 3 for a
    trained model's own greedy tokens, and exp of the top alternative is a probability."""
    r = call(flat, "/v1/completions", {"prompt": "We", "max_tokens": 5, "temperature": 0, "logprobs": 2})[1]
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 and all(-3 * math.log(259) < v <= 0 for v in lp["token_logprobs"])
    assert all(0 < sum(math.exp(x) for x in t.values()) <= 1 + 1e-6 for t in lp["top_logprobs"])


def test_readme_curl_examples_work(flat):
    """Guards the README: every curl example of the serving section gets a 200 from a real server."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Serving over HTTP"):]
    section = section[: section.index("\n## ", 5)]
    examples = re.findall(r"curl -sN? localhost:8000(\S+) .*?\\\n\s+-d '(.*?)'", section)
    assert len(examples) >= 4, examples
    for path, body in examples:
        body = json.loads(body)
        if body.get("stream"):
            assert stream(flat, path, body)[-1] == "[DONE]"
        else:
            status, r, _ = call(flat, path, body)
            assert status == 200, (path, r)
