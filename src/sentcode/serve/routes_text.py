"""The routes that write text: the seeds' ``/generate``, OpenAI-shaped completions and chat completions.

Length units: for a flat LM, ``max_tokens`` counts its tokenizer's tokens (bytes for a byte LM); for a
sentence-step run a token is a sentence, so ``max_tokens`` and the ``usage`` counts are sentences. The seeds'
``steps`` and ``max_sentences`` count sentences for both families: a flat LM writes until that many sentences
are complete (at most 256 tokens a sentence), an end-of-text token, or the ``--max-tokens`` cap.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Request

from sentcode.serve.config import SENTENCE_CAP
from sentcode.serve.errors import ApiError
from sentcode.serve.schemas import ChatRequest, CompletionRequest, GenerateRequest
from sentcode.serve.state import Served, Ticket
from sentcode.serve.streaming import EventStream, collect, first_item, relay, sse
from sentcode.serve.worker import SENTENCE_BYTES, CallJob, Channel, Result


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(rows: list, base: int) -> dict:
    """OpenAI legacy ``logprobs`` from scoring rows (dicts) or TokenInfo, offsets shifted by ``base``."""
    get = (lambda r, k: r[k]) if rows and isinstance(rows[0], dict) else (lambda r, k: getattr(r, k))
    return {"tokens": [get(r, "token") for r in rows],
            "token_logprobs": [get(r, "logprob") for r in rows],
            "top_logprobs": [get(r, "top") or {} for r in rows],
            "text_offset": [base + get(r, "offset") for r in rows]}


def _merge_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _chat_logprobs(tokens) -> list[dict]:
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8", "surrogatepass"))}

    return [{**entry(t.token, t.logprob),
             "top_logprobs": [entry(k, v) for k, v in (t.top or {}).items()]} for t in tokens]


def _score(gen, text: str, top: int) -> list[dict]:
    from sentcode.infer.scoring import token_logprobs

    return token_logprobs(gen, text, top=top)


def chat_prompt(contents: list[str], by_sentence: bool) -> str:
    """The prompt a base model continues: the messages' texts joined by single spaces (these models have
    no chat template). A flat LM gets a trailing space, so that the reply starts a new word."""
    text = " ".join(c.strip() for c in contents if c and c.strip())
    return text + " " if not by_sentence and text else text


def routes(served: Served) -> APIRouter:
    r = APIRouter()

    @r.post("/generate", summary="the seeds' body: {prompt, steps, sample, temperature} or "
              "{prompt, max_sentences, params: {rerank}}")
    async def generate(body: GenerateRequest, request: Request):
        st = served.pick(body.model)
        p = body.params
        if body.steps is not None and body.max_sentences is not None and body.steps != body.max_sentences:
            raise ApiError(400, "invalid 'steps': give steps or max_sentences (they mean the same), not two "
                           "different values", "steps", "conflicting_fields")
        n = body.max_sentences or body.steps or 1
        param = "max_sentences" if body.max_sentences is not None else "steps"
        cap = SENTENCE_CAP if not st.by_sentence else st.length_cap()
        if n > cap:
            raise ApiError(400, f"invalid '{param}': at most {cap} sentences", param, "too_many_sentences")
        prompt = st.prompt(body.prompt)
        sample = body.sample if body.sample is not None else bool(p and p.do_sample)
        temperature = next((t for t in (body.temperature, p and p.temperature, p and p.temp) if t is not None), 1.0)
        rerank = None if p is None or p.rerank is None or p.rerank is True else (1 if p.rerank is False else p.rerank)
        if p is not None and p.n_cand is not None and (p.rerank is None or p.rerank is True):
            rerank = p.n_cand
        seed = p.seed if p else None

        async def go(ticket: Ticket):
            channel = Channel(asyncio.get_running_loop())
            if not st.by_sentence:
                budget = min(st.cfg.max_tokens, n * SENTENCE_BYTES)
                job = st.generation_job(channel, prompt, budget, temperature=temperature if sample else 0.0,
                                        top_p=p and p.top_p, top_k=p and p.top_k, seed=seed, sentences=n)
            else:
                job = st.generation_job(channel, prompt, n, temperature=temperature if sample else 0.0,
                                        top_p=p and p.top_p, top_k=p and p.top_k, seed=seed, rerank=rerank)
            st.submit(ticket, job)
            got = (await collect(channel, request, {0: {"done"}}))[0]
            completion, done = got["text"], got["done"]
            if not st.by_sentence:
                from sentcode.corpus.sentences import split_sentences

                sentences = split_sentences(completion, SENTENCE_BYTES) if completion.strip() else []
            else:  # one piece per sentence
                sentences = [piece.strip() for piece in got["pieces"]]
            return {"text": body.prompt + completion, "completion": completion, "sentences": sentences,
                    "finish_reason": done.finish_reason, "model": st.name,
                    "usage": _usage(done.prompt_tokens, done.completion_tokens),
                    "meta": {"family": st.family, "max_sentences": n, "sample": sample,
                             "temperature": temperature if sample else 0.0, "seed": seed,
                             "rerank": (rerank if rerank is not None else st.gen.default_rerank) if st.by_sentence else None}}

        return await st.run(go, request)

    @r.post("/v1/completions", summary="OpenAI completions (legacy): echo and logprobs for scoring, SSE streaming")
    async def completions(body: CompletionRequest, request: Request):
        st = served.pick(body.model)
        n = st.max_tokens(body.max_tokens)
        scoring = body.echo and body.logprobs is not None
        prompts = [st.prompt(item, "prompt" if len(body.prompt) == 1 else f"prompt[{i}]", generate=n > 0,
                             score=scoring) for i, item in enumerate(body.prompt)]
        if body.logprobs is not None and st.by_sentence and not body.echo:
            raise ApiError(400, "per-token log-probs are not defined for sentence-step runs (they write whole "
                           "sentences, not tokens)", "logprobs", "unsupported")
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def build_jobs(ticket: Ticket, channel: Channel) -> dict[int, set]:
            """Scoring jobs first: the worker takes jobs in order and runs a scoring job before its next decode
            step, so every prompt's log-probs arrive before any generated piece."""
            expect: dict[int, set] = {i: set() for i in range(len(prompts))}
            gen_jobs = [st.generation_job(channel, prompt, n, temperature=body.temperature, top_p=body.top_p,
                                          top_k=body.top_k, seed=body.seed, stops=body.stop, logprobs=body.logprobs,
                                          index=i) for i, prompt in enumerate(prompts)] if n > 0 else []
            if scoring:
                for i, prompt in enumerate(prompts):
                    st.submit(ticket, CallJob(channel, lambda g, p=prompt, k=body.logprobs: p.echo_rows(
                        _score(g, p.data, k)), i, "logprobs"))
                    expect[i].add("result")
            for job in gen_jobs:
                st.submit(ticket, job)
                expect[job.index].add("done")
            return expect

        async def go(ticket: Ticket):
            channel = Channel(asyncio.get_running_loop())
            expect = build_jobs(ticket, channel)
            if body.stream:
                return await stream_completion(ticket, channel, request, expect, rid, created, include_usage)
            got = await collect(channel, request, {i: set(e) for i, e in expect.items()})
            choices, p_tok, c_tok = [], 0, 0
            for i, prompt in enumerate(prompts):
                g = got[i]
                done = g["done"]
                text = (prompt.text if body.echo else "") + g["text"]
                lp = None
                if body.logprobs is not None:
                    lp = _completion_logprobs(g["tokens"], len(prompt.text) if body.echo else 0)
                    if body.echo:
                        lp = _merge_logprobs(_completion_logprobs(g["result"], 0), lp)
                choices.append({"index": i, "text": text, "logprobs": lp,
                                "finish_reason": done.finish_reason if done else "length"})
                p_tok += prompt.tokens
                c_tok += done.completion_tokens if done else 0
            return {"id": rid, "object": "text_completion", "created": created, "model": st.name,
                    "choices": choices, "usage": _usage(p_tok, c_tok)}

        async def stream_completion(ticket, channel, request, expect, rid, created, include_usage):
            def chunk(i, text, lp=None, finish=None):
                return sse({"id": rid, "object": "text_completion", "created": created, "model": st.name,
                            "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

            lead: list[str] = []
            offsets = {i: 0 for i in expect}  # where the completion starts in the streamed text
            if body.echo:  # the prompt goes first (its log-probs were asked for before any generation)
                for i, prompt in enumerate(prompts):
                    lp = None
                    if "result" in expect[i]:
                        item = await first_item(channel, request)
                        if not isinstance(item, Result) or item.index != i:
                            raise ApiError(500, "internal error: prompt log-probs out of order", code="internal_error")
                        lp = _completion_logprobs(item.value, 0)
                        expect[i].discard("result")
                    lead.append(chunk(i, prompt.text, lp))
                    offsets[i] = len(prompt.text)
                    if not expect[i]:
                        lead.append(chunk(i, "", None, "length"))
            pending_first = await first_item(channel, request) if any(expect.values()) else None

            async def events():
                usage = [sum(p.tokens for p in prompts), 0]
                for e in lead:
                    yield e

                def piece(item):
                    lp = None if body.logprobs is None else _completion_logprobs(item.tokens, offsets[item.index])
                    return chunk(item.index, item.text, lp)

                def done(item):
                    usage[1] += item.completion_tokens
                    return [chunk(item.index, "", None, item.finish_reason)]

                async for e in relay(channel, pending_first, [i for i, e in expect.items() if e], piece, done):
                    yield e
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": st.name,
                               "choices": [], "usage": _usage(*usage)})
                yield "[DONE]"

            return EventStream(events(), ticket.release)

        return await st.run(go, request)

    @r.post("/v1/chat/completions", summary="OpenAI chat completions; the messages' texts are joined into one prompt")
    async def chat(body: ChatRequest, request: Request):
        st = served.pick(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise ApiError(400, "invalid 'max_tokens': give max_tokens or max_completion_tokens, not two different "
                           "values", "max_tokens", "conflicting_fields")
        n = st.max_tokens(body.max_tokens if body.max_tokens is not None else body.max_completion_tokens,
                          "max_tokens" if body.max_tokens is not None else "max_completion_tokens")
        if body.logprobs and st.by_sentence:
            raise ApiError(400, "per-token log-probs are not defined for sentence-step runs (they write whole "
                           "sentences, not tokens)", "logprobs", "unsupported")
        prompt = st.prompt(chat_prompt([m.content for m in body.messages], st.by_sentence), "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def go(ticket: Ticket):
            channel = Channel(asyncio.get_running_loop())
            job = st.generation_job(channel, prompt, n, temperature=body.temperature, top_p=body.top_p,
                                    top_k=body.top_k, seed=body.seed, stops=body.stop, logprobs=logprobs,
                                    sep_first=False)
            st.submit(ticket, job)
            if not body.stream:
                got = (await collect(channel, request, {0: {"done"}}))[0]
                done = got["done"]
                return {"id": rid, "object": "chat.completion", "created": created, "model": st.name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": got["text"]},
                                     "logprobs": {"content": _chat_logprobs(got["tokens"])} if body.logprobs else None,
                                     "finish_reason": done.finish_reason}],
                        "usage": _usage(done.prompt_tokens, done.completion_tokens)}
            first = await first_item(channel, request)

            def chunk(delta: dict, finish=None, lp=None):
                return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.name,
                            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

            def piece(item):
                lp = {"content": _chat_logprobs(item.tokens)} if body.logprobs else None
                return chunk({"content": item.text}, None, lp)

            def done(item):
                yield chunk({}, item.finish_reason)
                if include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.name,
                               "choices": [], "usage": _usage(item.prompt_tokens, item.completion_tokens)})

            async def events():
                yield chunk({"role": "assistant", "content": ""})
                async for e in relay(channel, first, [0], piece, done):
                    yield e
                yield "[DONE]"

            return EventStream(events(), ticket.release)

        return await st.run(go, request)

    return r
