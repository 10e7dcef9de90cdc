"""The HTTP app: the seeds' ``/generate``, OpenAI-shaped completions and chat completions, models, health, and the
playground page; one or several runs, each under its own model name.

Every request that runs a model names it (``model``; optional when one is served) and goes through that model's
admission gate (``max_batch + max_queue`` requests at once; more get 429, and 503 while it loads, while shutting
down or after its worker failed), then becomes jobs for its model worker (``worker.py``). Errors are JSON
``{"error": {"message", "type", "param", "code"}}``; request validation errors are 400s that name the field.
The routes live in three groups (``routes_info``, ``routes_text``, ``routes_page``) over one ``Served`` state.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import sentcode
from sentcode.serve import routes_info, routes_page, routes_text
from sentcode.serve.config import ServeConfig
from sentcode.serve.errors import ApiError, error_body, error_response, validation_error
from sentcode.serve.middleware import BodyLimit, JsonBody
from sentcode.serve.state import ModelState, Served
from sentcode.serve.worker import Worker


def default_name(gen, cfg: ServeConfig) -> str:
    return cfg.model_name or (gen.run_dir.name if getattr(gen, "run_dir", None) else "sentcode")


def build_app(gens, cfg: ServeConfig | None = None, worker: Worker | None = None) -> FastAPI:
    """The FastAPI app serving ``gens``: what ``sentcode.load`` returned, or a dict of model name -> that (None: a
    run still loading, made ready later with ``app.state.served.states[name].ready(gen)``). Starts the workers."""
    cfg = cfg or ServeConfig()
    cfg.check()
    if not isinstance(gens, dict):
        gens = {default_name(gens, cfg): gens}
    served = Served([ModelState(name, cfg, gen, worker if len(gens) == 1 else None) for name, gen in gens.items()])
    names = ", ".join(f"`{n}`" for n in served.names)
    app = FastAPI(
        title="sentcode", version=sentcode.__version__,
        description=f"Serving {names}; the playground is at `/`. `max_tokens` counts tokens for a flat LM and "
                    'sentences for a sentence-step run. Errors: `{"error": {"message", "type", "param", "code"}}`.',
    )
    app.state.served = served
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

    for group in (routes_info, routes_text, routes_page):
        app.include_router(group.routes(served))
    return app
