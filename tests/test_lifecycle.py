"""The application's lifecycle on stop and reload: one graceful deadline, aiohttp's hooks in
order, websockets closed with 1001, streams cancelled at the deadline, cleanup always run.

Every deadline here is a few seconds, well under the graceful timeouts the clusters run with,
so that a regression to "waits the whole graceful timeout" (or twice it) fails.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from .conftest import StartCluster
from .harness import ClusterProcess, cli
from .procfs import accept_queue
from .test_cluster import free_port, get_json

WS_TIMEOUT = aiohttp.ClientTimeout(total=30)


async def open_stream(c: ClusterProcess) -> tuple[aiohttp.ClientSession, aiohttp.ClientResponse]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    response = await session.get(f"{c.url}/sse?s=60")
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: tick")
    return session, response


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=WS_TIMEOUT) as s:
        yield s


async def websocket_through_a_reload(
    c: ClusterProcess, session: aiohttp.ClientSession
) -> tuple[str, int, aiohttp.WSMessage]:
    """Open ``/ws`` on ``c``, then SIGHUP: the close frame must come within 6 s.

    Returns the worker that answered, the log line count at the reload, and the close message.
    """
    async with session.ws_connect(f"{c.url}/ws") as ws:
        await ws.send_str("hello")
        first = (await ws.receive_str()).split(":")[0]
        mark = len(c.lines)
        began = time.monotonic()
        c.signal(signal.SIGHUP)
        msg = await asyncio.wait_for(ws.receive(), timeout=6)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        assert time.monotonic() - began < 6
    return first, mark, msg


async def worker_of_a_new_websocket(c: ClusterProcess, session: aiohttp.ClientSession) -> str:
    """The worker that answers a websocket opened now (within 5 s)."""
    async with session.ws_connect(f"{c.url}/ws") as ws:
        await ws.send_str("again")
        return (await asyncio.wait_for(ws.receive_str(), timeout=5)).split(":")[0]


async def test_stop_spends_one_deadline_and_always_cleans_up(start_cluster: StartCluster) -> None:
    graceful = 3.0
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "3")
    )
    session, response = await open_stream(c)
    try:
        mark = len(c.lines)
        began = time.monotonic()
        c.signal(signal.SIGTERM)
        # on_shutdown runs at once, not after the graceful timeout.
        await c.wait_for("TEST on_shutdown ", timeout=1.5, start=mark)
        # The stream runs until the deadline, then its handler is cancelled ...
        await c.wait_for("TEST sse-cancelled ", timeout=graceful + 1.5, start=mark)
        assert time.monotonic() - began >= graceful - 0.5, "the stream was cut before its time"
        # ... and the cleanup hooks run after it, before the worker exits.
        await c.wait_for("TEST cleanup_ctx-exit ", timeout=2, start=mark)
        await c.wait_for("TEST on_cleanup ", timeout=2, start=mark)
        assert await c.wait(timeout=3) == 0
        assert time.monotonic() - began < graceful + 2.0
        assert "killing worker" not in c.output
        assert c.count("TEST on_shutdown ") == 1, "on_shutdown ran twice"
    finally:
        response.close()
        await session.close()


async def test_websocket_gets_1001_soon_after_a_reload_and_reconnects(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "15")
    )
    first, mark, msg = await websocket_through_a_reload(c, session)
    assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    # The handler's `async for msg in ws` ended normally, not by cancellation.
    await c.wait_for(r"TEST ws-ended code=\d+ ", timeout=3, start=mark)
    assert "TEST ws-cancelled" not in c.output
    # A new websocket reaches the new worker at once.
    assert await worker_of_a_new_websocket(c, session) != first
    await c.wait_for("reload complete", timeout=10)


async def test_an_app_closing_its_websockets_in_on_shutdown_does_so_at_once(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    c = await start_cluster(
        *cli(
            "run",
            "webapp:closing_app",
            "--factory",
            "-w",
            "1",
            "-b",
            "127.0.0.1:0",
            "--graceful-timeout",
            "15",
        )
    )
    async with session.ws_connect(f"{c.url}/ws") as ws:
        await ws.send_str("hello")
        await ws.receive_str()
        began = time.monotonic()
        c.signal(signal.SIGTERM)
        msg = await asyncio.wait_for(ws.receive(), timeout=3)
        assert msg.type == aiohttp.WSMsgType.CLOSE, msg
        # The app's own close (its on_shutdown ran at once), before the cluster's grace.
        assert msg.extra == "app shutdown"
        assert time.monotonic() - began < 1.0
    assert await c.wait(timeout=5) == 0


async def test_the_cluster_closes_websockets_the_app_leaves_open_on_stop(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--graceful-timeout", "15")
    )
    sockets = [await session.ws_connect(f"{c.url}/ws") for _ in range(4)]
    try:
        began = time.monotonic()
        c.signal(signal.SIGTERM)
        for ws in sockets:
            msg = await asyncio.wait_for(ws.receive(), timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            # The code the server sent (the client's own close_code says 1006 when the
            # worker has exited before this client got round to answering).
            assert (msg.data, msg.extra) == (aiohttp.WSCloseCode.GOING_AWAY, "server shutting down")
        assert await c.wait(timeout=5) == 0
        assert time.monotonic() - began < 5
    finally:
        for ws in sockets:
            await ws.close()


async def test_access_log_and_app_logs_reach_the_output_with_the_role_prefix(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--access-log")
    )
    for query in ("text=hidden&level=debug", "text=hello"):
        async with session.get(f"{c.url}/log?{query}") as r:
            assert r.status == 200
    await c.wait_for(r"\[worker 1 \d+\] INFO webapp: app-log-line hello", timeout=5)
    await c.wait_for(r'\[worker 1 \d+\] INFO aiohttp\.access: .*"GET /log\?text=hello', 5)
    # The default level is info: the app's debug line stayed out.
    assert "app-log-line hidden" not in c.output


async def test_log_level_applies_to_the_app_loggers(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--log-level", "debug")
    )
    async with session.get(f"{c.url}/log?text=shown&level=debug") as r:
        assert r.status == 200
    await c.wait_for(r"\[worker 1 \d+\] DEBUG webapp: app-log-line shown", timeout=5)
    # Not the access log: it is off unless asked for.
    assert "aiohttp.access" not in c.output


async def test_an_app_that_configures_logging_keeps_its_format(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    c = await start_cluster(*cli("run", "own_logging:app", "-w", "1", "-b", "127.0.0.1:0"))
    async with session.get(f"{c.url}/log?text=mine") as r:
        assert r.status == 200
    await c.wait_for(r"^OWNFMT webapp: app-log-line mine", timeout=5)
    assert not any("INFO webapp: app-log-line" in line for line in c.lines)


def events_of(c: ClusterProcess, worker: int) -> list[str]:
    """The SYNC event lines of ``worker``, in the order the primary emitted them."""
    pattern = re.compile(rf"^SYNC (\w+) worker={worker} connected=(\w+)$")
    return [f"{m[1]}:{m[2]}" for line in c.lines if (m := pattern.match(line))]


async def test_disconnect_is_emitted_once_for_every_worker_before_its_exit(
    start_cluster: StartCluster,
) -> None:
    """Node's contract: 'disconnect' when the channel closes, however the worker ends."""
    port = free_port()
    c = await start_cluster(sys.executable, "script_app.py", str(port))
    pids = c.worker_pids
    os.kill(pids[1], signal.SIGKILL)  # a crash
    await c.wait_for(r"^SYNC exit worker=1 ")
    await c.wait_for(r"worker 3 \(pid \d+\) listening on")  # its replacement
    data = await get_json(f"http://127.0.0.1:{port}/send?text=disconnect-me&wait=no")
    asked = int(str(data["worker"]))  # disconnect() asked for
    await c.wait_for(rf"^SYNC exit worker={asked} ")
    assert await c.stop() == 0  # the rest at the stop
    for worker in c.worker_pids:
        assert events_of(c, worker) == ["disconnect:False", "exit:False"], (worker, c.output)


@pytest.mark.parametrize("start", ["fork", "spawn"])
@pytest.mark.parametrize(
    ("app", "extra", "says"),
    [
        ("webapp:not_an_app", [], "is a function, not an aiohttp Application"),
        ("webapp:no_such_thing", [], "module 'webapp' has no attribute 'no_such_thing'"),
        ("webapp:not_an_app", ["--factory"], "returned str, not an aiohttp Application"),
        ("webapp:app", ["--protocol"], "it is an aiohttp Application"),
        ("raises_at_import:app", [], "importing 'raises_at_import' failed"),
    ],
)
async def test_an_app_that_cannot_load_is_reported_once_and_never_retried(
    start_cluster: StartCluster, start: str, app: str, extra: list[str], says: str
) -> None:
    c = await start_cluster(
        *cli("run", app, *extra, "-w", "3", "-b", "127.0.0.1:0", "--start", start), ready=False
    )
    assert await c.wait(timeout=15) == 2
    errors = [line for line in c.lines if line.startswith("aiocluster: error: ")]
    assert len(errors) == 1, c.output
    assert says in errors[0]
    assert c.count("Traceback") == (1 if app.startswith("raises") else 0), c.output
    assert "restarting slot" not in c.output
    assert "cannot load the application; stopping the cluster" in c.output


async def test_a_worker_that_will_not_exit_is_killed_after_deadline_and_allowance(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"),
        *("--graceful-timeout", "1", "--cleanup-timeout", "1", "-t", "0"),
    )
    blocked = asyncio.create_task(get_json(f"{c.url}/block?s=30"))  # blocks the worker's loop
    await c.wait_for("TEST block-started")
    began = time.monotonic()
    c.signal(signal.SIGTERM)
    await c.wait_for(r"killing worker 1 \(pid \d+\): still running 3s after it was told to drain")
    assert 2.5 < time.monotonic() - began < 6
    assert await c.wait(timeout=5) == 0
    with pytest.raises(aiohttp.ClientError):
        await blocked


@pytest.mark.parametrize("app", ["webapp:app", "asgi_app:app"])
async def test_a_connection_accepted_as_the_drain_begins_has_its_first_request_answered(
    start_cluster: StartCluster, app: str
) -> None:
    """A client that connected just before the sites stopped: its first request is on the way
    (here: sent after the drain began, as over a slow network). Closing such connections at
    once, as never-answered ones, failed requests in every reload under new-connection load."""
    c = await start_cluster(
        *cli("run", app, "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "10")
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    try:
        async with asyncio.timeout(5):
            while accept_queue(c.port):  # until the worker has taken the connection
                await asyncio.sleep(0.01)
        mark = len(c.lines)
        c.signal(signal.SIGTERM)
        await c.wait_for(r"asked to disconnect; draining", timeout=5, start=mark)
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)).decode()
        assert head.startswith("HTTP/1.1 200"), head
        assert "connection: close" in head.lower(), head
        assert await c.wait(timeout=8) == 0
    finally:
        writer.close()
