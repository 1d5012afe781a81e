"""Scheduling policies with real processes: who holds which socket, who serves which client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from aiocluster.primary.scheduling import sticky_order
from aiocluster.primary.steering import Rotation

from .actions import open_gate
from .conftest import StartCluster
from .harness import ClusterProcess, cli
from .test_cluster import free_port

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; reuseport is Linux-only"),
]

TIMEOUT = aiohttp.ClientTimeout(total=15)


def run_app(*args: str, workers: int = 3) -> list[str]:
    return cli("run", "webapp:app", "-w", str(workers), "-b", "127.0.0.1:0", *args)


async def get_json(url: str, source: str | None = None) -> dict[str, object]:
    """GET ``url`` on a fresh connection (from ``source``, if given)."""
    connector = aiohttp.TCPConnector(
        force_close=True, local_addr=(source, 0) if source is not None else None
    )
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as s, s.get(url) as r:
        assert r.status == 200, await r.text()
        data = await r.json()
    assert isinstance(data, dict)
    return data


async def worker_of(url: str, source: str | None = None) -> int:
    """The worker that answers ``url`` on a fresh connection (from ``source``, if given)."""
    worker = (await get_json(url, source))["worker"]
    assert isinstance(worker, int)
    return worker


async def send_raw(
    port: int, path: str = "/", tls: ssl.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect (over TLS with ``tls``) and send a request; the answer is read later (the
    connection may be queued)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def answer_raw(client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> dict[str, int]:
    reader, writer = client
    try:
        async with asyncio.timeout(15):
            response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


async def cut_off(client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """The connection ends with no answer (its worker was killed); a raw socket, so no retry."""
    reader, writer = client
    try:
        async with asyncio.timeout(15):
            assert await reader.read() == b""
    except ConnectionResetError:
        pass
    finally:
        writer.close()


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port`` (this network namespace)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(int(m.group(1)))
    return inodes


def primary_pid(c: ClusterProcess) -> int:
    assert c.proc is not None
    return c.proc.pid


async def counts_at_stop(c: ClusterProcess) -> dict[int, int]:
    assert await c.stop() == 0
    m = re.search(r"connections per worker: (.*)$", c.output, re.MULTILINE)
    assert m, c.output
    return {int(k): int(v) for k, v in (item.split("=") for item in m.group(1).split(", "))}


# -- shared ----------------------------------------------------------------------------------


async def test_shared_is_one_socket_that_every_worker_holds(start_cluster: StartCluster) -> None:
    c = await start_cluster(*run_app())
    (inode,) = listening_inodes(c.port)
    assert inode in socket_inodes(primary_pid(c))
    for pid in c.worker_pids.values():
        assert listening_inodes(c.port) & socket_inodes(pid) == {inode}
    # one connection to each worker (each blocks the loop of the worker that takes it)
    requests = []
    for _ in range(3):
        mark = len(c.lines)
        requests.append(asyncio.create_task(worker_of(f"{c.url}/block?s=2.5")))
        await c.wait_for("TEST block-started", start=mark)
    assert sorted(await asyncio.gather(*requests)) == [1, 2, 3]
    assert await counts_at_stop(c) == {1: 1, 2: 1, 3: 1}


# -- rr --------------------------------------------------------------------------------------


async def test_rr_only_the_primary_listens(start_cluster: StartCluster) -> None:
    c = await start_cluster(*run_app("--policy", "rr"))
    (inode,) = listening_inodes(c.port)
    assert inode in socket_inodes(primary_pid(c))
    for pid in c.worker_pids.values():
        assert not listening_inodes(c.port) & socket_inodes(pid)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_rr_rotates_fresh_and_keepalive_connections_in_order(
    start_cluster: StartCluster, loop: str
) -> None:
    c = await start_cluster(*run_app("--policy", "rr", *(["--no-uvloop"] * (loop == "asyncio"))))
    assert [await worker_of(f"{c.url}/") for _ in range(9)] == [1, 2, 3] * 3
    sessions = []
    firsts = []
    try:
        for _ in range(6):
            connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection per session
            session = aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)
            sessions.append(session)
            workers = []
            for _ in range(3):
                async with session.get(f"{c.url}/") as r:
                    workers.append((await r.json())["worker"])
            assert len(set(workers)) == 1  # every request of a connection: one worker
            firsts.append(workers[0])
    finally:
        for session in sessions:
            await session.close()
    assert firsts == [1, 2, 3, 1, 2, 3]
    assert await counts_at_stop(c) == {1: 5, 2: 5, 3: 5}


async def test_rr_protocol_server_and_unix_socket(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    path = tmp_path / "rr.sock"
    c = await start_cluster(
        *cli("run", "webapp:EchoProtocol", "--protocol", "-w", "2", "-b", f"unix:{path}"),
        env={"AIOCLUSTER_POLICY": "rr"},  # the environment names the policy
    )
    banners = []
    for _ in range(4):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            banners.append((await asyncio.wait_for(reader.readline(), 10)).split()[1])
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        finally:
            writer.close()
    assert banners == [b"1", b"2", b"1", b"2"]
    assert await counts_at_stop(c) == {1: 2, 2: 2}


async def test_rr_draining_worker_gets_no_new_connection_and_finishes_its_own(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*run_app("--policy", "rr", "--graceful-timeout", "10", workers=2))
    slow = asyncio.create_task(get_json(f"{c.url}/slow?s=2"))  # rotation: worker 1
    await c.wait_for("TEST slow-started worker=1")
    mark = len(c.lines)
    os.kill(c.worker_pids[1], signal.SIGTERM)
    await c.wait_for(r"\[worker 1 \d+\] INFO aiocluster: SIGTERM received; draining", start=mark)
    assert [await worker_of(f"{c.url}/") for _ in range(4)] == [2, 2, 2, 2]
    answer = await slow  # an adopted connection is drained like any other
    assert (answer["pid"], answer["done"]) == (c.worker_pids[1], True)


async def test_rr_connection_of_a_worker_that_dies_before_taking_it_is_kept(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*run_app("--policy", "rr", workers=2))
    blocked = await send_raw(c.port, "/block?s=30")  # worker 1, its loop stuck
    await c.wait_for("TEST block-started worker=1")
    assert await worker_of(f"{c.url}/") == 2
    handed = asyncio.create_task(worker_of(f"{c.url}/"))  # rotation: worker 1, which is stuck
    await c.wait_for(r"worker 1 \(pid \d+\) has not answered for .* looks blocked")
    os.kill(c.worker_pids[1], signal.SIGKILL)
    assert await handed in (2, 3)
    await c.wait_for(r"worker 1 \(pid \d+\) is gone with 1 connection\(s\) it had not ackn")
    await cut_off(blocked)  # the one it had taken dies with it, as with any policy


async def test_least_conn_spreads_held_connections(start_cluster: StartCluster) -> None:
    c = await start_cluster(*run_app("--policy", "rr", "--balance", "least-conn"))
    held = []
    try:
        for _ in range(6):
            held.append(await send_raw(c.port, "/slow?s=1"))
        worker_of_pid = {pid: wid for wid, pid in c.worker_pids.items()}
        workers = Counter([worker_of_pid[(await answer_raw(client))["pid"]] for client in held])
    finally:
        for _, writer in held:
            writer.close()
    assert workers == {1: 2, 2: 2, 3: 2}
    assert await counts_at_stop(c) == {1: 2, 2: 2, 3: 2}


async def test_sticky_by_source_address(start_cluster: StartCluster) -> None:
    c = await start_cluster(*run_app("--policy", "rr", "--sticky"))
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    home = {src: sticky_order(src, [1, 2, 3])[0] for src in sources}  # worker id == slot
    assert len(set(home.values())) == 3
    for src in sources:
        assert [await worker_of(f"{c.url}/", src) for _ in range(2)] == [home[src]] * 2
    gone = home[sources[0]]
    os.kill(c.worker_pids[gone], signal.SIGKILL)
    await c.wait_for(r"worker 4 \(pid \d+\) listening on")
    for src in sources:  # the dead slot's clients reach its replacement; nobody else moved
        assert await worker_of(f"{c.url}/", src) == (4 if home[src] == gone else home[src])


# -- reuseport -------------------------------------------------------------------------------


async def test_reuseport_one_socket_per_slot_all_held_by_the_primary(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*run_app("--policy", "reuseport"))
    for slot in (1, 2, 3):
        assert c.count(rf"primary: listening on {c.address} \(SO_REUSEPORT, slot {slot}\)") == 1
    inodes = listening_inodes(c.port)
    assert len(inodes) == 3
    assert inodes <= socket_inodes(primary_pid(c))
    held = [inodes & socket_inodes(pid) for pid in c.worker_pids.values()]
    assert all(len(mine) == 1 for mine in held)
    assert set().union(*held) == inodes


async def test_reuseport_killed_workers_queued_connections_reach_its_replacement(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*run_app("--policy", "reuseport", workers=1))
    (inode,) = listening_inodes(c.port)
    blocked = await send_raw(c.port, "/block?s=30")
    await c.wait_for("TEST block-started worker=1")
    # The worker's loop is stuck: these wait in its slot's accept queue, unaccepted.
    queued = [await send_raw(c.port) for _ in range(3)]
    os.kill(c.worker_pids[1], signal.SIGKILL)
    answers = [await answer_raw(client) for client in queued]
    assert [a["worker"] for a in answers] == [2, 2, 2]  # the replacement, on the same socket
    assert listening_inodes(c.port) == {inode}
    await cut_off(blocked)


async def test_reuseport_scale_down_serves_the_retired_slots_queue(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(sys.executable, "policy_app.py", "0")
    assert len(listening_inodes(c.port)) == 2
    os.kill(c.worker_pids[2], signal.SIGSTOP)  # slot 2 stops accepting; its queue fills
    clients = [await send_raw(c.port) for _ in range(24)]
    c.signal(signal.SIGUSR2)
    handed = int((await c.wait_for(r"TEST drained slot 2: (\d+)")).group(1))
    answers = [await answer_raw(client) for client in clients]
    assert [a["worker"] for a in answers] == [1] * 24
    # A stopped worker still serves as far as the primary knows: slot 2 had its turn, half of
    # them in rotation (or about half by the kernel's hash; none at all: odds 2**-24).
    assert handed == 12 if steering_available() else 1 <= handed <= 24
    assert len(listening_inodes(c.port)) == 1
    # The program took SIGUSR2 in its on_primary hook: it stays the program's, not an upgrade.
    assert c.count("SIGUSR2 is the program's own signal here") == 1
    assert c.count("upgrading the primary in place") == 0


def steering_available() -> bool:
    """Whether this host lets the primary load the reuseport rotation (CAP_BPF)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        try:
            Rotation(sock).close()
        except OSError:
            return False
    return True


needs_steering = pytest.mark.skipif(
    not steering_available(), reason="loading a BPF program needs CAP_BPF here"
)


@needs_steering
async def test_reuseport_gives_new_connections_to_the_slots_in_turn(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*run_app("--policy", "reuseport"))
    order = [await worker_of(f"{c.url}/") for _ in range(12)]
    # The kernel's hash, which picks by the connection's addresses, would not keep this order.
    assert order[3:] == order[:-3] and sorted(order[:3]) == [1, 2, 3]
    assert c.count("reuseport: new connections go to the serving slots in turn") == 1


@needs_steering
async def test_reuseport_slot_without_a_serving_worker_gets_no_new_connection(
    start_cluster: StartCluster, tmp_path: Path
) -> None:
    """While a killed worker's replacement starts, its slot is out of the rotation: new
    connections go to the serving workers at once instead of queueing for the replacement."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    c = await start_cluster(
        *cli("run", "webapp:held_replacement", "--factory", "-w", "2", "-b", "127.0.0.1:0"),
        *("--policy", "reuseport"),
        env={"GATE": str(gate), "HOLD_AFTER": "2"},
    )
    os.kill(c.worker_pids[1], signal.SIGKILL)
    await c.wait_for("TEST replacement-waiting worker=3")
    # Each in a few seconds, not after the gate: half of them would wait under the hash.
    quick = aiohttp.ClientTimeout(total=4)
    for _ in range(6):
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=quick) as s,
            s.get(f"{c.url}/") as r,
        ):
            assert (await r.json())["worker"] == 2
    await open_gate(c, gate)
    await c.wait_for(r"worker 3 \(pid \d+\) listening on")
    assert sorted([await worker_of(f"{c.url}/") for _ in range(4)]) == [2, 2, 3, 3]


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv"
)
async def test_reuseport_without_cap_bpf_the_kernels_hash_spreads_them(
    start_cluster: StartCluster,
) -> None:
    drop = "-bpf,-sys_admin,-perfmon"
    unprivileged = ["setpriv", "--bounding-set", drop, "--inh-caps", drop, "--"]
    c = await start_cluster(*unprivileged, *run_app("--policy", "reuseport", workers=2))
    assert c.count(r"reuseport: the kernel's hash spreads new connections; .* refused") == 1
    assert c.count("go to the serving slots in turn") == 0
    workers = {await worker_of(f"{c.url}/") for _ in range(24)}
    assert workers == {1, 2}  # both serve (one alone: odds 2**-23)
    assert await c.stop() == 0


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--policy", "fast"], {}, "invalid choice: 'fast'"),
        (["--sticky"], {}, "sticky needs policy 'rr'"),
        (["--policy", "reuseport", "--balance", "least-conn"], {}, "needs policy 'rr'"),
        ([], {"AIOCLUSTER_POLICY": "fast"}, "AIOCLUSTER_POLICY='fast': must be one of shared, rr"),
    ],
)
async def test_cli_rejects_bad_policy_options(
    start_cluster: StartCluster, args: list[str], env: dict[str, str], message: str
) -> None:
    c = await start_cluster(*run_app(*args), env=env, ready=False)
    assert await c.wait() == 2
    assert message in c.output
    assert "Traceback" not in c.output


async def test_reuseport_scaling_down_with_ttou_retires_the_slot_socket(
    start_cluster: StartCluster,
) -> None:
    c = await start_cluster(*run_app("--policy", "reuseport", workers=2))
    assert len(listening_inodes(c.port)) == 2
    c.signal(signal.SIGTTOU)
    await c.wait_for(r"slot 2 retired: \d+ queued connections handed to other workers")
    assert len(listening_inodes(c.port)) == 1  # the primary closed slot 2's socket
    assert await worker_of(f"{c.url}/") == 1
    assert await c.stop() == 0


async def test_rr_wait_closed_waits_for_the_adopted_connections(
    start_cluster: StartCluster,
) -> None:
    """``server.close(); await server.wait_closed()`` in a worker written by hand: under rr
    too, it returns once the connections the worker adopted have ended, not before."""
    port = free_port()
    c = await start_cluster(sys.executable, "handmade_rr.py", str(port))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"worker ")
        c.signal(signal.SIGTERM)
        await c.wait_for("TEST server closed")
        # The connection still serves: the worker is waiting in wait_closed() for it.
        writer.write(b"still here\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"still here\n"
        assert c.count("TEST connections ended") == 0
    finally:
        writer.close()
    await c.wait_for("TEST connections ended")
    assert await c.wait(timeout=20) == 0
