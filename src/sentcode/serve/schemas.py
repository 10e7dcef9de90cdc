"""Request bodies of the HTTP server, validated strictly: a wrong type is an error, never silently coerced
("3" is not 3, true is not 1), and an unknown field is an error that names it (a typo such as
``max_token`` would otherwise be ignored without a word)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4  # as OpenAI
MAX_PROMPTS = 64  # prompts in one completions request
MAX_TOP_LOGPROBS = 20
SEED_MAX = 2**63 - 1


class Body(BaseModel):
    # allow_inf_nan: Python's JSON reader accepts NaN and Infinity; a sampling setting must be a finite number
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Body):
    include_usage: bool = Field(False, description="send a last chunk with token counts before [DONE]")


def _stops(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(s == "" for s in items):
        raise ValueError("a stop string must not be empty")
    return tuple(items)


class _Sampling(Body):
    model: str | None = Field(None, description="which served model (GET /v1/models); optional when one is served")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="sentcode extension: 0 or unset means no limit")
    stop: Any = Field(None, description="a string or up to 4 strings; the text ends before the first")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float = Field(0.0, ge=0, le=0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: only empty")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        return _stops(v)


class CompletionRequest(_Sampling):
    prompt: Any = Field(..., description="a string, a list of strings (one choice each), or token ids (a list of "
                        "ints, or a list of such lists; flat LM only)")
    max_tokens: int | None = Field(None, ge=0, description="flat LM: tokens; sentence-step run: sentences")
    echo: bool = Field(False, description="return the prompt before the completion")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="per-token log-probs and this many alternatives (flat LM only)")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    suffix: None = Field(None, description="not supported")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        def ids(x) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        items = [v] if isinstance(v, str) or ids(v) else v
        if not isinstance(items, list) or not items or not all(isinstance(p, str) or ids(p) for p in items):
            raise ValueError("must be a string, a non-empty list of strings, or token ids (a non-empty list of "
                             "integers, or a list of such lists)")
        if len(items) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return items


class TokenizeRequest(Body):
    model: str | None = Field(None, description="which served model; optional when one is served")
    prompt: str
    add_special_tokens: bool = Field(False, description="start with the document-start token (end-of-text)")


class DetokenizeRequest(Body):
    model: str | None = Field(None, description="which served model; optional when one is served")
    tokens: list[int]


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, v):
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="flat LM: tokens; sentence-step run: sentences")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    logprobs: bool = Field(False, description="per-token log-probs of the reply (flat LM only)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class SeedParams(Body):
    """The ``params`` of the sentence-step seed's body (``{"rerank": true}``)."""

    rerank: Any = Field(None, description="true: 4 candidates (or n_cand), false: 1, or a number of candidates")
    n_cand: int | None = Field(None, ge=1, le=64, description="candidates when rerank is true")
    do_sample: bool | None = None
    temp: float | None = Field(None, ge=0, le=2)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)

    @field_validator("rerank")
    @classmethod
    def _check_rerank(cls, v):
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int) and 0 <= v <= 64:
            return v
        raise ValueError("must be true, false or a number of candidates from 0 to 64")


class GenerateRequest(Body):
    """Both seeds' bodies: ``{"prompt", "steps", "sample", "temperature"}`` and
    ``{"prompt", "max_sentences", "params": {"rerank": true}}``."""

    model: str | None = Field(None, description="which served model; optional when one is served")
    prompt: str
    steps: int | None = Field(None, ge=1, description="sentences to generate (the same as max_sentences)")
    max_sentences: int | None = Field(None, ge=1, description="sentences to generate")
    sample: bool | None = Field(None, description="sample instead of greedy decoding")
    temperature: float | None = Field(None, ge=0, le=2)
    params: SeedParams | None = None


class PlanRequest(Body):
    """The playground's plan view: a sentence-step or autoencoder run writes segment by segment and says, for each,
    the codes it planned, the codes of what it wrote, and the candidates reranking chose between."""

    model: str | None = Field(None, description="which served model; optional when one is served")
    prompt: str
    max_tokens: int | None = Field(None, ge=1, description="segments (sentences) to write")
    temperature: float = Field(0.8, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 or unset means no limit")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    rerank: int | None = Field(None, ge=0, le=64, description="candidates per segment (codes on); unset: the run's default")
    stream: bool = False
