"""Routes about the models rather than their text: health, the model list (with each model's card), and the flat
LM's tokenizer in vLLM's shape (lm-eval's local-completions finds these and tokenizes through them)."""

from __future__ import annotations

import re

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from sentcode.serve.errors import ApiError
from sentcode.serve.schemas import DetokenizeRequest, TokenizeRequest
from sentcode.serve.state import EOS_NAME, SPECIAL_NAMES, ModelState, Served

_SPECIAL = re.compile("|".join(re.escape(n) for n in SPECIAL_NAMES))


def _flat_tokenizer(st: ModelState):
    if st.by_sentence:
        raise ApiError(400, f"model '{st.name}' is a sentence-step run: it has no token vocabulary (it reads and "
                       "writes text)", None, "unsupported")
    return st.gen.tokenizer


def _health(st: ModelState) -> dict:
    counts = st.worker.counts() if st.worker is not None else {"active": 0, "waiting": 0}
    return {"model": st.name, "status": st.status, "family": getattr(st, "family", None), "in_flight": st.in_flight,
            "capacity": getattr(st, "capacity", 0), **counts}


def routes(served: Served) -> APIRouter:
    r = APIRouter()

    @r.get("/health", summary="liveness and load, of every model served")
    async def health():
        models = [_health(st) for st in served.states.values()]
        worst = next((s for s in ("failed", "loading", "shutting_down") if any(m["status"] == s for m in models)), "ok")
        body = {"status": worst, **{k: sum(m[k] for m in models) for k in ("in_flight", "capacity", "active",
                                                                            "waiting")}, "models": models}
        if len(models) == 1:
            body.update(model=models[0]["model"], family=models[0]["family"])
        return JSONResponse(body, status_code=200 if worst == "ok" else 503)

    @r.get("/v1/models", summary="the models this server serves, each with its card")
    async def models():
        return {"object": "list", "data": [st.card() for st in served.states.values()]}

    @r.get("/tokenizer_info", summary="a flat LM's tokenizer: special tokens and context (?model=NAME)")
    async def tokenizer_info(model: str | None = None):
        st = served.pick(model)
        tok = _flat_tokenizer(st)
        # No bos_token: a document starts with the end-of-text token, so that is what a client should prefix.
        return {"tokenizer_class": f"sentcode-{tok.kind}", "eos_token": EOS_NAME, "bos_token": None,
                "pad_token": SPECIAL_NAMES[2], "model_max_length": st.gen.context, "vocab_size": tok.vocab_size,
                "chat_template": None}

    @r.post("/tokenize", summary="text -> token ids (special token names become their ids)")
    async def tokenize(body: TokenizeRequest):
        st = served.pick(body.model)
        tok = _flat_tokenizer(st)
        st.check_prompt_size(body.prompt)
        ids, pos = ([tok.eos_id] if body.add_special_tokens else []), 0
        for m in _SPECIAL.finditer(body.prompt):
            ids += tok.encode(body.prompt[pos: m.start()]) + [tok.special_ids[SPECIAL_NAMES.index(m.group())]]
            pos = m.end()
        ids += tok.encode(body.prompt[pos:])
        return {"tokens": ids, "count": len(ids), "max_model_len": st.gen.context}

    @r.post("/detokenize", summary="token ids -> text (special tokens as their names, invalid UTF-8 as U+FFFD)")
    async def detokenize(body: DetokenizeRequest):
        tok = _flat_tokenizer(served.pick(body.model))
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

    return r
