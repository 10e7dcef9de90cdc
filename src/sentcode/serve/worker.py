"""The model worker: one thread owns the model; HTTP handlers talk to it through jobs.

A handler builds a job, submits it, and reads what the worker sends back on the job's channel (pieces of
text, then ``Done``; or ``Failed``). The worker never blocks on a client, and a handler never touches the
model, so the event loop stays free to accept, refuse and stream while the model computes.

- Flat LM: generation jobs become rows of a ``BatchDecoder`` (continuous batching): the worker admits
  waiting jobs whenever rows are free, runs one decode step for all rows, and routes each row's token to its
  job, which turns tokens into text (UTF-8 pieces, stop strings, a sentence count) and sends it on.
- Sentence-step run: one request at a time; cancellation is checked between sentences.
- ``CallJob``: any other work on the model (per-token log-probs of a prompt), run between decode steps.

A client that goes away cancels its job: the row leaves the batch at the next step boundary. An exception
from the model fails the requests of that step with a 500 and resets the batch; the worker carries on.
"""

from __future__ import annotations

import codecs
import logging
import queue
import re
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from sentcode.errors import SentcodeError
from sentcode.infer.batch import BatchDecoder, BatchRequest, TokenEvent
from sentcode.registry import family_of

log = logging.getLogger("sentcode.serve")

# A flat LM's "sentence" for the seeds' /generate bodies is capped at this many bytes (as the sentence
# pipeline cuts long sentences), which also bounds the tokens a sentence request may take.
SENTENCE_BYTES = 256
_SENTENCE_END = re.compile(r"[.!?\u2026][\"')\]\u201d\u2019]*\s")


# ---- what the worker sends back ------------------------------------------------------------------------------


@dataclass
class TokenInfo:
    token: str  # the token's text (see ``sentcode.infer.scoring.token_text``)
    offset: int  # character offset of its text in the completion
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class Piece:
    index: int
    text: str
    tokens: list[TokenInfo] = field(default_factory=list)


@dataclass
class Done:
    index: int
    finish_reason: str  # "stop" (end of text, a stop string, the sentence count) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Result:
    index: int
    value: Any


@dataclass
class Failed:
    index: int
    status: int
    message: str
    code: str
    param: str | None = None


class Channel:
    """Worker thread -> event loop. ``put`` may be called from any thread."""

    def __init__(self, loop):
        import asyncio

        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    async def get(self):
        return await self.queue.get()


# ---- text from tokens ----------------------------------------------------------------------------------------


class TextAssembler:
    """Turns a token stream into text that is safe to send: whole UTF-8 characters (invalid bytes become
    U+FFFD, as in ``FlatGenerator.stream``), cut before the first stop string, never sending text that could
    still turn out to be the start of a stop string; optionally cut after ``sentences`` sentences."""

    def __init__(self, tokenizer=None, stops: tuple[str, ...] = (), sentences: int | None = None,
                 hold_all: bool = False):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops or () if s)
        self.sentences = sentences
        # Send nothing before the end when a sentence count may still cut the text: the splitter can place a
        # boundary only once it sees what follows.
        self.hold_all = hold_all or sentences is not None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0  # characters of self.text already sent
        self.tokens: list[TokenInfo] = []  # not yet sent
        self.finished = False  # a stop string or the sentence count ended the text

    def feed_token(self, token_id: int, logprob: float | None = None, top: dict[str, float] | None = None) -> None:
        if self.finished:
            return
        from sentcode.infer.scoring import token_text

        self.tokens.append(TokenInfo(token_text(self.tokenizer, token_id), len(self.text), logprob, top))
        self._grow(self.decoder.decode(self.tokenizer.decode([token_id])))

    def feed_text(self, text: str) -> None:
        if not self.finished:
            self._grow(text)

    def _grow(self, new: str) -> None:
        self.text += new
        if self.stops:
            hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.finished = self.text[: min(hits)], True
        if self.sentences is not None and not self.finished and _SENTENCE_END.search(self.text[-len(new) - 4 :]):
            self._cut_sentences()

    def _cut_sentences(self) -> None:
        from sentcode.corpus.sentences import split_sentences

        found = split_sentences(self.text, SENTENCE_BYTES)
        if len(found) <= self.sentences:
            return
        pos = 0
        for s in found[: self.sentences]:
            i = self.text.find(s, pos)
            if i < 0:  # the splitter changed the text (it should not): keep its sentences
                self.text = " ".join(found[: self.sentences])
                break
            pos = i + len(s)
        else:
            self.text = self.text[:pos]
        self.finished = True

    def _held(self) -> int:
        """Characters at the end that could be the start of a stop string."""
        tail = self.text[self.sent :]
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best

    def take(self, final: bool = False) -> tuple[str, list[TokenInfo]]:
        """Text (and its tokens) that can be sent now; with ``final``, everything that is left."""
        if final and not self.finished:
            self._grow(self.decoder.decode(b"", final=True))
        if self.hold_all and not final:
            return "", []
        end = len(self.text) if (final or self.finished) else len(self.text) - self._held()
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        if final:  # tokens past a cut are not part of the completion
            tokens = [t for t in self.tokens if t.offset < len(self.text)] if self.finished else self.tokens
            self.tokens = []
        else:
            tokens = [t for t in self.tokens if t.offset < end]
            self.tokens = self.tokens[len(tokens) :]
        return piece, tokens


# ---- jobs ----------------------------------------------------------------------------------------------------


class Job:
    def __init__(self, channel: Channel, index: int = 0):
        self.channel, self.index = channel, index
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def fail(self, status: int, message: str, code: str, param: str | None = None) -> None:
        self.channel.put(Failed(self.index, status, message, code, param))

    def guarded(self, body: Callable[[], None], what: str, param: str | None = None) -> bool:
        """Run ``body``; a SentcodeError fails the request with a 400 (about ``param``), anything else (a bug, a
        model failure) with a 500, and the server stays up. True when ``body`` finished."""
        try:
            body()
            return True
        except SentcodeError as e:
            self.fail(400, str(e), "invalid_request", param)
        except Exception as e:
            log.error("%s failed:\n%s", what, traceback.format_exc())
            self.fail(500, f"model error: {type(e).__name__}: {e}", "model_error")
        return False


class CallJob(Job):
    """Run ``fn(gen)`` on the worker thread and send its result."""

    def __init__(self, channel: Channel, fn: Callable, index: int = 0, param: str | None = None):
        super().__init__(channel, index)
        self.fn, self.param = fn, param  # param: the request field a SentcodeError is about

    def run(self, gen) -> None:
        self.guarded(lambda: self.channel.put(Result(self.index, self.fn(gen))), "model call", self.param)


class FlatJob(Job):
    """One flat-LM generation: a batch row whose tokens become text."""

    def __init__(self, channel: Channel, request: BatchRequest, tokenizer, prompt_tokens: int,
                 stops: tuple[str, ...] = (), sentences: int | None = None, index: int = 0):
        super().__init__(channel, index)
        self.request, self.tokenizer, self.prompt_tokens = request, tokenizer, prompt_tokens
        self.text = TextAssembler(tokenizer, stops, sentences)
        self.generated = 0

    def on_token(self, ev: TokenEvent) -> bool:
        """Route one token; True when this job is over (its row must leave the batch if it has not)."""
        self.generated += 1
        if ev.token == self.tokenizer.eos_id:
            self.finish("stop")
            return True
        top = None
        if ev.top is not None:
            from sentcode.infer.scoring import token_text

            top = {}
            for t, lp in ev.top:
                top.setdefault(token_text(self.tokenizer, t), lp)
        self.text.feed_token(ev.token, ev.logprob, top)
        if self.text.finished:
            self.finish("stop")
            return True
        piece, tokens = self.text.take()
        if piece or tokens:
            self.channel.put(Piece(self.index, piece, tokens))
        if ev.done:
            self.finish("length")
            return True
        return False

    def finish(self, reason: str) -> None:
        piece, tokens = self.text.take(final=True)
        if piece or tokens:
            self.channel.put(Piece(self.index, piece, tokens))
        self.channel.put(Done(self.index, reason, self.prompt_tokens, self.generated))


class SentenceJob(Job):
    """One sentence-step generation; ``kwargs`` go to ``SentenceGenerator.stream``."""

    def __init__(self, channel: Channel, prompt: str, kwargs: dict, prompt_tokens: int,
                 stops: tuple[str, ...] = (), sep_first: bool = True, index: int = 0):
        super().__init__(channel, index)
        self.prompt, self.kwargs, self.prompt_tokens = prompt, kwargs, prompt_tokens
        self.text = TextAssembler(stops=stops)
        self.sep_first = sep_first  # start with a space, so that prompt + completion reads as text

    def run(self, gen) -> None:
        self.n = 0
        if not self.guarded(lambda: self._write(gen), "sentence generation") or self.cancelled.is_set():
            return
        piece, _ = self.text.take(final=True)
        if piece:
            self.channel.put(Piece(self.index, piece))
        full = self.n >= self.kwargs["max_sentences"] and not self.text.finished
        self.channel.put(Done(self.index, "length" if full else "stop", self.prompt_tokens, self.n))

    def _write(self, gen) -> None:
        for sentence in gen.stream(self.prompt, **self.kwargs):
            if self.cancelled.is_set():
                return
            sep = getattr(gen, "separator", " ")
            self.text.feed_text((sep if self.n or self.sep_first else "") + sentence)
            self.n += 1
            piece, _ = self.text.take(final=self.text.finished)
            if piece:
                self.channel.put(Piece(self.index, piece))
            if self.text.finished:
                return


class PlanJob(Job):
    """A sentence-step or autoencoder run writing with ``stream_plan``: one ``Result`` per segment (what it planned,
    wrote and chose), then, for an autoencoder, the codes of the whole text per level, then ``Done``."""

    def __init__(self, channel: Channel, prompt: str, kwargs: dict, prompt_tokens: int):
        super().__init__(channel)
        self.prompt, self.kwargs, self.prompt_tokens = prompt, kwargs, prompt_tokens

    def run(self, gen) -> None:
        self.n = 0
        if self.guarded(lambda: self._write(gen), "plan generation") and not self.cancelled.is_set():
            full = self.n >= self.kwargs["max_sentences"]
            self.channel.put(Done(self.index, "length" if full else "stop", self.prompt_tokens, self.n))

    def _write(self, gen) -> None:
        text = ""
        for seg in gen.stream_plan(self.prompt, **self.kwargs):
            if self.cancelled.is_set():
                return
            self.channel.put(Result(self.index, {"segment": seg, "index": self.n}))
            text += seg["text"]
            self.n += 1
        if hasattr(gen, "encode") and text:  # an autoencoder: its segments and codes per level, of everything
            self.channel.put(Result(self.index, {"levels": gen.encode(self.prompt + text), "text": self.prompt + text}))


# ---- the worker thread ---------------------------------------------------------------------------------------


class Worker:
    """Owns ``gen`` (what ``sentcode.load`` returned) on one thread."""

    def __init__(self, gen, max_batch: int = 8):
        self.gen = gen
        self.by_sentence = family_of(gen).steps_by_sentence
        self.engine = None if self.by_sentence else BatchDecoder(gen.model, max_batch)
        self.inbox: queue.Queue = queue.Queue()
        self.pending: deque[FlatJob] = deque()  # flat jobs waiting for a free row
        self.active: dict[int, FlatJob] = {}  # batch handle -> job
        self.running: Job | None = None  # the sentence or call job being run
        self.failed: str | None = None
        self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._main, name="sentcode-model", daemon=True)

    @property
    def slots(self) -> int:
        """Requests served at once (the rest wait in the queue)."""
        return self.engine.max_batch if self.engine is not None else 1

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self.failed:
            job.fail(503, f"the model worker has failed ({self.failed}); restart the server", "worker_failed")
        elif self.stopping:
            job.fail(503, "the server is shutting down", "shutting_down")
        else:
            self.inbox.put(job)

    def stop(self) -> None:
        """Refuse new jobs and those not started; jobs already running finish."""
        self.stopping = True
        self.inbox.put(None)

    def counts(self) -> dict:
        if self.engine is not None:
            return {"active": len(self.active), "waiting": len(self.pending) + self.inbox.qsize()}
        return {"active": int(self.running is not None), "waiting": self.inbox.qsize()}

    # ---- loop --------------------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            if self.engine is not None:
                self._flat_loop()
            else:
                self._sentence_loop()
        except BaseException as e:  # a bug in the worker itself: refuse everything from now on
            self.failed = f"{type(e).__name__}: {e}"
            log.error("model worker failed:\n%s", traceback.format_exc())
            self._fail_all(503, f"the model worker has failed ({self.failed}); restart the server", "worker_failed")

    def _fail_all(self, status: int, message: str, code: str) -> None:
        jobs = list(self.active.values()) + list(self.pending)
        self.active.clear()
        self.pending.clear()
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                jobs.append(job)
        for job in jobs:
            job.fail(status, message, code)

    def _take(self, block: bool) -> list[Job]:
        jobs = []
        try:
            jobs.append(self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait())
            while True:
                jobs.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return [j for j in jobs if j is not None]

    def _refuse_not_started(self) -> None:
        for job in list(self.pending) + self._take(False):
            job.fail(503, "the server is shutting down", "shutting_down")
        self.pending.clear()

    def _sentence_loop(self) -> None:
        while True:
            if self.stopping:
                self._refuse_not_started()
                return
            for job in self._take(True):
                if self.stopping:
                    job.fail(503, "the server is shutting down", "shutting_down")
                    continue
                if job.cancelled.is_set():
                    continue
                self.running = job
                try:
                    job.run(self.gen)
                finally:
                    self.running = None

    def _flat_loop(self) -> None:
        eng = self.engine
        while True:
            if self.stopping:
                self._refuse_not_started()
                if not eng.busy:
                    return
            for job in self._take(block=not (eng.busy or self.pending)):
                if isinstance(job, CallJob):
                    if not job.cancelled.is_set():
                        job.run(self.gen)
                else:
                    self.pending.append(job)
            for handle, job in list(self.active.items()):
                if job.cancelled.is_set():
                    eng.cancel(handle)
                    del self.active[handle]
            while self.pending and eng.free > 0:
                job = self.pending.popleft()
                if job.cancelled.is_set():
                    continue
                try:
                    self.active[eng.add(job.request)] = job
                except SentcodeError as e:
                    job.fail(400, str(e), "invalid_request")
            if not eng.busy:
                continue
            try:
                events = eng.step()
            except Exception as e:  # the model failed: fail this step's requests, keep serving
                log.error("batched decoding failed:\n%s", traceback.format_exc())
                eng.reset()
                jobs, self.active = list(self.active.values()), {}
                for job in jobs:
                    job.fail(500, f"model error: {type(e).__name__}: {e}", "model_error")
                continue
            self.steps += 1
            for ev in events:
                job = self.active.get(ev.handle)
                if job is None:
                    continue
                if job.on_token(ev):
                    if not ev.done:
                        eng.cancel(ev.handle)
                    del self.active[ev.handle]
