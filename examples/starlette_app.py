"""The ASGI example: a Starlette app (FastAPI works the same) served by every worker on one port.

pip install 'aiocluster[asgi]' starlette
python examples/starlette_app.py                         # 127.0.0.1:8080, one worker per CPU
aiocluster run starlette_app:app -w 4 -b 127.0.0.1:8080  # the same, from examples/
curl http://127.0.0.1:8080/                              # answers with the worker that served it
kill -HUP <primary pid>                                  # rolling reload, no request fails
"""

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import aiocluster


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    # Runs in each worker, before it listens: open per-worker connections (a database pool)
    # here, never at import (under the fork start, imports run once, in the zygote).
    yield {"greeting": "Hello"}
    # Runs when the worker drains, once its requests are done.


async def hello(request: Request) -> PlainTextResponse:
    greeting = request.state.greeting
    return PlainTextResponse(
        f"{greeting} from worker {aiocluster.worker_id()} (pid {os.getpid()})\n"
    )


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass  # the client left, or the worker drains (code 1001)


app = Starlette(
    routes=[Route("/", hello), WebSocketRoute("/ws", echo)],
    lifespan=lifespan,
)

if __name__ == "__main__":
    aiocluster.run(app, port=int(os.environ.get("PORT", "8080")))
