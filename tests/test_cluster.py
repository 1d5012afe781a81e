"""The cluster core with real processes: one port for many workers, handles, stop, messages."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import sys
import typing
from pathlib import Path

import aiohttp
import pytest

from aiocluster._errors import ClusterFailed, ListenRefused, listen_refused
from aiocluster.worker.serve import _start_unless_stopped

from .conftest import StartCluster
from .harness import APPS, READY, ClusterProcess, cli, pid_alive, wait_pid_gone

pytestmark = pytest.mark.timeout(60)


async def get_json(
    url: str, *, connector: aiohttp.BaseConnector | None = None
) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(connector=connector or aiohttp.TCPConnector(force_close=True)) as s,
        s.get(url, timeout=aiohttp.ClientTimeout(total=15)) as r,
    ):
        assert r.status == 200, await r.text()
        data = await r.json()
        assert isinstance(data, dict)
        return data


async def one_request_per_worker(c: ClusterProcess, n: int) -> list[dict[str, object]]:
    """Send ``n`` requests that each block the loop of the worker that takes them.

    The next request starts only once the previous one is blocking a worker, so each lands on
    a worker that is free: n requests reach n different workers through the one socket.
    """
    tasks = []
    for _ in range(n):
        mark = len(c.lines)
        tasks.append(asyncio.create_task(get_json(f"{c.url}/block?s={1 + 0.5 * n}")))
        await c.wait_for("TEST block-started", start=mark)
    return await asyncio.gather(*tasks)


async def test_several_workers_answer_on_one_port(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "3", "-b", "127.0.0.1:0"))
    workers = c.worker_pids
    assert len(workers) == 3
    answers = await one_request_per_worker(c, 3)
    assert {a["pid"] for a in answers} == set(workers.values())


async def test_port_zero_is_one_real_port_for_all(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    assert c.count(r"primary: listening on ") == 1
    assert c.port != 0
    for pid in c.worker_pids.values():
        assert c.count(rf"\(pid {pid}\) listening on 127\.0\.0\.1:{c.port}$") == 1
    answers = await one_request_per_worker(c, 2)
    assert len({a["pid"] for a in answers}) == 2


async def test_bind_error_stops_the_cluster_with_the_error(start_cluster: StartCluster) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        c = await start_cluster(
            *cli("run", "webapp:app", "-w", "2", "-b", f"127.0.0.1:{port}"), ready=False
        )
        assert await c.wait() == 1
    finally:
        taken.close()
    assert f"cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use" in c.output
    # Said once, by the primary: the worker whose listen it refused exits without a traceback
    # of its own, and nobody respawns a worker into the same error (the second slot may not
    # even start: the cluster is stopping by then).
    assert c.count("Address already in use") == 1, c.output
    assert "Traceback" not in c.output, c.tracebacks()
    assert 1 <= len(c.worker_pids) <= 2
    for pid in c.worker_pids.values():
        assert not pid_alive(pid)


async def test_unix_socket_replaces_a_stale_file_and_removes_it(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a server that died without unlinking its socket file
    stale.close()
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", f"unix:{path}"))
    assert c.address == f"unix:{path}"
    connector = aiohttp.UnixConnector(path=str(path), force_close=True)
    data = await get_json("http://localhost/", connector=connector)
    assert data["pid"] in c.worker_pids.values()
    assert await c.stop() == 0
    assert not path.exists()


async def test_unix_socket_in_use_is_not_taken_over(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    path = tmp_path / "busy.sock"
    busy = socket.socket(socket.AF_UNIX)
    busy.bind(str(path))
    busy.listen()
    try:
        c = await start_cluster(
            *cli("run", "webapp:app", "-w", "1", "-b", f"unix:{path}"), ready=False
        )
        assert await c.wait() == 1
        assert "another server is listening on" in c.output
        assert path.exists()
    finally:
        busy.close()


async def test_two_listeners_in_one_worker(start_cluster: StartCluster, tmp_path: Path) -> None:
    path = tmp_path / "second.sock"
    c = await start_cluster(
        *cli(
            "run",
            "webapp:app",
            "-w",
            "2",
            "-b",
            "127.0.0.1:0",
            "-b",
            "127.0.0.1:0",
            "-b",
            f"unix:{path}",
        )
    )
    # Ready means every worker serves all three binds, not just its first one.
    ready_at = next(i for i, line in enumerate(c.lines) if re.search(READY, line))
    before_ready = c.lines[:ready_at]
    addresses = [m for m in before_ready if "primary: listening on" in m]
    assert len(addresses) == 3
    for worker_id in c.worker_pids:
        served = [
            m for m in before_ready if re.search(rf"worker {worker_id} \(pid \d+\) listening on", m)
        ]
        assert len(served) == 3, c.output
    ports = {int(line.rsplit(":", 1)[1]) for line in addresses if "unix:" not in line}
    assert len(ports) == 2  # two listens on port 0 in one worker: two sockets, as in Node
    for port in ports:
        data = await get_json(f"http://127.0.0.1:{port}/")
        assert data["pid"] in c.worker_pids.values()
    data = await get_json("http://localhost/", connector=aiohttp.UnixConnector(path=str(path)))
    assert data["pid"] in c.worker_pids.values()


async def test_graceful_stop_finishes_in_flight_request(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    url = c.url
    request = asyncio.create_task(get_json(f"{url}/slow?s=1.5"))
    await c.wait_for("TEST slow-started")
    mark = len(c.lines)
    c.signal(signal.SIGTERM)
    await c.wait_for("stopping 2 workers", start=mark)
    answer = await request
    assert answer["done"] is True
    assert await c.wait() == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_json(f"{url}/")


async def test_second_sigint_stops_at_once(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "30")
    )
    request = asyncio.create_task(get_json(f"{c.url}/slow?s=20"))
    await c.wait_for("TEST slow-started")
    c.signal(signal.SIGINT)
    await c.wait_for("SIGINT received: draining")
    c.signal(signal.SIGINT)
    assert await c.wait(timeout=10) != 0
    assert "stop forced" in c.output
    with pytest.raises(aiohttp.ClientError):
        await request


async def test_repeated_sigterm_never_forces(start_cluster: StartCluster) -> None:
    """timeout(1), process-group kills and orchestrators send SIGTERM more than once."""
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "30")
    )
    request = asyncio.create_task(get_json(f"{c.url}/slow?s=2"))
    await c.wait_for("TEST slow-started")
    for n in range(1, 4):  # one at a time: pending signals of one kind merge into one
        c.signal(signal.SIGTERM)
        await c.wait_count("SIGTERM received", n)
    assert "already draining" in c.output
    answer = await request  # the in-flight request finished: nothing was killed
    assert answer["done"] is True
    assert await c.wait(timeout=10) == 0
    assert "stop forced" not in c.output


async def test_sigquit_stops_at_once(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0", "--graceful-timeout", "30")
    )
    request = asyncio.create_task(get_json(f"{c.url}/slow?s=20"))
    await c.wait_for("TEST slow-started")
    c.signal(signal.SIGQUIT)
    assert await c.wait(timeout=10) != 0
    assert "SIGQUIT received: stopping now" in c.output
    with pytest.raises(aiohttp.ClientError):
        await request


async def test_primary_sigkill_leaves_no_worker(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "3", "-b", "127.0.0.1:0"))
    pids = list(c.worker_pids.values())
    c.signal(signal.SIGKILL)
    for pid in pids:
        await wait_pid_gone(pid, timeout=15)
        assert not pid_alive(pid)
    await c.wait()
    assert c.count("lost the channel to the primary") == 3


async def test_script_with_run_is_primary_and_worker(start_cluster: StartCluster) -> None:
    port = free_port()
    c = await start_cluster(sys.executable, "script_app.py", str(port))
    assert c.port == port
    data = await get_json(f"http://127.0.0.1:{port}/")
    assert data["worker"] in c.worker_pids
    assert await c.stop() == 0


async def test_messages_both_ways(start_cluster: StartCluster) -> None:
    port = free_port()
    c = await start_cluster(sys.executable, "script_app.py", str(port))
    data = await get_json(f"http://127.0.0.1:{port}/send?text=ping")
    reply = data["reply"]
    assert isinstance(reply, dict)
    assert reply["echo"]["text"] == "ping"
    assert reply["to"] == reply["echo"]["from"]
    assert c.worker_pids[reply["to"]] == data["pid"]


async def test_protocol_factory(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:EchoProtocol", "--protocol", "-w", "2", "-b", "127.0.0.1:0")
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    try:
        banner = await asyncio.wait_for(reader.readline(), 10)
        assert banner.startswith(b"worker ")
        writer.write(b"hello cluster\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"hello cluster\n"
    finally:
        writer.close()
    assert await c.stop() == 0


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_a_protocol_server_never_loads_aiohttp(
    start_cluster: StartCluster, start: str
) -> None:
    """aiohttp's import is most of an aiohttp worker's start; a protocol server does not need it
    (the zygote included: what it loads, every worker forked from it has)."""
    if start == "fork" and sys.platform != "linux":
        pytest.skip("start method fork is Linux-only")
    c = await start_cluster(
        *cli("run", "bare_proto:Loaded", "--protocol", "-w", "1", "-b", "127.0.0.1:0"),
        *("--start", start),
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b"aiohttp=False\n"
    finally:
        writer.close()
    assert await c.stop() == 0


@pytest.mark.parametrize("protocol", ["EchoProtocol", "PoliteEchoProtocol"])
async def test_a_stopping_protocol_worker_calls_drain_then_waits(
    start_cluster: StartCluster, protocol: str
) -> None:
    """A protocol's ``drain()`` lets it end its connections well; one without the hook keeps
    its connection until it ends or the graceful timeout passes."""
    c = await start_cluster(
        *cli("run", f"webapp:{protocol}", "--protocol", "-w", "1", "-b", "127.0.0.1:0"),
        *("--graceful-timeout", "30"),
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"worker ")
        c.signal(signal.SIGTERM)
        await c.wait_for("asked to disconnect; draining|SIGTERM received")
        if protocol == "PoliteEchoProtocol":
            assert await asyncio.wait_for(reader.read(), 10) == b"bye\n"
            assert await c.wait(timeout=20) == 0
        else:
            await c.wait_for(r"stopping 1 workers")
            writer.write(b"still here\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"still here\n"
    finally:
        writer.close()
    assert await c.wait(timeout=20) == 0


async def test_a_stop_while_workers_start_ends_their_start_cleanly(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    """SIGTERM while the workers are still in the application's start: they never serve and
    exit 0, and so does the primary, long before the graceful timeout."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    c = await start_cluster(
        *cli("run", "webapp:slow_factory", "--factory", "-w", "2", "-b", "127.0.0.1:0"),
        *("--graceful-timeout", "60"),
        env={"GATE": str(gate)},
        ready=False,
    )
    await c.wait_count("TEST factory-waiting", 2)
    c.signal(signal.SIGTERM)
    assert await c.wait(timeout=20) == 0
    assert c.count(r"told to stop while starting: not serving") == 2
    assert c.count(r"worker \d \(pid \d+\) exited with code 0") == 2
    assert "Traceback" not in c.output


async def test_a_listen_asked_for_once_the_cluster_stops_is_refused(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    """A worker that asks for its socket after the stop began (it started just before) is
    refused: the primary opens no port again and does not call the stop a failure."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    port = free_port()
    c = await start_cluster(
        sys.executable, "gated_listen.py", str(port), env={"GATE": str(gate)}, ready=False
    )
    await c.wait_for("TEST gate-waiting")
    c.signal(signal.SIGTERM)
    await c.wait_for(r"stopping 1 workers")
    stopping = len(c.lines)
    writer = os.open(gate, os.O_RDWR)
    try:
        os.write(writer, b"!")
        await c.wait_for(r"TEST listen refused: .*the cluster is stopping")
    finally:
        os.close(writer)
    assert await c.wait(timeout=20) == 0
    assert not any("listening on" in line for line in c.lines[stopping:]), c.output


async def test_dead_worker_is_replaced(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    first = c.worker_pids[1]
    os.kill(first, signal.SIGKILL)
    await c.wait_for(r"worker 1 \(pid \d+\) was killed by SIGKILL unexpectedly")
    await c.wait_for(r"worker 3 \(pid \d+\) listening on")
    answers = await one_request_per_worker(c, 2)
    assert {a["worker"] for a in answers} == {2, 3}


async def test_application_that_cannot_start_stops_the_cluster(start_cluster: StartCluster) -> None:
    c = await start_cluster(
        *cli("run", "webapp:broken_factory", "--factory", "-w", "2", "-b", "127.0.0.1:0"),
        ready=False,
    )
    assert await c.wait() == 1
    assert "RuntimeError: this application cannot start" in c.output
    assert "3 workers in a row exited before listening" in c.output
    # A couple of retries (a boot failure can be a fluke), then a stop: no respawn loop.
    assert 3 <= len(c.worker_pids) <= 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nocolon"], "APP must look like module:attribute"),
        (["no_such_module:app"], "cannot find module 'no_such_module'"),
        (["webapp:app", "-w", "0"], "must be at least 1"),
        (["webapp:app", "-b", "127.0.0.1:http"], "is not a number"),
        (["webapp:app", "-b", "::1:80"], "IPv6 addresses in brackets"),
        (["webapp:app", "-b", "127.0.0.1:70000"], "port must be an integer from 0 to 65535"),
        (["webapp:app", "--graceful-timeout", "-1"], "must be a finite number >= 0"),
    ],
)
async def test_cli_rejects_bad_input_clearly(
    start_cluster: StartCluster, args: list[str], message: str
) -> None:
    c = await start_cluster(*cli("run", *args), ready=False)
    assert await c.wait() == 2
    assert message in c.output
    assert "Traceback" not in c.output
    assert not c.worker_pids


async def test_cli_app_of_the_wrong_kind_is_a_clear_boot_failure(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli("run", "webapp:not_an_app", "-w", "1", "-b", "127.0.0.1:0"), ready=False
    )
    assert await c.wait() == 2
    assert "not an aiohttp Application or an ASGI application; pass --factory" in c.output


async def test_example_from_the_readme(start_cluster: StartCluster) -> None:
    root = APPS.parent.parent
    c = await start_cluster(sys.executable, "examples/hello.py", cwd=root, env={"PORT": "0"})
    async with aiohttp.ClientSession() as s, s.get(f"{c.url}/") as r:
        assert r.status == 200
        assert (await r.text()).startswith("Hello from worker ")
    assert await c.stop() == 0


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


async def test_each_worker_runs_the_full_aiohttp_lifecycle(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    for step in ("on_startup", "cleanup_ctx-enter"):
        assert c.count(f"TEST {step} ") == 2
    assert await c.stop() == 0
    for step in ("on_shutdown", "on_cleanup", "cleanup_ctx-exit"):
        assert c.count(f"TEST {step} ") == 2, step


async def test_primary_events_and_disconnect(start_cluster: StartCluster) -> None:
    port = free_port()
    c = await start_cluster(sys.executable, "script_app.py", str(port))
    for event in ("fork", "online", "listening"):
        await c.wait_count(f"EVENT {event} ", 2)
    assert c.count(rf"EVENT listening worker=1 pid=\d+ 127\.0\.0\.1:{port}") == 1
    data = await get_json(f"http://127.0.0.1:{port}/send?text=disconnect-me&wait=no")
    await c.wait_for(r"EVENT disconnect worker=\d")
    await c.wait_for(rf"EVENT exit worker={data['worker']} pid={data['pid']} 0")
    # A worker that left when asked is not a crash: nobody replaces it, nobody complains.
    assert "unexpectedly" not in c.output
    assert len(c.worker_pids) == 2
    assert await c.stop() == 0


async def test_own_app_runner_with_cluster_site(start_cluster: StartCluster) -> None:
    port = free_port()
    c = await start_cluster(sys.executable, "custom_runner.py", str(port))
    await c.wait_count(f"TEST custom-site http://127.0.0.1:{port}", 2)
    data = await get_json(f"http://127.0.0.1:{port}/")
    assert data["worker"] in c.worker_pids
    assert await c.stop() == 0
    assert c.count("TEST on_cleanup ") == 2


async def test_create_server_outside_a_cluster_binds_locally() -> None:
    import aiocluster

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            typing.cast(asyncio.Transport, transport).write(b"hi\n")
            transport.close()

    server = await aiocluster.create_server(Hello, "127.0.0.1", 0)
    async with server:
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.readline(), 5) == b"hi\n"
        writer.close()


async def test_a_start_runs_to_its_end_unless_a_stop_comes_first() -> None:
    """The worker's start against its stop, on a real loop: which wins, and what is raised."""
    stopping = asyncio.Event()

    async def start(gate: asyncio.Event, error: Exception | None = None) -> None:
        await gate.wait()
        if error is not None:
            raise error

    opened = asyncio.Event()
    opened.set()
    assert await _start_unless_stopped(stopping, start(opened)) is True
    with pytest.raises(OSError, match="real"):
        await _start_unless_stopped(stopping, start(opened, OSError("real")))

    never = asyncio.Event()
    cancelled = asyncio.get_running_loop().create_future()

    async def stuck() -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set_result(True)
            raise

    racing = asyncio.create_task(_start_unless_stopped(stopping, stuck()))
    await asyncio.sleep(0)  # let the start begin before the stop
    stopping.set()
    assert await racing is False
    assert cancelled.result() is True
    # The primary refused the listen because the cluster is stopping: not the worker's error.
    refused = OSError(errno.ESHUTDOWN, "the cluster is stopping")
    assert await _start_unless_stopped(stopping, start(opened, refused)) is False
    # Any other failure is, stopping or not (a bind error stops the cluster, then reaches here).
    taken = OSError(errno.EADDRINUSE, "Address already in use")
    with pytest.raises(OSError, match="in use"):
        await _start_unless_stopped(stopping, start(opened, taken))
    # A listen the primary refused (it logged why) ends the worker as a failed cluster does.
    refused_here = listen_refused(errno.EADDRINUSE, "Address already in use (127.0.0.1:1)")
    with pytest.raises(ClusterFailed, match="in use") as failed:
        await _start_unless_stopped(asyncio.Event(), start(opened, refused_here))
    assert failed.value.status == 1 and failed.value.__cause__ is refused_here


def test_a_refused_listen_is_the_oserror_its_errno_maps_to() -> None:
    """As a failed bind() raises: code catching PermissionError keeps working."""
    denied = listen_refused(errno.EACCES, "Permission denied (127.0.0.1:80)")
    assert isinstance(denied, PermissionError) and isinstance(denied, ListenRefused)
    assert (denied.errno, denied.strerror) == (errno.EACCES, "Permission denied (127.0.0.1:80)")
    assert type(listen_refused(errno.EACCES, "again")) is type(denied)
    in_use = listen_refused(errno.EADDRINUSE, "Address already in use")
    assert type(in_use) is ListenRefused and str(in_use) == "[Errno 98] Address already in use"


@pytest.mark.parametrize("start", ["fork", "spawn"])
async def test_ctrl_c_reaches_only_the_primary_and_workers_share_its_session(
    start_cluster: StartCluster, start: str
) -> None:
    """A terminal's Ctrl-C is SIGINT to its foreground process group: only the primary may get
    it, and drain the workers in order. The workers and the zygote are in process groups of
    their own, but in the primary's session: with autogroup scheduling a session of their own
    each would weigh as much as a co-located proxy's whole session."""
    # setsid(1) makes the primary a session and process group leader, as a shell makes a job.
    c = await start_cluster(
        "setsid", *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--start", start)
    )
    assert c.proc is not None
    primary = c.proc.pid
    assert os.getpgid(primary) == primary
    started = list(c.worker_pids.values())
    for pid in started:
        assert os.getsid(pid) == os.getsid(primary), "a worker left the primary's session"
        assert os.getpgid(pid) == pid, "a worker shares a process group"
    os.killpg(primary, signal.SIGINT)
    assert await c.wait() == 0
    assert "SIGINT received: draining" in c.output
    assert not c.count(r"\[worker \d+ \d+\] INFO aiocluster: SIGINT received")
    assert "Traceback" not in c.output
    assert "zygote" not in c.output.split("SIGINT received: draining", 1)[1].lower()
    for pid in started:
        await wait_pid_gone(pid, 10)
