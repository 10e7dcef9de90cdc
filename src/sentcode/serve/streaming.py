"""Talking to a client while the model worker computes: waiting for the worker's messages (and noticing a client
that went away), server-sent events, and the one relay that turns a request's messages into stream events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from sentcode.serve.errors import ApiError, error_body
from sentcode.serve.worker import Channel, Done, Failed, Piece, Result


class ClientGone(Exception):
    pass


async def disconnected(receive) -> None:
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
        gone = asyncio.create_task(disconnected(receive))
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


def failure(item: Failed) -> ApiError:
    return ApiError(item.status, item.message, item.param, item.code)


async def collect(channel: Channel, request: Request, expect: dict[int, set]) -> dict:
    """Wait for every job of a request. ``expect``: index -> {"result", "done"} still to come.
    Returns index -> {"text", "pieces", "tokens", "result" (the last), "results" (all), "done"}."""
    out = {i: {"text": "", "pieces": [], "tokens": [], "result": None, "results": [], "done": None} for i in expect}
    gone = asyncio.create_task(disconnected(request.receive))
    try:
        while any(expect.values()):
            item = await next_item(channel, gone)
            if isinstance(item, Failed):
                raise failure(item)
            slot = out[item.index]
            if isinstance(item, Piece):
                slot["text"] += item.text
                slot["pieces"].append(item.text)
                slot["tokens"] += item.tokens
            elif isinstance(item, Result):
                slot["result"] = item.value
                slot["results"].append(item.value)
                expect[item.index].discard("result")
            elif isinstance(item, Done):
                slot["done"] = item
                expect[item.index].discard("done")
        return out
    finally:
        gone.cancel()


async def first_item(channel: Channel, request: Request):
    """Wait for the first message before a stream starts, so that a refusal is still a proper status."""
    gone = asyncio.create_task(disconnected(request.receive))
    try:
        item = await next_item(channel, gone)
    finally:
        gone.cancel()
    if isinstance(item, Failed):
        raise failure(item)
    return item


async def relay(channel: Channel, first, indices: Iterable[int], piece: Callable[[Any], str | None],
                done: Callable[[Done], Iterable[str]], result: Callable[[Result], str | None] = lambda r: None,
                ) -> AsyncIterator[str]:
    """The stream events of a request's jobs, from ``first`` (already received) until every index in ``indices``
    is done: ``piece``, ``result`` and ``done`` render each message (None: nothing to send); a failure ends the
    stream with an error event."""
    left, item = set(indices), first
    while left:
        if item is None:
            item = await channel.get()
        if isinstance(item, Failed):
            yield sse_failure(item)
            return
        if isinstance(item, Piece):
            out = piece(item)
        elif isinstance(item, Result):
            out = result(item)
        else:
            left.discard(item.index)
            out = None
            for event in done(item):
                yield event
        if out is not None:
            yield out
        item = None
