"""A Starlette application the ASGI tests run in real clusters (``aiocluster run asgi_app:app``).

``ASGI_VERSION`` in the environment shows in every answer (the reload tests change it);
``ASGI_FAIL_STARTUP=1`` makes the lifespan startup raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import aiocluster


def say(line: str) -> None:
    """A whole line on stderr that the tests wait for."""
    sys.stderr.write(f"TEST {line} worker={aiocluster.worker_id()} pid={os.getpid()}\n")
    sys.stderr.flush()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    if os.environ.get("ASGI_FAIL_STARTUP"):
        raise RuntimeError("the database is not there")
    say("lifespan-startup")
    yield {"started_in": os.getpid(), "pool": "open"}
    say("lifespan-shutdown")


async def whoami(request: Request) -> Response:
    return JSONResponse(
        {
            "worker": aiocluster.worker_id(),
            "pid": os.getpid(),
            "version": os.environ.get("ASGI_VERSION", "v1"),
            "client": request.client.host if request.client else None,
        }
    )


async def client(request: Request) -> Response:
    """What the worker believes of its client, with the keys of ``client_app``'s ``/client``."""
    return JSONResponse(
        {
            "remote": request.client.host if request.client else None,
            "scheme": request.url.scheme,
            "secure": request.url.scheme == "https",
            "host": request.headers.get("host"),
            "worker": aiocluster.worker_id(),
        }
    )


async def ws_client(websocket: WebSocket) -> None:
    """The same, for a websocket: its scope's scheme is ``ws`` or ``wss``."""
    await websocket.accept()
    client = websocket.client
    await websocket.send_json(
        {
            "remote": client.host if client else None,
            "scheme": websocket.url.scheme,
            "host": websocket.headers.get("host"),
        }
    )
    await websocket.close()


async def state(request: Request) -> Response:
    return JSONResponse(
        {"started_in": request.state.started_in, "pool": request.state.pool, "pid": os.getpid()}
    )


async def stream(request: Request) -> Response:
    count = int(request.query_params.get("n", "3"))

    async def lines() -> AsyncIterator[bytes]:
        for i in range(count):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="text/plain")


async def sse(request: Request) -> Response:
    """Ticks until ``s`` seconds pass or the handler is cancelled."""
    seconds = float(request.query_params.get("s", "60"))

    async def ticks() -> AsyncIterator[bytes]:
        try:
            loop = asyncio.get_running_loop()
            end = loop.time() + seconds
            while loop.time() < end:
                yield b"data: tick\n\n"
                await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            say("sse-cancelled")
            raise

    return StreamingResponse(ticks(), media_type="text/event-stream")


async def slow(request: Request) -> Response:
    say("slow-started")
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return PlainTextResponse("slow done")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(f"{aiocluster.worker_id()}:{text}")
    except WebSocketDisconnect as closed:
        say(f"ws-ended code={closed.code}")


app = Starlette(
    routes=[
        Route("/", whoami),
        Route("/client", client),
        Route("/state", state),
        Route("/stream", stream),
        Route("/sse", sse),
        Route("/slow", slow),
        WebSocketRoute("/ws", echo),
        WebSocketRoute("/ws-client", ws_client),
    ],
    lifespan=lifespan,
)


def make_app() -> Starlette:
    """A factory, for ``--factory``."""
    return app


# Things that cannot be served, each with its one-line error.


class Asgi2App:
    """An ASGI 2 application: called with the scope, it returns the coroutine's owner."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        pass


def sync_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Synchronous: not an ASGI application."""


def makes_nothing() -> int:
    """A factory that returns something else."""
    return 42
