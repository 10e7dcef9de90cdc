"""What the routes share: the models a server serves (``Served``), each model's state and admission, and a
prompt as the model reads it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response

from sentcode.infer.batch import BatchRequest
from sentcode.infer.scoring import SPECIAL_NAMES
from sentcode.registry import family_of
from sentcode.runs.weights import newer_than_weights
from sentcode.serve.config import SENTENCE_CAP, ServeConfig
from sentcode.serve.errors import ApiError
from sentcode.serve.streaming import ClientGone, EventStream
from sentcode.serve.worker import Channel, FlatJob, SentenceJob, Worker

DEFAULT_FLAT_TOKENS = 256
DEFAULT_SENTENCES = 3
# A prompt may start with the end-of-text token, by id or by name (``SPECIAL_NAMES``, as ``token_text`` names
# them): it marks the document start the server otherwise adds itself.
EOS_NAME = SPECIAL_NAMES[1]


class Ticket:
    """One admitted request; ``release`` is idempotent."""

    def __init__(self, state: "ModelState"):
        self.state, self.jobs, self.open = state, [], True

    def release(self) -> None:
        for job in self.jobs:
            job.cancel()
        if self.open:
            self.open = False
            self.state.in_flight -= 1


class ModelState:
    """One served model: its generator and worker once loaded, its admission count, and the request pieces that
    depend on its family. ``gen`` is None while the run is loading (``failed``: why it could not be loaded)."""

    def __init__(self, name: str, cfg: ServeConfig, gen=None, worker: Worker | None = None):
        self.name, self.cfg = name, cfg
        self.gen = self.worker = None
        self.failed: str | None = None
        self.created = int(time.time())
        self.in_flight = 0
        self.closing = False
        if gen is not None:
            self.ready(gen, worker)

    def ready(self, gen, worker: Worker | None = None) -> None:
        """The run has loaded: start its worker and take requests."""
        fam = family_of(gen)
        self.family, self.label, self.by_sentence = fam.name, fam.label, fam.steps_by_sentence
        self.unit = fam.unit  # what max_tokens counts
        self.worker = worker or Worker(gen, self.cfg.max_batch).start()
        self.capacity = self.worker.slots + self.cfg.max_queue
        self.facts = self._facts(gen)  # the card's figures, read once: /v1/models is polled while runs load
        self.gen = gen

    @property
    def status(self) -> str:
        if self.failed or (self.worker is not None and self.worker.failed):
            return "failed"
        return "loading" if self.gen is None else ("shutting_down" if self.closing else "ok")

    # ---- admission -------------------------------------------------------------------------------------------

    def admit(self) -> Ticket:
        self.require_ready()
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

    def require_ready(self) -> None:
        if self.failed:
            raise ApiError(503, f"model '{self.name}' could not be loaded: {self.failed}", "model", "load_failed")
        if self.gen is None:
            raise ApiError(503, f"model '{self.name}' is still loading; retry in a moment", "model", "loading",
                           headers={"retry-after": "2"})

    def submit(self, ticket: Ticket, job) -> None:
        ticket.jobs.append(job)
        self.worker.submit(job)

    async def run(self, ticket_fn, request: Request):
        """Admit, run ``ticket_fn(ticket)`` and release; a vanished client ends with nothing sent."""
        ticket = self.admit()
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

    def card(self) -> dict:
        """What /v1/models says of this model (the page's model card)."""
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "sentcode",
                "status": self.status}
        if self.gen is None:
            return {**card, "error": self.failed} if self.failed else card
        return {**card, **self.facts}

    def _facts(self, gen) -> dict:
        facts = dict(family=self.family, label=self.label, max_tokens=self.length_cap(), token_unit=self.unit,
                     parameters=_parameters(gen), heldout=heldout_bpb(getattr(gen, "run_dir", None)),
                     backend="onnx" if type(getattr(gen, "model", None)).__name__ == "OnnxLM" else "torch")
        if not self.by_sentence:
            tok = gen.tokenizer
            facts.update(context=gen.context, tokenizer={"kind": tok.kind, "vocab_size": tok.vocab_size})
        else:
            facts.update(tokenizer={"kind": "bytes", "vocab_size": 256}, plan=hasattr(gen, "stream_plan"),
                         codes=bool(getattr(gen, "codes", True)))  # the staged recipe always plans codes
        return facts

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


class Served:
    """Every model a server serves, by name, in the order given; a request's ``model`` field picks one."""

    def __init__(self, states: list[ModelState]):
        names = [s.name for s in states]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            from sentcode.errors import SentcodeError

            raise SentcodeError(f"two runs would both be served as '{dup}': give each its own name (--model-name)")
        self.states = {s.name: s for s in states}

    @property
    def names(self) -> list[str]:
        return list(self.states)

    def pick(self, name: str | None, param: str = "model") -> ModelState:
        """The model a request names (none named: the only one served), ready to take it."""
        st = self.get(name, param)
        st.require_ready()
        return st

    def get(self, name: str | None, param: str = "model") -> ModelState:
        served = ", ".join(repr(n) for n in self.states)
        if name is None:
            if len(self.states) == 1:
                return next(iter(self.states.values()))
            raise ApiError(400, f"missing required field '{param}': this server serves {served}", param, "missing")
        st = self.states.get(name)
        if st is None:
            raise ApiError(400, f"unknown model {name!r} in '{param}': this server serves {served}", param,
                           "model_not_found")
        return st

    def stop(self) -> None:
        """Refuse new requests on every model; requests being generated finish."""
        for st in self.states.values():
            st.closing = True
            if st.worker is not None:
                st.worker.stop()


def _parameters(gen) -> int | None:
    params = getattr(getattr(gen, "model", None), "parameters", None)
    return sum(p.numel() for p in params()) if callable(params) else None


def heldout_bpb(run_dir) -> dict | None:
    """The run's held-out bits per byte as its training left it: the test split's (``eval.json``, no older than the
    run's weights), else the last validation figure of the training loop."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    # the family's own evaluation, the staged recipe's eval stage, the demo's test pass
    for path in (run_dir / "eval.json", run_dir / "eval" / "eval.json", run_dir / "demo.json"):
        if not newer_than_weights(path, run_dir):
            continue
        try:
            return {"bpb": float(json.loads(path.read_text())["bpb"]), "split": "test"}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    try:
        summary = json.loads((run_dir / "train_summary.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("final_eval", "last_eval"):
        ev = summary.get(key) or {}
        if isinstance(ev.get("bpb"), (int, float)):
            return {"bpb": float(ev["bpb"]), "split": "validation"}
    return None
