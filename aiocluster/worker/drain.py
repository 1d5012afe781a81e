"""Draining an aiohttp server without failing a single request.

aiohttp's own ``runner.cleanup()`` closes idle keep-alive connections at once. A client that
had just sent its next request on such a connection sees the connection drop: that is the
failed request every reload of gunicorn or uvicorn produces under keep-alive load. Here:

1. stop accepting (the sites close their listening sockets; in ``shared`` mode the other
   workers keep accepting from the same kernel queue, so nothing queued is lost);
2. every response from now on carries ``Connection: close``, so each client learns, on its next
   answer, to open a fresh connection (which reaches a worker that is not draining);
3. connections that stay idle for a short grace are closed: a client sending steadily has had
   its ``Connection: close`` by then;
4. in-flight requests get the rest of the graceful timeout; then aiohttp's own cleanup runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

__all__ = ["drain_app"]

log = logging.getLogger("aiocluster.worker")

#: How long an idle keep-alive connection may stay open once draining starts.
IDLE_GRACE = 2.0


async def drain_app(runner: web.BaseRunner, timeout: float, idle_grace: float = IDLE_GRACE) -> None:
    """Stop ``runner``'s sites and drain its connections as above, within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is None:
        return
    empty = _watch(server)
    if live := _live(server):
        log.info("draining %d connections", len(live))
    await _wait(empty, min(idle_grace, timeout))
    for conn in _live(server):
        if not getattr(conn, "_request_in_progress", False):
            conn.close()
    await _wait(empty, deadline - loop.time())
    if live := _live(server):
        log.warning("%d connections still busy after %gs; cancelling them", len(live), timeout)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    if timeout > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()


def _watch(server: web.Server) -> asyncio.Event:
    """Put every connection, present or arriving, in closing mode; an event set once none is left.

    A connection counts until its transport is gone (``connection_lost``) or its handler task is
    done: both are watched (never a timer). Connections accepted just before
    the sites stopped may still be announced, so ``connection_made`` is watched too.
    """
    empty = asyncio.Event()
    loop = asyncio.get_running_loop()

    def check(*_: object) -> None:
        # A connection whose transport is gone is only waiting for aiohttp to forget it.
        if not _live(server):
            empty.set()

    def watch_task(conn: Any) -> None:
        task = getattr(conn, "_task_handler", None)
        if task is not None:
            task.add_done_callback(check)

    made, lost = server.connection_made, server.connection_lost

    def connection_made(handler: Any, transport: Any) -> None:
        made(handler, transport)
        _close_after_next_response(handler)
        loop.call_soon(watch_task, handler)  # its task is created right after this call

    def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
        lost(handler, exc)
        watch_task(handler)
        loop.call_soon(check)  # the handler drops its transport right after this call

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]
    for conn in server.connections:
        _close_after_next_response(conn)
        watch_task(conn)
    check()
    return empty


def _live(server: web.Server) -> list[Any]:
    """The server's connections that still have a transport."""
    return [c for c in server.connections if getattr(c, "transport", None) is not None]


def _close_after_next_response(conn: Any) -> None:
    """Make every later response on ``conn`` say ``Connection: close`` (and then close)."""
    original: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] | None = getattr(
        conn, "_request_handler", None
    )
    if original is None or getattr(original, "_aiocluster_closing", False):
        return

    async def closing(request: web.BaseRequest) -> web.StreamResponse:
        # The request, not the response: error responses aiohttp builds itself follow it too.
        message: Any = getattr(request, "_message", None)
        cache = getattr(request, "_cache", None)
        if hasattr(message, "_replace") and isinstance(cache, dict):
            request._message = message._replace(should_close=True)
            cache.pop("keep_alive", None)
        return await original(request)

    closing._aiocluster_closing = True  # type: ignore[attr-defined]
    conn._request_handler = closing
