"""Applications the tests run in real clusters (``aiocluster run webapp:app`` from this folder)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import sys
import time
import typing
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

import aiocluster

#: The process that imported this module: the worker itself (spawn) or the zygote (fork).
IMPORTED_IN = os.getpid()
# 0 where the importing process had automatic collection paused (the zygote, loading).
THRESHOLD_AT_IMPORT = gc.get_threshold()[0]
if os.environ.get("WEBAPP_GC") == "off":
    gc.disable()  # a program's own choice, which the zygote's paused collector must keep
elif os.environ.get("WEBAPP_GC") == "threshold":
    gc.set_threshold(5000, 20, 20)
LAST_MESSAGE: web.AppKey[asyncio.Queue[object]] = web.AppKey("last_message", asyncio.Queue)
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse])


def say(line: str) -> None:
    """A line on stderr that the tests wait for (they never sleep to guess).

    One write() for the whole line: print() writes the text and the newline separately, and
    another process's line can land between the two.
    """
    sys.stderr.write(f"TEST {line} worker={aiocluster.worker_id()} pid={os.getpid()}\n")
    sys.stderr.flush()


async def whoami(request: web.Request) -> web.Response:
    return web.json_response({"pid": os.getpid(), "worker": aiocluster.worker_id()})


async def probe(request: web.Request) -> web.Response:
    """How this worker came to be: its parent, session, environment, and a fresh random draw."""
    return web.json_response(
        {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "sid": os.getsid(0),
            "pgid": os.getpgid(0),
            "worker": aiocluster.worker_id(),
            "env_worker": os.environ.get("AIOCLUSTER_WORKER_ID"),
            "random": random.getrandbits(64),
            "imported_in": IMPORTED_IN,
            "collects": gc.isenabled(),
            "thresholds": list(gc.get_threshold()),
            "threshold_at_import": THRESHOLD_AT_IMPORT,
            "seen_by_collector": len(gc.get_objects()),
        }
    )


async def log_line(request: web.Request) -> web.Response:
    """Logs one line (INFO unless ``level`` says) on the application's own logger."""
    level = getattr(logging, request.query.get("level", "info").upper())
    logging.getLogger("webapp").log(level, "app-log-line %s", request.query.get("text", ""))
    return web.json_response({"pid": os.getpid()})


async def modules(request: web.Request) -> web.Response:
    """The aiocluster modules this worker has loaded (the layout test checks the roles)."""
    loaded = sorted(name for name in sys.modules if name.startswith("aiocluster"))
    return web.json_response({"pid": os.getpid(), "modules": loaded})


async def orphan(request: web.Request) -> web.Response:
    """Start a process that outlives this worker (the test kills both)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import signal; signal.pause()"
    )
    return web.json_response({"pid": os.getpid(), "child": child.pid})


async def listen(request: web.Request) -> web.Response:
    """Ask the primary for a listen (``?port=N`` on 127.0.0.1, or ``?path=P``); say the errno.

    Also says who this worker runs as: the --user tests check both.
    """
    port, path = request.query.get("port"), request.query.get("path")
    try:
        server = await aiocluster.create_server(
            asyncio.Protocol, "127.0.0.1", None if port is None else int(port), path=path
        )
    except OSError as err:
        result: dict[str, object] = {"errno": err.errno, "error": str(err)}
    else:
        server.close()
        result = {"errno": 0}
    return web.json_response({**result, "uid": os.getuid(), "gid": os.getgid()})


async def block(request: web.Request) -> web.Response:
    # Blocks this worker's loop, so it cannot accept: the next connection must go elsewhere.
    say("block-started")
    time.sleep(float(request.query.get("s", "0.5")))  # noqa: ASYNC251 - the point of it
    return web.json_response({"pid": os.getpid(), "worker": aiocluster.worker_id()})


async def slow(request: web.Request) -> web.Response:
    say("slow-started")
    await asyncio.sleep(float(request.query.get("s", "1.0")))
    return web.json_response({"pid": os.getpid(), "worker": aiocluster.worker_id(), "done": True})


async def sse(request: web.Request) -> web.StreamResponse:
    """A server-sent event every 0.1 s for ``s`` seconds (a long stream)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    say("sse-started")
    loop = asyncio.get_running_loop()
    end = loop.time() + float(request.query.get("s", "60"))
    try:
        while loop.time() < end:
            await response.write(b"data: tick\n\n")
            await asyncio.sleep(0.1)
    except asyncio.CancelledError:
        say("sse-cancelled")
        raise
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Echoes text messages, prefixed with the worker id; says how its loop ended."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    say("ws-open")
    try:
        async for msg in ws:
            if msg.type == web.WSMsgType.TEXT:
                try:
                    await ws.send_str(f"{aiocluster.worker_id()}:{msg.data}")
                except ConnectionResetError:
                    # The client left with messages still queued here (it gave up on a
                    # SIGSTOPped worker, say): aiohttp raises, and would log a traceback.
                    break
    except asyncio.CancelledError:
        say("ws-cancelled")
        raise
    finally:
        request.app[WEBSOCKETS].discard(ws)
    say(f"ws-ended code={ws.close_code}")
    return ws


async def _close_websockets_on_shutdown(app: web.Application) -> None:
    """aiohttp's documented pattern: an app closes its own websockets in on_shutdown."""
    open_now: set[web.WebSocketResponse] = app[WEBSOCKETS]
    for ws in list(open_now):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"app shutdown")


async def send_to_primary(request: web.Request) -> web.Response:
    aiocluster.send({"from": aiocluster.worker_id(), "text": request.query.get("text", "")})
    if request.query.get("wait") == "no":
        return web.json_response({"pid": os.getpid(), "worker": aiocluster.worker_id()})
    reply = await asyncio.wait_for(request.app[LAST_MESSAGE].get(), timeout=10)
    return web.json_response({"pid": os.getpid(), "reply": reply})


async def _pump_messages(app: web.Application) -> AsyncIterator[None]:
    async def pump() -> None:
        async for message in aiocluster.messages():
            await app[LAST_MESSAGE].put(message)

    task = asyncio.create_task(pump())
    yield
    task.cancel()


async def _announce_startup(app: web.Application) -> None:
    say("on_startup")


async def _announce_shutdown(app: web.Application) -> None:
    say("on_shutdown")


async def _announce_cleanup(app: web.Application) -> None:
    say("on_cleanup")


async def _context(app: web.Application) -> AsyncIterator[None]:
    say("cleanup_ctx-enter")
    yield
    say("cleanup_ctx-exit")


def make_app(*, closes_websockets: bool = False) -> web.Application:
    app = web.Application()
    app[WEBSOCKETS] = set()
    if closes_websockets:
        app.on_shutdown.append(_close_websockets_on_shutdown)
    app.on_startup.append(_announce_startup)
    app.on_shutdown.append(_announce_shutdown)
    app.on_cleanup.append(_announce_cleanup)
    app.cleanup_ctx.append(_context)
    app[LAST_MESSAGE] = asyncio.Queue()
    app.router.add_get("/", whoami)
    app.router.add_get("/probe", probe)
    app.router.add_get("/orphan", orphan)
    app.router.add_get("/modules", modules)
    app.router.add_get("/log", log_line)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/block", block)
    app.router.add_get("/listen", listen)
    app.router.add_get("/slow", slow)
    app.router.add_get("/send", send_to_primary)
    if aiocluster.is_worker():
        app.cleanup_ctx.append(_pump_messages)
    return app


app = make_app()


def closing_app() -> web.Application:
    """The app with an on_shutdown hook that closes its websockets itself."""
    return make_app(closes_websockets=True)


async def broken_factory() -> web.Application:
    raise RuntimeError("this application cannot start")


def not_an_app() -> str:
    return "not an application"


class EchoProtocol(asyncio.Protocol):
    """Echoes every byte back, prefixed once with the worker id."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not an isinstance.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.transport.write(f"worker {aiocluster.worker_id()} pid {os.getpid()}\n".encode())

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class PoliteEchoProtocol(EchoProtocol):
    """An echo that says goodbye when its worker drains (aiocluster calls ``drain()``)."""

    def drain(self) -> None:
        self.transport.write(b"bye\n")
        self.transport.close()


async def wait_for_gate() -> None:
    """Wait until the test writes a byte to the FIFO named in $GATE."""
    # O_NONBLOCK: opening never blocks; the loop then waits for a byte (an event, not a timer),
    # and a worker told to stop meanwhile is not stuck in a thread.
    fd = os.open(os.environ["GATE"], os.O_RDONLY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not opened.done():
            opened.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await opened
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def slow_factory() -> web.Application:
    """An application that starts only once the test writes to the FIFO named in $GATE."""
    say("factory-waiting")
    await wait_for_gate()
    return make_app()


async def held_replacement() -> web.Application:
    """Workers 1..$HOLD_AFTER start at once; any later one (a replacement) only once the test
    writes to the FIFO named in $GATE."""
    worker = aiocluster.worker_id()
    if worker is not None and worker > int(os.environ["HOLD_AFTER"]):
        say("replacement-waiting")
        await wait_for_gate()
    return make_app()
