"""The ASGI equivalent of ``hello_aiohttp``, for uvicorn and granian."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BODY = b"Hello, World!"
_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_BODY)).encode()),
        (b"x-worker-pid", str(os.getpid()).encode()),
    ],
}
_RESPONSE: Message = {"type": "http.response.body", "body": _BODY}


def _after_fork() -> None:
    # A worker forked after this import answers with its own pid, not its parent's.
    _START["headers"][-1] = (b"x-worker-pid", str(os.getpid()).encode())


os.register_at_fork(after_in_child=_after_fork)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(_START)
    await send(_RESPONSE)
