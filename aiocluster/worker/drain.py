"""Draining an aiohttp application: one deadline, aiohttp's hooks in order, no failed request.

aiohttp's own ``runner.cleanup()`` closes idle keep-alive connections at once (a client that
had just sent its next request on one sees it drop: the failed request every reload of
gunicorn or uvicorn produces under keep-alive load), runs ``on_shutdown`` only after the sites
are gone, then waits its own ``shutdown_timeout`` twice over. Here one :class:`DrainPlan`,
fixed when the drain begins, is spent by every step:

1. stop accepting (the sites close their listening sockets; under ``shared`` the other workers
   keep accepting from the same kernel queue, so nothing queued is lost);
2. every response from now on carries ``Connection: close``, so each client learns, on its next
   answer, to open a fresh connection (which reaches a worker that is not draining);
3. ``on_shutdown`` runs at once (apps close their websockets there, as aiohttp documents);
4. open websockets get a close frame with 1001 (Going Away) from the cluster after a short
   grace, so an app need not do it; their ``async for msg in ws`` loops end normally;
5. connections that stay idle for a short grace are closed: a client sending steadily has had
   its ``Connection: close`` by then, and one that had just connected has sent its first
   request (which is answered, with the ``close``); one whose request head is still coming in
   after the grace (a slow client) is idle too, since nothing was asked of the application;
6. in-flight requests (streams included) run until the deadline; then the handlers still
   running are cancelled (they see ``CancelledError``, as under aiohttp's own shutdown);
   connections accepted before the sites stopped whose TLS handshake was still under way get
   an idle grace to become connections, and are then answered (``Connection: close``) too;
7. ``on_cleanup`` and ``cleanup_ctx`` teardown always run, within the cleanup allowance.

The primary kills a worker only once the deadline and the allowance have passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import WSCloseCode, web

from aiocluster.web import ClusterSite
from aiocluster.worker.deadline import DrainPlan, wait_handshakes, wait_until

__all__ = ["OpenWebsockets", "drain_app"]

log = logging.getLogger("aiocluster.worker")

#: Longest wait for cancelled handlers to finish before their connections are closed.
CANCEL_WAIT = 1.0


class OpenWebsockets:
    """The websockets an application has open, seen through ``on_response_prepare`` (aiohttp's
    public hook)."""

    def __init__(self) -> None:
        self._seen: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    def attach(self, app: web.Application) -> bool:
        """Watch ``app``'s responses; False if it is frozen already (started elsewhere)."""
        try:
            app.on_response_prepare.append(self._prepared)
        except RuntimeError:
            return False
        return True

    async def _prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.WebSocketResponse):
            self._seen.add(response)

    def live(self) -> list[web.WebSocketResponse]:
        """The websockets not closed yet."""
        return [ws for ws in self._seen if not ws.closed]

    async def close_all(self, until: float) -> int:
        """Close every open websocket with 1001, waiting for the clients until ``until``.

        Returns how many were open.
        """
        live = self.live()
        closing = [asyncio.ensure_future(_going_away(ws)) for ws in live]
        for task in closing:
            if not await wait_until(task, until):
                task.cancel()  # the client never answered: aiohttp closes the transport
        return len(live)


async def _going_away(ws: web.WebSocketResponse) -> None:
    try:
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
    except Exception as err:  # e.g. a websocket still in its handshake
        log.debug("closing a websocket on drain failed: %r", err)


async def drain_app(
    runner: web.AppRunner, plan: DrainPlan, websockets: OpenWebsockets | None = None
) -> None:
    """Drain ``runner``'s application as the module docstring says, spending ``plan``."""
    accepted = []
    for site in list(runner.sites):
        if isinstance(site, ClusterSite) and site.accepted is not None:
            accepted.append(site.accepted)
        await site.stop()
    app = runner.app
    try:
        server = runner.server
        if server is not None:
            await _drain_connections(server, app, plan, websockets, accepted)
    finally:
        await _cleanup(app, plan)


async def _drain_connections(
    server: web.Server,
    app: web.Application,
    plan: DrainPlan,
    websockets: OpenWebsockets | None,
    accepted: Sequence[asyncio.Future[None]],
) -> None:
    empty = _watch(server, plan.idle_grace)
    if live := _live(server):
        log.info("draining %d connections (deadline in %gs)", len(live), plan.graceful_timeout)
    shutdown = asyncio.ensure_future(_hook("on_shutdown", app.shutdown()))
    closer = asyncio.ensure_future(_close_websockets(websockets, plan))
    # Every idle connection gets the grace, those on which nothing was answered yet too: a
    # client that connected just before the sites stopped has its first request on the way.
    await wait_until(asyncio.ensure_future(empty.wait()), plan.began + plan.idle_grace)
    for conn in _live(server):
        _close_if_idle(conn)
    waiting = asyncio.ensure_future(empty.wait())
    await wait_until(waiting, plan.deadline)
    waiting.cancel()
    await wait_handshakes(accepted, empty.wait, plan)
    if not shutdown.done():
        log.warning("on_shutdown still running at the graceful deadline; cancelling it")
        shutdown.cancel()
    if not closer.done():
        # Its grace may end at the deadline itself (a short graceful timeout): say so only if
        # a websocket is still open, which the cancellation then leaves to the cancelled handlers.
        if websockets is not None and websockets.live():
            log.warning("websockets still closing at the graceful deadline; cancelling that")
        closer.cancel()
    if busy := _live(server):
        log.warning(
            "%d connections still busy at the graceful deadline (%gs); cancelling them",
            len(busy),
            plan.graceful_timeout,
        )
        await _cancel(busy, plan)


async def _close_websockets(websockets: OpenWebsockets | None, plan: DrainPlan) -> None:
    if websockets is None:
        return
    loop = asyncio.get_running_loop()
    delay = plan.began + plan.ws_grace - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)  # the grace itself: a message in flight completes
    if count := await websockets.close_all(plan.deadline):
        log.info("closed %d websockets with 1001 (going away)", count)


async def _cancel(busy: list[Any], plan: DrainPlan) -> None:
    """Cancel the handlers of ``busy`` connections; close what is left of them after that."""
    tasks = []
    for conn in busy:
        task = getattr(conn, "_task_handler", None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
            tasks.append(task)
    if tasks:
        loop = asyncio.get_running_loop()
        await asyncio.wait(tasks, timeout=max(0.0, min(CANCEL_WAIT, plan.cleanup_by - loop.time())))
    for conn in busy:
        if getattr(conn, "transport", None) is not None:
            conn.force_close()


async def _cleanup(app: web.Application, plan: DrainPlan) -> None:
    """``on_cleanup`` and ``cleanup_ctx`` teardown, within the cleanup allowance."""
    cleanup = asyncio.ensure_future(_hook("on_cleanup", app.cleanup()))
    if not await wait_until(cleanup, plan.cleanup_by):
        log.error(
            "on_cleanup/cleanup_ctx still running after the cleanup allowance; exiting without them"
        )
        cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cleanup


async def _hook(what: str, hook: Awaitable[None]) -> None:
    try:
        await hook
    except Exception:
        log.exception("%s failed", what)


def _watch(server: web.Server, idle_grace: float) -> asyncio.Event:
    """Put every connection, present or arriving, in closing mode; an event set while none is
    left.

    A connection counts until its transport is gone (``connection_lost``) or its handler task is
    done: both are watched (never a timer). Connections accepted just before the sites stopped
    may still be announced (a TLS handshake that ends now), so ``connection_made`` is watched
    too: such a connection counts, and is closed if it is still idle after ``idle_grace``.
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
        empty.clear()
        _close_after_next_response(handler)
        loop.call_soon(watch_task, handler)  # its task is created right after this call
        loop.call_later(idle_grace, _close_if_idle, handler)

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


def _close_if_idle(conn: Any) -> None:
    if getattr(conn, "transport", None) is not None and _idle(conn):
        # Closed outright: aiohttp's close() only cancels the wait for the next request, and
        # leaves the transport open until the deadline.
        conn.force_close()


def _idle(conn: Any) -> bool:
    """No request being handled nor waiting to be: idle keep-alive, or a request head still
    coming in (a slow client has nothing to lose, and must not hold the stop)."""
    return not getattr(conn, "_request_in_progress", False) and not getattr(conn, "_messages", ())


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
