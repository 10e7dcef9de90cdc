"""The HTTP app: the seeds' ``/generate``, OpenAI-shaped completions and chat completions, models, health.

Every request that runs the model goes through one admission gate (``max_batch + max_queue`` requests at
once; more get 429, and 503 while shutting down or after the model worker failed) and becomes jobs for the
model worker (``worker.py``). Errors are JSON ``{"error": {"message", "type", "param", "code"}}``; request
validation errors are 400s that name the field.

Length units: for a flat LM, ``max_tokens`` counts its tokenizer's tokens (bytes for a byte LM); for a
sentence-step run a token is a sentence, so ``max_tokens`` and the ``usage`` counts are sentences. The seeds'
``steps`` and ``max_sentences`` count sentences for both families: a flat LM writes until that many sentences
are complete (at most 256 tokens a sentence), an end-of-text token, or the ``--max-tokens`` cap.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import sentcode
from sentcode.infer.batch import BatchRequest
from sentcode.registry import family_of
from sentcode.serve.config import SENTENCE_CAP, ServeConfig
from sentcode.serve.schemas import (
    ChatRequest, CompletionRequest, DetokenizeRequest, GenerateRequest, TokenizeRequest,
)
from sentcode.serve.worker import (
    SENTENCE_BYTES, CallJob, Channel, Done, Failed, FlatJob, Piece, Result, SentenceJob, Worker,
)

DEFAULT_FLAT_TOKENS = 256
DEFAULT_SENTENCES = 3
# Special tokens as text (the names ``sentcode.infer.scoring.token_text`` gives them). A prompt may start with
# the end-of-text token, by id or by name: it marks the document start the server otherwise adds itself.
SPECIAL_NAMES = ("<|bos|>", "<|eos|>", "<|pad|>")
EOS_NAME = SPECIAL_NAMES[1]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _param(loc) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    kind, param = err.get("type", "invalid"), _param(err.get("loc", ()))
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"malformed JSON body: {detail}".rstrip(": "), None, "json_invalid")
    if param is None:
        if kind == "missing":
            return ApiError(400, "the request needs a JSON object body", None, "missing_body")
        return ApiError(400, "the request body must be a JSON object", None, kind)
    if kind == "missing":
        return ApiError(400, f"missing required field '{param}'", param, "missing")
    if kind == "extra_forbidden":
        return ApiError(400, f"unknown field '{param}'", param, "unknown_field")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(400, f"invalid '{param}': {msg}", param, kind)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 (by its Content-Length before anything
    is read, or once a chunked body passes the limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.limit:
            return await self._refuse(send)
        seen, started = 0, False

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"request body is larger than {self.limit} bytes (--max-body-bytes)",
                                     "invalid_request_error", None, "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class JsonBody:
    """ASGI middleware: every request body is read as JSON, whatever its Content-Type says (clients often send
    JSON as text/plain or form-encoded); a body that is not JSON still gets the usual 400."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        return await self.app(scope, receive, send)


class ClientGone(Exception):
    pass


async def _disconnected(receive) -> None:
    while True:
        if (await receive())["type"] == "http.disconnect":
            return


async def next_item(channel: Channel, gone: asyncio.Task):
    """The worker's next message for this request, or ClientGone as soon as the client disconnects."""
    get = asyncio.ensure_future(channel.get())
    done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    raise ClientGone


class EventStream(Response):
    """Server-sent events from an async iterator of ``data:`` payloads. When the client goes away the
    iterator is abandoned at once and ``on_close`` runs (it cancels the jobs and frees the request's slot)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close):
        # Not Response.__init__: it would declare a Content-Length for the empty body.
        self.status_code, self.background = 200, None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.events, self.on_close = events, on_close

    async def __call__(self, scope, receive, send):
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while True:
                nxt = asyncio.ensure_future(self.events.__anext__())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                try:
                    payload = nxt.result()
                except StopAsyncIteration:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                await send({"type": "http.response.body", "body": f"data: {payload}\n\n".encode(), "more_body": True})
        except OSError:  # the client went away while we were writing
            pass
        finally:
            gone.cancel()
            self.on_close()


def sse(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def sse_failure(item) -> str:
    """The error event that ends a stream whose request failed after its first chunk was sent."""
    return sse(error_body(item.message, "server_error" if item.status >= 500 else "invalid_request_error",
                          item.param, item.code))


# ---- state shared by the routes ------------------------------------------------------------------------------


class Ticket:
    """One admitted request; ``release`` is idempotent."""

    def __init__(self, state: "State"):
        self.state, self.jobs, self.open = state, [], True

    def release(self) -> None:
        for job in self.jobs:
            job.cancel()
        if self.open:
            self.open = False
            self.state.in_flight -= 1


class State:
    def __init__(self, gen, cfg: ServeConfig, worker: Worker):
        self.gen, self.cfg, self.worker = gen, cfg, worker
        fam = family_of(gen)
        self.family, self.label, self.by_sentence = fam.name, fam.label, fam.steps_by_sentence
        self.unit = fam.unit  # what max_tokens counts
        self.name = cfg.model_name or (gen.run_dir.name if getattr(gen, "run_dir", None) else "sentcode")
        self.created = int(time.time())
        self.capacity = worker.slots + cfg.max_queue
        self.in_flight = 0
        self.closing = False

    # ---- admission -------------------------------------------------------------------------------------------

    def admit(self) -> Ticket:
        if self.closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.worker.failed:
            raise ApiError(503, f"the model worker has failed ({self.worker.failed}); restart the server",
                           code="worker_failed")
        if self.in_flight >= self.capacity:
            raise ApiError(429, f"too many requests: {self.in_flight} are being served or queued (limit "
                           f"{self.capacity} = --max-batch + --max-queue); retry later", code="queue_full",
                           type_="rate_limit_error", headers={"retry-after": "1"})
        self.in_flight += 1
        return Ticket(self)

    def submit(self, ticket: Ticket, job) -> None:
        ticket.jobs.append(job)
        self.worker.submit(job)

    # ---- request pieces ----------------------------------------------------------------------------------------

    def check_prompt_size(self, text: str, param: str = "prompt") -> None:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # JSON can carry a lone surrogate ("\ud800"), which is not text
            raise ApiError(400, f"{param} is not valid Unicode (a lone surrogate at character {e.start})",
                           param, "invalid_text") from None
        if size > self.cfg.max_prompt_bytes:
            raise ApiError(400, f"{param} is {size} bytes; the limit is {self.cfg.max_prompt_bytes} "
                           "(--max-prompt-bytes)", param, "prompt_too_long")

    def length_cap(self) -> int:
        return self.cfg.max_tokens if not self.by_sentence else min(self.cfg.max_tokens, SENTENCE_CAP)

    def max_tokens(self, value: int | None, param: str = "max_tokens") -> int:
        if value is None:
            return min(DEFAULT_FLAT_TOKENS if not self.by_sentence else DEFAULT_SENTENCES, self.length_cap())
        if value > self.length_cap():
            raise ApiError(400, f"invalid '{param}': at most {self.length_cap()} {self.unit} per request on this server",
                           param, "max_tokens_too_large")
        return value

    def prompt(self, item: str | list[int], param: str = "prompt", generate: bool = True,
               score: bool = False) -> "Prompt":
        """A prompt as the model reads it. ``generate``: it must fit the context; ``score``: token ids must be
        the tokenizer's own encoding of their text (per-token log-probs are computed from the text)."""
        if isinstance(item, str):
            self.check_prompt_size(item, param)
        elif len(item) > self.cfg.max_prompt_bytes:
            raise ApiError(400, f"{param} is {len(item)} tokens; the limit is {self.cfg.max_prompt_bytes} "
                           "(--max-prompt-bytes)", param, "prompt_too_long")
        if self.by_sentence:
            if not isinstance(item, str):
                raise ApiError(400, "token-id prompts need a flat LM run; send text", param, "unsupported")
            return Prompt(item, item, None, False, len(self.gen.split(item)) if item.strip() else 0)
        tok = self.gen.tokenizer
        if isinstance(item, str):
            lead = item.startswith(EOS_NAME)
            data = item[len(EOS_NAME):] if lead else item
            rest = tok.encode(data)
            text = item
        else:
            if any(not 0 <= t < tok.vocab_size for t in item):
                raise ApiError(400, f"invalid '{param}': token ids must lie in [0, {tok.vocab_size})", param,
                               "invalid_token")
            lead = bool(item) and item[0] == tok.eos_id
            rest = item[1:] if lead else list(item)
            if any(t in tok.special_ids for t in rest):
                raise ApiError(400, f"invalid '{param}': a special token other than a leading {EOS_NAME}", param,
                               "invalid_token")
            data = tok.decode(rest)
            if score and tok.encode(data) != rest:
                raise ApiError(400, f"invalid '{param}': per-token log-probs need the tokenizer's own encoding of "
                               "the text (these ids tokenize it differently); send the text instead", param,
                               "non_canonical_tokens")
            text = (EOS_NAME if lead else "") + data.decode("utf-8", "replace")
        ids = [tok.eos_id] + rest  # the end-of-text token marks a document start, as in training
        if generate and len(ids) > self.gen.context:
            raise ApiError(400, f"{param} is {len(ids) - 1} tokens but the model's context is {self.gen.context - 1}; "
                           "shorten it", param, "context_length_exceeded")
        return Prompt(text, data, ids, lead, len(rest) + lead)

    def generation_job(self, channel: Channel, prompt: "Prompt", n: int, *, temperature: float, top_p, top_k, seed,
                       stops=(), logprobs: int | None = None, sentences: int | None = None, rerank: int | None = None,
                       sep_first: bool = True, index: int = 0):
        if not self.by_sentence:
            req = BatchRequest(prompt.ids, n, temperature=temperature, top_k=top_k or None,
                               top_p=None if top_p is None or top_p >= 1 else top_p, seed=seed,
                               stop_ids=(self.gen.tokenizer.eos_id,), logprobs=logprobs)
            return FlatJob(channel, req, self.gen.tokenizer, prompt.tokens, stops, sentences, index)
        kwargs = dict(max_sentences=n, rerank=rerank, temperature=temperature, seed=seed, top_k=top_k or None,
                      top_p=None if top_p is None or top_p >= 1 else top_p)
        text = prompt.data
        return SentenceJob(channel, text, kwargs, prompt.tokens, stops,
                           sep_first and bool(text) and not text[-1].isspace(), index)


@dataclass
class Prompt:
    text: str  # as echoed back
    data: str | bytes  # what the model continues and scores: the text after an explicit document-start token
    ids: list[int] | None  # flat LM: the document-start token, then the prompt's tokens
    lead: bool  # the prompt began with an explicit document-start token (how lm-eval marks a document start)
    tokens: int  # prompt tokens (sentences for a sentence run) for usage

    def echo_rows(self, rows: list[dict]) -> list[dict]:
        """Scoring rows of ``data`` as rows of ``text``: an explicit document-start token comes first, with no
        log-prob (nothing predicts it), and shifts the offsets."""
        if not self.lead:
            return rows
        n = len(EOS_NAME)
        return [{"token": EOS_NAME, "logprob": None, "top": {}, "offset": 0}] + \
            [{**r, "offset": r["offset"] + n} for r in rows]


def _failure(item: Failed) -> ApiError:
    return ApiError(item.status, item.message, item.param, item.code)


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


# ---- the app -------------------------------------------------------------------------------------------------


def build_app(gen, cfg: ServeConfig | None = None, worker: Worker | None = None) -> FastAPI:
    """The FastAPI app serving ``gen`` (what ``sentcode.load`` returned). Starts the model worker."""
    cfg = cfg or ServeConfig()
    cfg.check()
    worker = worker or Worker(gen, cfg.max_batch).start()
    st = State(gen, cfg, worker)
    unit = st.unit
    app = FastAPI(
        title="sentcode", version=sentcode.__version__,
        description=f"Serving `{st.name}` ({st.label}). "
                    f"`max_tokens` counts {unit}. Errors: "
                    '`{"error": {"message", "type", "param", "code"}}`.',
    )
    app.state.sentcode = st
    app.add_middleware(JsonBody)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, None, str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None, "internal_error"),
                            status_code=500)

    # ---- plumbing shared by the generation routes ---------------------------------------------------------------

    async def collect(channel: Channel, request: Request, expect: dict[int, set]) -> dict:
        """Wait for every job of a request. ``expect``: index -> {"result", "done"} still to come.
        Returns index -> {"text", "tokens", "result", "done"}."""
        out = {i: {"text": "", "pieces": [], "tokens": [], "result": None, "done": None} for i in expect}
        gone = asyncio.create_task(_disconnected(request.receive))
        try:
            while any(expect.values()):
                item = await next_item(channel, gone)
                if isinstance(item, Failed):
                    raise _failure(item)
                slot = out[item.index]
                if isinstance(item, Piece):
                    slot["text"] += item.text
                    slot["pieces"].append(item.text)
                    slot["tokens"] += item.tokens
                elif isinstance(item, Result):
                    slot["result"] = item.value
                    expect[item.index].discard("result")
                elif isinstance(item, Done):
                    slot["done"] = item
                    expect[item.index].discard("done")
            return out
        finally:
            gone.cancel()

    async def first_item(channel: Channel, request: Request):
        """Wait for the first message before a stream starts, so that a refusal is still a proper status."""
        gone = asyncio.create_task(_disconnected(request.receive))
        try:
            item = await next_item(channel, gone)
        finally:
            gone.cancel()
        if isinstance(item, Failed):
            raise _failure(item)
        return item

    async def run(ticket_fn, request: Request):
        """Admit, run ``ticket_fn(ticket)`` and release; a vanished client ends with nothing sent."""
        ticket = st.admit()
        streaming = False
        try:
            resp = await ticket_fn(ticket)
            streaming = isinstance(resp, EventStream)
            return resp
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:
                ticket.release()

    # ---- routes ---------------------------------------------------------------------------------------------

    @app.get("/health", summary="liveness, model and load")
    async def health():
        status = "failed" if worker.failed else ("shutting_down" if st.closing else "ok")
        body = {"status": status, "model": st.name, "family": st.family, "in_flight": st.in_flight,
                "capacity": st.capacity, **worker.counts()}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models", summary="the one model this server serves")
    async def models():
        card = {"id": st.name, "object": "model", "created": st.created, "owned_by": "sentcode",
                "family": st.family, "max_tokens": st.length_cap(), "token_unit": unit}
        if not st.by_sentence:
            card["context"] = gen.context
        return {"object": "list", "data": [card]}

    # ---- the tokenizer, in vLLM's shape: lm-eval's local-completions finds these and tokenizes through them ----

    special = re.compile("|".join(re.escape(n) for n in SPECIAL_NAMES))

    def flat_tokenizer():
        if st.by_sentence:
            raise ApiError(400, "a sentence-step run has no token vocabulary (it reads and writes text)", None,
                           "unsupported")
        return gen.tokenizer

    @app.get("/tokenizer_info", summary="the flat LM's tokenizer: special tokens and context")
    async def tokenizer_info():
        tok = flat_tokenizer()
        # No bos_token: a document starts with the end-of-text token, so that is what a client should prefix.
        return {"tokenizer_class": f"sentcode-{tok.kind}", "eos_token": EOS_NAME, "bos_token": None,
                "pad_token": SPECIAL_NAMES[2], "model_max_length": gen.context, "vocab_size": tok.vocab_size,
                "chat_template": None}

    @app.post("/tokenize", summary="text -> token ids (special token names become their ids)")
    async def tokenize(body: TokenizeRequest):
        tok = flat_tokenizer()
        st.check_prompt_size(body.prompt)
        ids, pos = ([tok.eos_id] if body.add_special_tokens else []), 0
        for m in special.finditer(body.prompt):
            ids += tok.encode(body.prompt[pos : m.start()]) + [tok.special_ids[SPECIAL_NAMES.index(m.group())]]
            pos = m.end()
        ids += tok.encode(body.prompt[pos:])
        return {"tokens": ids, "count": len(ids), "max_model_len": gen.context}

    @app.post("/detokenize", summary="token ids -> text (special tokens as their names, invalid UTF-8 as U+FFFD)")
    async def detokenize(body: DetokenizeRequest):
        tok = flat_tokenizer()
        if any(not 0 <= t < tok.vocab_size for t in body.tokens):
            raise ApiError(400, f"invalid 'tokens': token ids must lie in [0, {tok.vocab_size})", "tokens",
                           "invalid_token")
        text, run = "", []
        for t in body.tokens + [None]:
            if t is None or t in tok.special_ids:
                text += tok.decode(run).decode("utf-8", "replace")
                run = []
                if t is not None:
                    text += SPECIAL_NAMES[tok.special_ids.index(t)]
            else:
                run.append(t)
        return {"prompt": text}

    @app.post("/generate", summary="the seeds' body: {prompt, steps, sample, temperature} or "
              "{prompt, max_sentences, params: {rerank}}")
    async def generate(body: GenerateRequest, request: Request):
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

        return await run(go, request)

    @app.post("/v1/completions", summary="OpenAI completions (legacy): echo and logprobs for scoring, SSE streaming")
    async def completions(body: CompletionRequest, request: Request):
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
                left = {i for i, e in expect.items() if e}
                item = pending_first
                while left:
                    if item is None:
                        item = await channel.get()
                    if isinstance(item, Failed):
                        yield sse_failure(item)
                        break
                    if isinstance(item, Piece):
                        lp = None if body.logprobs is None else _completion_logprobs(item.tokens, offsets[item.index])
                        yield chunk(item.index, item.text, lp)
                    elif isinstance(item, Done):
                        usage[1] += item.completion_tokens
                        left.discard(item.index)
                        yield chunk(item.index, "", None, item.finish_reason)
                    item = None
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": st.name,
                               "choices": [], "usage": _usage(*usage)})
                yield "[DONE]"

            return EventStream(events(), ticket.release)

        return await run(go, request)

    @app.post("/v1/chat/completions", summary="OpenAI chat completions; the messages' texts are joined into one prompt")
    async def chat(body: ChatRequest, request: Request):
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

            async def events():
                yield chunk({"role": "assistant", "content": ""})
                item = first
                while True:
                    if item is None:
                        item = await channel.get()
                    if isinstance(item, Failed):
                        yield sse_failure(item)
                        break
                    if isinstance(item, Piece):
                        lp = {"content": _chat_logprobs(item.tokens)} if body.logprobs else None
                        yield chunk({"content": item.text}, None, lp)
                    elif isinstance(item, Done):
                        yield chunk({}, item.finish_reason)
                        if include_usage:
                            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                       "model": st.name, "choices": [],
                                       "usage": _usage(item.prompt_tokens, item.completion_tokens)})
                        break
                    item = None
                yield "[DONE]"

            return EventStream(events(), ticket.release)

        return await run(go, request)

    return app


def _score(gen, text: str, top: int) -> list[dict]:
    from sentcode.infer.scoring import token_logprobs

    return token_logprobs(gen, text, top=top)


def chat_prompt(contents: list[str], by_sentence: bool) -> str:
    """The prompt a base model continues: the messages' texts joined by single spaces (these models have
    no chat template). A flat LM gets a trailing space, so that the reply starts a new word."""
    text = " ".join(c.strip() for c in contents if c and c.strip())
    return text + " " if not by_sentence and text else text
