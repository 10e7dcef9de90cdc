"""The playground: a page at ``/`` (plain HTML, CSS and JavaScript shipped in the package, no build step and
nothing fetched from elsewhere) over the JSON routes, and ``/v1/plan``, the one route it adds: what a sentence-step
or autoencoder run planned and wrote, segment by segment."""

from __future__ import annotations

import asyncio
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sentcode.serve.errors import ApiError
from sentcode.serve.schemas import PlanRequest
from sentcode.serve.state import Served, Ticket
from sentcode.serve.streaming import EventStream, collect, first_item, relay, sse
from sentcode.serve.worker import Channel, PlanJob

PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
              "icon.svg": "image/svg+xml"}
# The page runs its own script and style only, and talks to this server only: model output shown on it can never
# load or run anything (it is also only ever inserted as text).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def page_file(name: str) -> Response:
    body = resources.files("sentcode.serve").joinpath("page", name).read_bytes()
    return Response(body, media_type=PAGE_FILES[name], headers={
        "content-security-policy": CSP, "x-content-type-options": "nosniff", "cache-control": "no-cache"})


def routes(served: Served) -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def index():
        return page_file("index.html")

    @r.get("/page/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in PAGE_FILES:
            raise ApiError(404, f"no page file {name!r}", None, "not_found", type_="not_found")
        return page_file(name)

    @r.post("/v1/plan", summary="a sentence-step or autoencoder run's plan, segment by segment (the playground's "
            "plan view)")
    async def plan(body: PlanRequest, request: Request):
        st = served.pick(body.model)
        if not hasattr(st.gen, "stream_plan"):
            raise ApiError(400, f"model '{st.name}' ({st.label}) has no plan to show: the plan view needs a "
                           "sentence-step or autoencoder run", "model", "unsupported")
        n = st.max_tokens(body.max_tokens)
        prompt = st.prompt(body.prompt)
        kwargs = dict(max_sentences=n, rerank=body.rerank, temperature=body.temperature, seed=body.seed,
                      top_k=body.top_k or None, top_p=None if body.top_p >= 1 else body.top_p)

        async def go(ticket: Ticket):
            channel = Channel(asyncio.get_running_loop())
            st.submit(ticket, PlanJob(channel, prompt.data, kwargs, prompt.tokens))
            if not body.stream:
                got = (await collect(channel, request, {0: {"done"}}))[0]
                out = {"model": st.name, "family": st.family,
                       "segments": [v["segment"] for v in got["results"] if "segment" in v],
                       "finish_reason": got["done"].finish_reason}
                for v in got["results"]:
                    if "levels" in v:
                        out.update(levels=v["levels"], text=v["text"])
                return out
            first = await first_item(channel, request)

            async def events():
                async for e in relay(channel, first, [0], lambda p: None,
                                     lambda d: [sse({"done": True, "finish_reason": d.finish_reason})],
                                     lambda res: sse(res.value)):
                    yield e
                yield "[DONE]"

            return EventStream(events(), ticket.release)

        return await st.run(go, request)

    return r
