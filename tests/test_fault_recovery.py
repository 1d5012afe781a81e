"""Faults found by the fault runs of issue 15, each in a real cluster.

Kills from outside must not turn into outages, a stuck worker must not be fed under policy rr,
a worker out of descriptors must refuse connections rather than die, and slow clients must not
hold a stop. Every test here fails without the fix it names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal

import aiohttp
import pytest

from .actions import live_workers
from .conftest import StartCluster
from .harness import ClusterProcess, cli

pytestmark = pytest.mark.timeout(60)


class Probe:
    """One GET at a time, each on a fresh connection, until stopped: counts what failed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
            for _ in range(20_000):  # bounded; the test stops it long before
                if self._stop.is_set():
                    return
                try:
                    async with s.get(self.url) as r:
                        await r.read()
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self.failed.append(f"status {r.status}")
                except (aiohttp.ClientError, TimeoutError) as err:
                    self.failed.append(repr(err))


async def kill_listening(c: ClusterProcess, wid: int, sig: int) -> int:
    """Signal worker ``wid`` and wait until its replacement listens; the replacement's id."""
    mark = len(c.lines)
    os.kill(c.worker_pids[wid], sig)
    await c.wait_for(rf"worker {wid} \(pid \d+\) was killed by SIG\w+ unexpectedly", start=mark)
    m = await c.wait_for(r"started worker (\d+) ", start=mark, timeout=10)
    await c.wait_for(rf"worker {m.group(1)} \(pid \d+\) listening on", start=mark, timeout=10)
    return int(m.group(1))


@pytest.mark.parametrize("policy", ["shared", "rr", "reuseport"])
async def test_serving_workers_killed_from_outside_restart_at_once(
    start_cluster: StartCluster, policy: str
) -> None:
    """Fault 1: SIGKILLs within seconds of each other used to back the slots off (0.5, 1, 2 s)."""
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", policy)
    )
    kills = 8
    async with Probe(f"{c.url}/") as probe:
        for i in range(kills):
            victim = sorted(live_workers(c))[i % 2]
            await kill_listening(c, victim, signal.SIGKILL)
    assert c.count(r"restarting slot \d at once \(killed while serving: not a crash\)") == kills
    assert c.count(r"restarting slot \d in ") == 0
    assert probe.ok > 0
    # At most the connections the victim held: here one at a time, each retried by nobody.
    assert len(probe.failed) <= kills, probe.failed


async def test_a_crash_loop_backs_off_but_never_with_nobody_listening(
    start_cluster: StartCluster,
) -> None:
    """Fault 1: the back-off of the only slot used to leave the cluster with no listener."""
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    for _ in range(3):
        # SIGABRT is a worker's own crash (an abort in C code), not a kill from outside.
        await kill_listening(c, sorted(live_workers(c))[0], signal.SIGABRT)
    assert c.count(r"restarting slot 1 in ") == 0
    assert c.count(r"crash [23] in a row; no other worker listening\)") == 2


async def test_a_crash_loop_still_backs_off_while_another_worker_serves(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0"))
    mark = len(c.lines)
    again = await kill_listening(c, min(live_workers(c)), signal.SIGABRT)
    os.kill(c.worker_pids[again], signal.SIGABRT)
    await c.wait_for(r"restarting slot 1 in 0.5s \(crash 2 in a row\)", start=mark)


async def get_worker(url: str, timeout: float) -> int:
    """One GET on a fresh connection: the id of the worker that answered."""
    connector = aiohttp.TCPConnector(force_close=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=client_timeout) as s,
        s.get(url) as r,
    ):
        assert r.status == 200
        data = await r.json()
        return int(data["worker"])


@pytest.mark.parametrize("balance", ["round-robin", "least-conn"])
async def test_rr_routes_around_a_stopped_worker(start_cluster: StartCluster, balance: str) -> None:
    """Fault 2: a SIGSTOPped worker kept getting new connections until 16 were unanswered."""
    c = await start_cluster(
        *cli(
            "run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", "rr",
            "--balance", balance, "--timeout", "40",
        )
    )  # fmt: skip
    stopped = c.worker_pids[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        # Each probe gets well under the 2 s + 1 s the primary may take to route around it.
        answers = [await get_worker(f"{c.url}/", timeout=6) for _ in range(10)]
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert set(answers) == {2}
    await c.wait_for(r"worker 1 \(pid \d+\) answers again")
    assert c.count("after they were handed to another worker") == 0
    assert c.count(r"worker 1 \(pid \d+\) (was killed|exited)") == 0
    # Once it answers, it is a candidate again.
    async with asyncio.timeout(10):
        while await get_worker(f"{c.url}/", timeout=6) != 1:
            pass


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_rr_worker_out_of_descriptors_refuses_instead_of_dying(
    start_cluster: StartCluster,
) -> None:
    """Fault 3: a newconn truncated by EMFILE (MSG_CTRUNC) used to kill the worker."""
    c = await start_cluster(
        *cli("run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0", "--policy", "rr")
    )
    starved = c.worker_pids[1]
    _, hard = resource.prlimit(starved, resource.RLIMIT_NOFILE)
    # Room for a few connections, then the kernel cannot pass it any more descriptors.
    resource.prlimit(starved, resource.RLIMIT_NOFILE, (open_fds(starved) + 4, hard))
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(40):
            held.append(await asyncio.open_connection("127.0.0.1", c.port))
        await c.wait_for(r"worker 1 \(pid \d+\) cannot take connections \(out of descriptors")
        # Every held connection is served, by one worker or the other.
        for _, writer in held:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for reader, _ in held:
            async with asyncio.timeout(10):
                assert (await reader.read()).startswith(b"HTTP/1.1 200")
    finally:
        for _, writer in held:
            writer.close()
    assert c.count(r"worker \d \(pid \d+\) (was killed|exited)") == 0
    assert c.count("protocol error") == 0
    # With its connections closed it has room again and serves.
    async with asyncio.timeout(10):
        while await get_worker(f"{c.url}/", timeout=6) != 1:
            pass


async def trickle(port: int, stop: asyncio.Event, sent: asyncio.Queue[None] | None = None) -> bool:
    """A slow client: one byte of a request head at a time; True once the server closed it.

    ``sent`` hears once its third byte is out (so a worker has the connection by then).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    count = 0
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200:
            writer.write(bytes([byte]))
            await writer.drain()
            count += 1
            if count == 3 and sent is not None:
                sent.put_nowait(None)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    if await reader.read(1) == b"":
                        return True
            if stop.is_set():
                return False
        return False
    except OSError:
        return True
    finally:
        writer.close()


async def test_slow_clients_do_not_hold_a_stop(start_cluster: StartCluster) -> None:
    """Fault 4: connections still sending their request head counted as busy until the deadline."""
    c = await start_cluster(
        *cli(
            "run", "webapp:app", "-w", "2", "-b", "127.0.0.1:0",
            "--graceful-timeout", "30", "--keep-alive", "60",
        )
    )  # fmt: skip
    stop = asyncio.Event()
    sent: asyncio.Queue[None] = asyncio.Queue()
    clients = [asyncio.create_task(trickle(c.port, stop, sent)) for _ in range(30)]
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(10):
        for _ in clients:
            await sent.get()  # every client is part-way through its request head
    began = loop.time()
    assert await c.stop(timeout=15) == 0
    took = loop.time() - began
    stop.set()
    closed = await asyncio.gather(*clients)
    assert all(closed)  # the server closed every one
    # Closed after the idle grace (2 s) every connection gets, not at the 30 s deadline.
    assert took < 6, f"stop took {took:.1f}s with a 30s graceful timeout"
    assert c.count("still busy at the graceful deadline") == 0


async def test_keep_alive_closes_a_slow_client_and_limits_answer_400(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(
        *cli(
            "run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0",
            "--keep-alive", "1", "--limit-request-fields", "3",
        )
    )  # fmt: skip
    async with asyncio.timeout(6):
        assert await trickle(c.port, asyncio.Event())  # closed by --keep-alive, not by us
    reader, writer = await asyncio.open_connection("127.0.0.1", c.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n")
    async with asyncio.timeout(5):
        assert b" 400 " in await reader.readline()
    writer.close()


async def test_bad_control_requests_are_one_line_with_their_reason_and_a_count(
    start_cluster: StartCluster,
) -> None:
    """Fault 5: each idle connect to the control socket logged an empty reason, one line each."""
    c = await start_cluster(*cli("run", "webapp:app", "-w", "1", "-b", "127.0.0.1:0"))
    path = (await c.wait_for(r"control socket at (\S+)")).group(1)
    for _ in range(20):  # liveness probes (what `aiocluster status` does): not bad requests
        _, writer = await asyncio.open_unix_connection(path)
        writer.close()
        await writer.wait_closed()
    for _ in range(50):
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(b"\x00")  # a byte of a header, then gone
        writer.close()
        await writer.wait_closed()
    _, writer = await asyncio.open_unix_connection(path)
    writer.write(b"\x00\x00")  # two bytes, then gone
    writer.close()
    first = await c.wait_for(r"bad control request: (.+)")
    assert first.group(1) == "the client closed the connection 1 bytes into a 5-byte read"
    summary = await c.wait_for(
        r"bad control request: (\d+) more in the last 10s \(the last: (.+)\)"
    )
    assert summary.group(1) == "50"  # 49 more one-byte tries and the two-byte one
    assert summary.group(2) == "the client closed the connection 2 bytes into a 5-byte read"
    assert c.count("bad control request") == 2
