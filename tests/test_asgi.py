"""ASGI applications (a real Starlette app) in real clusters: HTTP, streaming, websockets,
lifespan, every policy, drains on one deadline, and reloads under load with no failed request.

Deadlines here are a few seconds, well under the graceful timeouts the clusters run with, so
that a drain that waits the whole graceful timeout fails.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from .conftest import StartCluster
from .harness import APPS, ClusterProcess, cli
from .load import KeepAliveLoad, reload_twice_under
from .test_lifecycle import websocket_through_a_reload, worker_of_a_new_websocket

pytestmark = pytest.mark.timeout(90)

TIMEOUT = aiohttp.ClientTimeout(total=20)

VERSIONED = """
import os
import aiocluster
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

VERSION = {version!r}

async def whoami(request):
    return JSONResponse({{"worker": aiocluster.worker_id(), "pid": os.getpid(),
                         "version": VERSION}})

app = Starlette(routes=[Route("/", whoami)])
"""


def write_versioned(folder: Path, version: str) -> None:
    (folder / "versioned_asgi.py").write_text(VERSIONED.format(version=version))


def line_index(c: ClusterProcess, pattern: str) -> int:
    regex = re.compile(pattern)
    for i, line in enumerate(c.lines):
        if regex.search(line):
            return i
    raise AssertionError(f"no line matches {pattern!r} in:\n{c.output}")


@pytest.mark.parametrize("policy", ["shared", "rr", "reuseport"])
async def test_starlette_http_streaming_lifespan_state_and_websocket(
    start_cluster: StartCluster, policy: str
) -> None:
    c = await start_cluster(
        *cli(
            "run", "asgi_app:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", policy,
            "--access-log",
        )
    )  # fmt: skip
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{c.url}/") as r:
            assert r.status == 200
            body = await r.json()
            assert body["worker"] in (1, 2)
            assert body["client"] == "127.0.0.1"
        async with s.get(f"{c.url}/state") as r:
            state = await r.json()
            # The lifespan's state, made by the lifespan of the worker that answers.
            assert state["pool"] == "open"
            assert state["started_in"] == state["pid"]
        async with s.get(f"{c.url}/stream?n=500") as r:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert await r.text() == "".join(f"line {i}\n" for i in range(500))
        async with s.ws_connect(f"{c.url}/ws") as ws:
            await ws.send_str("hello")
            who, _, text = (await ws.receive_str()).partition(":")
            assert (int(who) in (1, 2), text) == (True, "hello")
    await c.wait_for(r'uvicorn\.access: 127\.0\.0\.1:\d+ - "GET /state HTTP/1\.1" 200')
    # Each worker ran its lifespan startup before it said it listens.
    for worker in (1, 2):
        startup = line_index(c, rf"TEST lifespan-startup worker={worker} ")
        assert startup < line_index(c, rf"worker {worker} \(pid \d+\) listening on")
    assert await c.stop() == 0
    assert c.count("TEST lifespan-shutdown ") == 2


@pytest.mark.parametrize("policy", ["shared", "rr"])
@pytest.mark.parametrize("fresh", [False, True], ids=["keep-alive", "connection-per-request"])
async def test_reloads_under_load_fail_no_request(
    start_cluster: StartCluster, tmp_path: Path, policy: str, fresh: bool
) -> None:
    write_versioned(tmp_path, "v1")
    c = await start_cluster(
        *cli(
            "run", "versioned_asgi:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", policy,
            "--graceful-timeout", "10",
        ),
        cwd=tmp_path,
    )  # fmt: skip
    async with KeepAliveLoad(f"{c.url}/", concurrency=8, fresh_connections=fresh) as load:
        await reload_twice_under(load, c, lambda: write_versioned(tmp_path, "v2"))
    result = load.result
    assert result.failed == 0, result.errors[:5]
    assert max(result.workers) >= 5  # the last reload's workers served the end of the load
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(f"{c.url}/") as r:
        assert (await r.json())["version"] == "v2"
    assert await c.stop() == 0


async def test_websocket_gets_1001_soon_after_a_reload_and_reconnects(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "15")
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        first, mark, msg = await websocket_through_a_reload(c, s)
        assert (msg.data, msg.extra) == (aiohttp.WSCloseCode.GOING_AWAY, "server shutting down")
        # The app saw the disconnect with 1001 (Starlette's WebSocketDisconnect), not a cancel.
        await c.wait_for(r"TEST ws-ended code=1001 ", timeout=3, start=mark)
        assert await worker_of_a_new_websocket(c, s) != first
    await c.wait_for("reload complete", timeout=10)


async def test_stop_spends_one_deadline_then_runs_the_lifespan_shutdown(
    start_cluster: StartCluster,
) -> None:
    graceful = 3.0
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "3")
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        response = await s.get(f"{c.url}/sse?s=60")
        assert (await response.content.readline()).startswith(b"data: tick")
        mark = len(c.lines)
        began = time.monotonic()
        c.signal(signal.SIGTERM)
        # The stream runs until the deadline, then its task is cancelled ...
        await c.wait_for("TEST sse-cancelled ", timeout=graceful + 1.5, start=mark)
        assert time.monotonic() - began >= graceful - 0.5, "the stream was cut before its time"
        # ... and the lifespan shutdown runs after it, before the worker exits.
        await c.wait_for("TEST lifespan-shutdown ", timeout=2, start=mark)
        assert line_index(c, "TEST sse-cancelled ") < line_index(c, "TEST lifespan-shutdown ")
        assert await c.wait(timeout=4) == 0
        assert time.monotonic() - began < graceful + 2.0
        response.close()
    assert "killing worker" not in c.output


async def request_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[str, bytes]:
    """Send one HTTP/1.1 request on an open connection; its head (lowercase) and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
    length = int(re.search(r"content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return head, await reader.readexactly(length)


async def test_keep_alive_answers_during_a_drain_say_connection_close(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "10")
    )
    host, port = c.address.rsplit(":", 1)
    busy = await asyncio.open_connection(host, int(port))
    steady = await asyncio.open_connection(host, int(port))
    try:
        head, _ = await request_on(*steady, "/")
        assert "connection: close" not in head  # keep-alive before the drain
        # A request under way when the drain begins, and one sent on a kept-alive connection
        # after it began: both answers say close, and the server then closes.
        busy[1].write(b"GET /slow?s=1 HTTP/1.1\r\nHost: test\r\n\r\n")
        await c.wait_for("TEST slow-started ", timeout=5)
        mark = len(c.lines)
        c.signal(signal.SIGTERM)
        await c.wait_for(r"asked to disconnect; draining", timeout=5, start=mark)
        head, _ = await request_on(*steady, "/")
        assert "connection: close" in head, head
        assert await asyncio.wait_for(steady[0].read(), timeout=3) == b""
        head = (await asyncio.wait_for(busy[0].readuntil(b"\r\n\r\n"), timeout=5)).decode().lower()
        assert "connection: close" in head, head
        assert await asyncio.wait_for(busy[0].read(), timeout=3) == b"slow done"
        assert await c.wait(timeout=5) == 0
    finally:
        for _, writer in (busy, steady):
            writer.close()


async def test_a_request_half_received_when_the_idle_connections_close_is_answered(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "10")
    )
    host, port = c.address.rsplit(":", 1)
    idle = await asyncio.open_connection(host, int(port))
    half = await asyncio.open_connection(host, int(port))
    try:
        await request_on(*idle, "/")
        await request_on(*half, "/")
        half[1].write(b"GET / HTTP/1.1\r\nHost: te")  # the next request, its head cut short
        await half[1].drain()
        mark = len(c.lines)
        c.signal(signal.SIGTERM)
        await c.wait_for(r"asked to disconnect; draining", timeout=5, start=mark)
        # The idle grace's sweep closes the idle connection; the one in the middle of a
        # request is not idle, so it stays open and its request is answered.
        assert await asyncio.wait_for(idle[0].read(), timeout=5) == b""
        half[1].write(b"st\r\n\r\n")
        head = (await asyncio.wait_for(half[0].readuntil(b"\r\n\r\n"), timeout=5)).decode()
        assert head.startswith("HTTP/1.1 200") and "connection: close" in head.lower(), head
        assert await c.wait(timeout=5) == 0
    finally:
        for _, writer in (idle, half):
            writer.close()


async def test_heartbeats_count_asgi_requests(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0", "--max-requests", "20")
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for _ in range(25):
            async with s.get(f"{c.url}/") as r:
                assert r.status == 200
    # The primary knows the count only from the worker's heartbeats.
    await c.wait_for(r"replacing worker 1 \(pid \d+\) \(served \d+ requests, limit 20\)")
    await c.wait_for(r"worker 1 \(pid \d+\) exited with code 0")


async def test_a_failing_lifespan_startup_is_a_boot_failure(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0"),
        env={"ASGI_FAIL_STARTUP": "1"},
        ready=False,
    )
    assert await c.wait(timeout=30) == 1
    assert "RuntimeError: the database is not there" in c.output
    assert "lifespan startup failed" in c.output
    assert "listening on 127.0.0.1" not in c.output


async def test_aiocluster_run_serves_an_asgi_app(start_cluster: StartCluster) -> None:
    c = await start_cluster(sys.executable, "asgi_script.py", "0")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(f"{c.url}/") as r:
        assert (await r.json())["worker"] in (1, 2)
    assert await c.stop() == 0


@pytest.mark.parametrize(
    ("app", "error"),
    [
        (["asgi_app:Asgi2App"], "asgi_app:Asgi2App looks like an ASGI 2 application"),
        (["asgi_app:sync_app"], "asgi_app:sync_app is a synchronous callable"),
        (
            ["asgi_app:makes_nothing", "--factory"],
            "the factory 'makes_nothing' returned int, not an aiohttp Application or an ASGI 3",
        ),
        (["asgi_app:app", "--factory"], "asgi_app:app is an ASGI application itself"),
        (["asgi_app:app", "--interface", "aiohttp"], "asgi_app:app is an ASGI application, not"),
        (["webapp:app", "--interface", "asgi"], "webapp:app is an aiohttp application, not"),
    ],
    ids=[
        "asgi2",
        "sync",
        "factory-returns-int",
        "app-as-factory",
        "asgi-as-aiohttp",
        "aiohttp-as-asgi",
    ],
)
async def test_what_cannot_be_served_is_one_line_error(
    start_cluster: StartCluster, app: list[str], error: str
) -> None:
    c = await start_cluster(*cli("run", *app, "-w", "1", "-b", "127.0.0.1:0"), ready=False)
    assert await c.wait(timeout=30) != 0
    errors = [line for line in c.lines if line.startswith("aiocluster: error: ")]
    assert errors, c.output
    assert error in errors[0], errors[0]
    assert "Traceback" not in c.output


async def test_without_the_asgi_extra_the_error_says_what_to_install(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    # A uvicorn that cannot be imported, ahead of the installed one on the path.
    (tmp_path / "uvicorn").mkdir()
    (tmp_path / "uvicorn" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'uvicorn'\", name='uvicorn')\n"
    )
    c = await start_cluster(
        *cli("run", "asgi_app:app", "-w", "1", "-b", "127.0.0.1:0"),
        env={"PYTHONPATH": f"{tmp_path}:{APPS}"},
        ready=False,
    )
    assert await c.wait(timeout=30) != 0
    errors = [line for line in c.lines if line.startswith("aiocluster: error: ")]
    assert errors, c.output
    assert "pip install 'aiocluster[asgi]'" in errors[0], errors[0]


async def test_protocol_and_a_different_interface_exclude_each_other(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "asgi_app:app", "--protocol", "--interface", "asgi"), ready=False
    )
    assert await c.wait(timeout=10) == 2
    assert "aiocluster: error: --protocol and --interface asgi exclude each other" in c.output


async def test_the_starlette_example(start_cluster: StartCluster) -> None:
    root = APPS.parent.parent
    c = await start_cluster(
        sys.executable, "examples/starlette_app.py", cwd=root, env={"PORT": "0"}
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(f"{c.url}/") as r:
            assert (await r.text()).startswith("Hello from worker ")
        async with s.ws_connect(f"{c.url}/ws") as ws:
            await ws.send_str("ping")
            assert await ws.receive_str() == "ping"
    assert await c.stop() == 0
