"""The primary's handoff with real loopback sockets and real channels, in one process.

Each ``Peer`` here is the worker end of a real channel: it answers ``newconn`` as a worker
does (adopt: write its id on the connection; refuse; or hold the frame unanswered, as a
worker whose loop is stuck does), so every path of the balancer runs for real.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import pytest

from aiocluster._errors import ProtocolError
from aiocluster.primary.balancer import Balancer, summarize_counts
from aiocluster.primary.handles import Handle, HandleTable
from aiocluster.primary.scheduling import sticky_order
from aiocluster.wire.address import Address
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import MAX_FDS, Frame, Prepared
from aiocluster.wire.fds import close_fds
from aiocluster.worker.link import WorkerLink

from .procfs import open_fds

pytestmark = pytest.mark.timeout(20)

# "partial": take every connection of a frame but its last (a frame of one: take it).
# "malformed": answer with one verdict fewer than the frame had connections.
Mode = Literal["accept", "refuse", "hold", "partial", "malformed", "busy"]


class Peer:
    """The worker side of one channel, answering newconn like a worker would."""

    def __init__(self, wid: int, slot: int | None = None, mode: Mode = "accept") -> None:
        self.id = wid
        self.slot = wid if slot is None else slot
        self.mode: Mode = mode
        self.held: list[Frame] = []
        #: How many connections each newconn frame carried, in order.
        self.frames: list[int] = []
        self.got_frame = asyncio.Event()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.primary_end = Channel(parent, self._unexpected, name=f"worker {wid}", max_fds=0)
        self.worker_end = Channel(child, self._on_frame, name="primary")
        self.primary_end.start()
        self.worker_end.start()

    def _unexpected(self, frame: Frame) -> None:
        raise AssertionError(f"unexpected frame to the primary: {frame.msg}")

    def _on_frame(self, frame: Frame) -> None:
        if frame.msg["act"] == "ping":
            self.worker_end.reply(frame, {})
            return
        assert frame.msg["act"] == "newconn" and 1 <= len(frame.fds) <= MAX_FDS
        self.frames.append(len(frame.fds))
        self.got_frame.set()
        if self.mode == "hold":
            self.held.append(frame)
        elif self.mode == "partial":
            count = len(frame.fds)
            self.answer(frame, [True] * (count - 1) + [False] if count > 1 else True)
        elif self.mode == "busy":  # out of descriptors, as a real worker answers it
            close_fds(frame.fds)
            self.worker_end.reply(frame, {"accepted": False, "why": "busy"})
        elif self.mode == "malformed":
            close_fds(frame.fds)
            self.worker_end.reply(frame, {"accepted": [True] * (len(frame.fds) - 1)})
        else:
            self.answer(frame, self.mode == "accept")

    @property
    def held_conns(self) -> int:
        return sum(len(frame.fds) for frame in self.held)

    def answer(self, frame: Frame, accepted: bool | list[bool]) -> None:
        verdicts = [accepted] * len(frame.fds) if isinstance(accepted, bool) else accepted
        for fd, ok in zip(frame.fds, verdicts, strict=True):
            if ok:
                with socket.socket(fileno=fd) as conn:
                    conn.send(f"{self.id}\n".encode())
            else:
                close_fds([fd])
        self.worker_end.reply(frame, {"accepted": accepted})

    def release(self) -> None:
        self.mode = "accept"
        held, self.held = self.held, []
        for frame in held:
            self.answer(frame, True)

    def die(self) -> None:
        for frame in self.held:
            close_fds(frame.fds)
        self.worker_end.close()

    async def sync(self) -> None:
        """Every answer sent so far has been seen by the balancer (the channel is FIFO)."""
        await self.primary_end.request({"act": "ping"}, timeout=5)

    def close(self) -> None:
        self.die()
        self.primary_end.close()


class LogWaiter(logging.Handler):
    """Wait for a log line of the primary without sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.changed.set()

    async def wait_for(self, pattern: str, timeout: float = 5) -> str:
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def logs() -> Iterator[LogWaiter]:
    waiter = LogWaiter()
    logger = logging.getLogger("aiocluster.primary")
    logger.addHandler(waiter)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield waiter
    logger.removeHandler(waiter)
    logger.setLevel(old)


class Setup:
    def __init__(self) -> None:
        self.table = HandleTable()
        self.peers: list[Peer] = []
        self.balancers: list[Balancer] = []

    def listen(self, slot: int | None = None) -> Handle:
        handle, _ = self.table.get_or_create(Address.tcp("127.0.0.1", 0), 0, 128, slot=slot)
        return handle

    def balancer(self, **options: object) -> Balancer:
        balancer = Balancer(count_handoffs=True, **options)  # type: ignore[arg-type]
        self.balancers.append(balancer)
        return balancer

    def peer(self, balancer: Balancer, handle: Handle, wid: int, **kw: object) -> Peer:
        peer = Peer(wid, **kw)  # type: ignore[arg-type]
        self.peers.append(peer)
        balancer.join(peer.id, peer.slot, f"worker {wid}", peer.primary_end, handle.id)
        return peer

    def close(self) -> None:
        for balancer in self.balancers:
            balancer.close()
        self.table.close_all()
        for peer in self.peers:
            peer.close()


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    s = Setup()
    yield s
    s.close()


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def served_by(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    try:
        async with asyncio.timeout(5):
            return int(await reader.readline())
    finally:
        writer.close()


async def who(port: int, source: str = "127.0.0.1") -> int:
    return await served_by(*await connect(port, source))


def port_of(handle: Handle) -> int:
    port: int = handle.sock.getsockname()[1]
    return port


async def test_rotation_is_strict_and_counted(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    balancer.serve(handle)
    peers = [setup.peer(balancer, handle, wid) for wid in (1, 2, 3)]
    assert [await who(port_of(handle)) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
    for peer in peers:
        await peer.sync()
    assert balancer.accepted == {1: 3, 2: 2, 3: 2}
    balancer.close()
    assert "connections per worker: 1=3, 2=2, 3=2" in logs.lines


async def test_refused_connection_goes_to_another_worker(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    balancer.serve(handle)
    setup.peer(balancer, handle, 1, mode="refuse")
    setup.peer(balancer, handle, 2)
    assert [await who(port_of(handle)) for _ in range(4)] == [2, 2, 2, 2]
    await logs.wait_for(r"worker 1 refused a connection")
    assert balancer.accepted == {1: 0, 2: 4}


async def test_worker_dying_before_its_answer_loses_no_connection(
    setup: Setup, logs: LogWaiter
) -> None:
    balancer = setup.balancer(stuck_after=0.2)
    handle = setup.listen()
    balancer.serve(handle)
    stuck = setup.peer(balancer, handle, 1, mode="hold")
    setup.peer(balancer, handle, 2)
    client = await connect(port_of(handle))
    await stuck.got_frame.wait()
    await logs.wait_for(r"worker 1 has not answered for .* looks blocked")
    stuck.die()
    assert await served_by(*client) == 2
    await logs.wait_for(r"worker 1 is gone with 1 connection\(s\) it had not acknowledged")


async def test_a_stuck_worker_gets_no_more_than_its_share(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer(max_unacked=2, stuck_after=0.2)
    handle = setup.listen()
    balancer.serve(handle)
    stuck = setup.peer(balancer, handle, 1, mode="hold")
    setup.peer(balancer, handle, 2)
    clients = [await connect(port_of(handle)) for _ in range(6)]
    results = [asyncio.create_task(served_by(*c)) for c in clients]
    done = [await results[i] for i in (1, 3, 4, 5)]  # rotation: 1 2 1 2, then 1 is full
    assert done == [2, 2, 2, 2]
    assert stuck.held_conns == 2
    await logs.wait_for(r"worker 1 has not answered for .* looks blocked")
    stuck.release()
    assert [await results[i] for i in (0, 2)] == [1, 1]
    await logs.wait_for(r"worker 1 answers again")


@pytest.mark.parametrize("balance", ["round-robin", "least-conn"])
async def test_a_stuck_worker_gets_nothing_new_and_its_connections_are_rerouted(
    setup: Setup, logs: LogWaiter, balance: str
) -> None:
    balancer = setup.balancer(balance=balance, stuck_after=0.2, reroute_after=0.5)
    handle = setup.listen()
    balancer.serve(handle)
    stuck = setup.peer(balancer, handle, 1, mode="hold")
    setup.peer(balancer, handle, 2)
    first = await connect(port_of(handle))  # worker 1 comes first in either mode
    await stuck.got_frame.wait()
    assert isinstance(stuck.held[0].msg["until"], float)  # the deadline the worker checks
    await logs.wait_for(r"worker 1 has not answered for .* looks blocked")
    # Nothing new for worker 1, whatever the balance mode.
    assert [await who(port_of(handle)) for _ in range(4)] == [2, 2, 2, 2]
    assert await served_by(*first) == 2  # rerouted after reroute_after
    await logs.wait_for(r"worker 1 did not answer in 0.5s: 1 connection\(s\) handed to it go")
    assert stuck.held_conns == 1
    stuck.release()  # it took them after all: the primary says so (a real worker refuses)
    await logs.wait_for(r"worker 1 took 1 connection\(s\) after they were handed to another")
    await logs.wait_for(r"worker 1 answers again")
    assert 1 in {await who(port_of(handle)) for _ in range(4)}  # it serves again


async def test_a_worker_out_of_descriptors_rests_while_the_others_serve(
    setup: Setup, logs: LogWaiter
) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    balancer.serve(handle)
    busy = setup.peer(balancer, handle, 1, mode="busy")
    setup.peer(balancer, handle, 2)
    assert [await who(port_of(handle)) for _ in range(6)] == [2] * 6
    await logs.wait_for(r"worker 1 cannot take connections \(out of descriptors")
    assert busy.frames == [1]  # asked once, then left to rest
    busy.mode = "accept"
    async with asyncio.timeout(5):
        while 1 not in {await who(port_of(handle)) for _ in range(2)}:
            pass  # its rest (50 ms at first) ends; every connection is a real one
    await logs.wait_for(r"worker 1 takes connections again")


async def test_connections_wait_in_the_primary_then_in_the_backlog(setup: Setup) -> None:
    balancer = setup.balancer(max_unacked=1, max_queued=2)
    handle = setup.listen()
    balancer.serve(handle)
    peer = setup.peer(balancer, handle, 1, mode="hold")
    clients = [await connect(port_of(handle)) for _ in range(6)]
    await peer.got_frame.wait()
    assert len(peer.held) == 1
    results = [asyncio.create_task(served_by(*c)) for c in clients]
    peer.release()
    assert await asyncio.gather(*results) == [1] * 6
    await peer.sync()
    assert balancer.accepted == {1: 6}


def accept_queue(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue (Linux: TCP_INFO's unacked)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], sys.byteorder)


async def test_a_burst_waits_in_the_primary_not_in_the_kernel(setup: Setup) -> None:
    # A worker that has not answered yet (its loop busy with a burst) has eight frames of
    # connections in flight, and the rest wait in the primary: a full accept queue in the
    # kernel would drop the clients' handshakes (each retried only after 1 s, then 3 s).
    balancer = setup.balancer(stuck_after=30, reroute_after=30)  # no watchdog in this test
    handle = setup.listen()  # a backlog of 128
    balancer.serve(handle)
    busy = setup.peer(balancer, handle, 1, mode="hold")
    clients = []
    async with asyncio.timeout(5):
        # In chunks well under the backlog: this loop is also the primary's, which can accept
        # only while the connects wait (the same burst from outside needs no chunks).
        for _ in range(10):
            clients += await asyncio.gather(*(connect(port_of(handle)) for _ in range(30)))
            await busy.sync()
    assert busy.held_conns == 8 * MAX_FDS
    assert accept_queue(handle.sock) == 0
    results = [asyncio.create_task(served_by(*c)) for c in clients]
    busy.release()
    assert await asyncio.gather(*results) == [1] * 300


async def test_past_one_frame_unanswered_only_full_frames_go(setup: Setup) -> None:
    # Connections that come one by one go out one by one while a worker has less than a
    # frame's worth unanswered; past that they wait in the primary until a full frame fills.
    balancer = setup.balancer(stuck_after=30, reroute_after=30)  # no watchdog in this test
    handle = setup.listen()
    balancer.serve(handle)
    busy = setup.peer(balancer, handle, 1, mode="hold")
    clients = []
    for _ in range(MAX_FDS + MAX_FDS + 4):
        clients.append(await connect(port_of(handle)))
        await busy.sync()
    assert busy.frames == [1] * MAX_FDS + [MAX_FDS]  # and 4 wait in the primary
    results = [asyncio.create_task(served_by(*c)) for c in clients]
    busy.release()
    assert await asyncio.gather(*results) == [1] * len(clients)
    assert busy.frames[-1] == 4  # the answers made room: the rest went at once


async def test_least_conn_follows_reported_load(setup: Setup) -> None:
    balancer = setup.balancer(balance="least-conn")
    handle = setup.listen()
    balancer.serve(handle)
    for wid in (1, 2, 3):
        setup.peer(balancer, handle, wid)
    balancer.report(1, accepted=0, open_=4, adopted=0)
    balancer.report(3, accepted=0, open_=2, adopted=0)
    # 2 takes connections until it has as many as 3, then they alternate below 1's load
    assert [await who(port_of(handle)) for _ in range(6)] == [2, 2, 3, 2, 3, 2]


async def test_sticky_by_source_address_and_back_after_a_replacement(setup: Setup) -> None:
    balancer = setup.balancer(sticky=True)
    handle = setup.listen()
    balancer.serve(handle)
    peers = {wid: setup.peer(balancer, handle, wid) for wid in (1, 2, 3)}
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    home = {src: sticky_order(src, [1, 2, 3])[0] for src in sources}
    for src in sources:
        assert {await who(port_of(handle), src) for _ in range(3)} == {home[src]}
    assert len(set(home.values())) == 3
    peers[2].die()
    for src in sources:
        expected = home[src] if home[src] != 2 else sticky_order(src, [1, 3])[0]
        assert await who(port_of(handle), src) == expected
    setup.peer(balancer, handle, 4, slot=2)  # the replacement takes slot 2
    for src in sources:
        assert await who(port_of(handle), src) == (4 if home[src] == 2 else home[src])


async def test_sticky_clients_of_a_stuck_worker_move_until_it_answers(
    setup: Setup, logs: LogWaiter
) -> None:
    balancer = setup.balancer(sticky=True, stuck_after=0.2)
    handle = setup.listen()
    balancer.serve(handle)
    peers = {wid: setup.peer(balancer, handle, wid) for wid in (1, 2)}
    source = "127.0.0.9"
    home, second = sticky_order(source, [1, 2])
    peers[home].mode = "hold"  # its loop is stuck
    waiting = await connect(port_of(handle), source)
    await logs.wait_for(rf"worker {home} has not answered for .* looks blocked")
    assert await who(port_of(handle), source) == second
    peers[home].release()
    assert await served_by(*waiting) == home
    await logs.wait_for(rf"worker {home} answers again")
    assert await who(port_of(handle), source) == home


async def test_drain_hands_a_retired_slots_queue_to_the_others(setup: Setup) -> None:
    balancer = Balancer()
    setup.balancers.append(balancer)
    first, second = setup.listen(slot=1), setup.listen(slot=2)
    assert first.id == second.id and port_of(first) == port_of(second)
    assert first.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    setup.peer(balancer, first, 7, slot=3)
    # Nobody accepts on either socket: the kernel queues each connection on one of them.
    clients = [await connect(port_of(first)) for _ in range(8)]
    assert balancer.drain(setup.table.pop_slot(1) + setup.table.pop_slot(2)) == 8
    assert [await served_by(*c) for c in clients] == [7] * 8
    assert first.sock.fileno() == -1 and second.sock.fileno() == -1


def lowest_free_fd(any_fd: int) -> int:
    fd = os.dup(any_fd)
    os.close(fd)
    return fd


async def test_out_of_descriptors_backs_off_and_recovers(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    peer = setup.peer(balancer, handle, 1)
    clients = [await connect(port_of(handle)) for _ in range(3)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(handle.sock.fileno()), hard))
    try:
        balancer.serve(handle)
        await logs.wait_for(r"cannot take connections on .*Too many open files.*pausing accepts")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [await served_by(*c) for c in clients] == [1, 1, 1]
    await logs.wait_for(r"accepting on 127\.0\.0\.1:\d+ again")
    await peer.sync()
    assert balancer.accepted == {1: 3}


async def test_stop_closes_what_no_worker_took(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    balancer.serve(handle)
    setup.peer(balancer, handle, 1, mode="refuse")  # stopping: it refuses, and leaves
    reader, writer = await connect(port_of(handle))
    await logs.wait_for(r"worker 1 refused a connection")
    setup.table.close_all()
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed, not leaked
    writer.close()
    await logs.wait_for(r"closing 1 connection\(s\) no worker took before the stop")


async def test_a_burst_goes_out_in_one_frame_per_worker_in_strict_rotation(setup: Setup) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    peers = [setup.peer(balancer, handle, wid) for wid in (1, 2)]
    # Queued in the kernel before the primary accepts: one wakeup accepts all six.
    clients = [await connect(port_of(handle)) for _ in range(6)]
    balancer.serve(handle)
    assert [await served_by(*c) for c in clients] == [1, 2, 1, 2, 1, 2]
    assert [peer.frames for peer in peers] == [[3], [3]]
    for peer in peers:
        await peer.sync()
    assert balancer.accepted == {1: 3, 2: 3}


async def test_a_batch_taken_in_part_hands_the_rest_on(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    partial = setup.peer(balancer, handle, 1, mode="partial")
    setup.peer(balancer, handle, 2)
    clients = [await connect(port_of(handle)) for _ in range(4)]
    balancer.serve(handle)
    # 1 gets the 1st and 3rd, takes the 1st only; the 3rd comes back first in line and,
    # the rotation being at 1 again, goes to 1 alone, which takes a frame of one.
    assert [await served_by(*c) for c in clients] == [1, 2, 1, 2]
    assert partial.frames == [2, 1]
    await partial.sync()
    assert balancer.accepted == {1: 2, 2: 2}
    assert not any("refused" in line for line in logs.lines)  # not stopping: still served


async def test_a_worker_dying_with_a_batch_in_flight_loses_none(
    setup: Setup, logs: LogWaiter
) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    dying = setup.peer(balancer, handle, 1, mode="hold")
    setup.peer(balancer, handle, 2)
    clients = [await connect(port_of(handle)) for _ in range(4)]
    balancer.serve(handle)
    await dying.got_frame.wait()
    assert dying.frames == [2]
    dying.die()
    assert sorted([await served_by(*c) for c in clients]) == [2, 2, 2, 2]
    await logs.wait_for(r"worker 1 is gone with 2 connection\(s\) it had not acknowledged")


async def test_a_malformed_answer_cuts_the_worker_off_and_loses_none(
    setup: Setup, logs: LogWaiter
) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    bad = setup.peer(balancer, handle, 1, mode="malformed")
    setup.peer(balancer, handle, 2)
    clients = [await connect(port_of(handle)) for _ in range(4)]
    balancer.serve(handle)
    assert sorted([await served_by(*c) for c in clients]) == [2, 2, 2, 2]
    await asyncio.wait_for(bad.primary_end.wait_closed(), 5)
    assert isinstance(bad.primary_end.close_reason, ProtocolError)
    assert balancer.accepted == {1: 0, 2: 4}


async def test_a_whole_batch_refused_moves_to_the_others(setup: Setup, logs: LogWaiter) -> None:
    balancer = setup.balancer()
    handle = setup.listen()
    setup.peer(balancer, handle, 1, mode="refuse")
    setup.peer(balancer, handle, 2)
    clients = [await connect(port_of(handle)) for _ in range(4)]
    balancer.serve(handle)
    assert [await served_by(*c) for c in clients] == [2, 2, 2, 2]
    await logs.wait_for(r"worker 1 refused 2 connections \(it is stopping\)")


async def test_sticky_holds_within_a_burst(setup: Setup) -> None:
    balancer = setup.balancer(sticky=True, max_unacked=2)
    handle = setup.listen()
    for wid in (1, 2, 3):
        setup.peer(balancer, handle, wid)
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    clients = [await connect(port_of(handle), src) for src in sources]
    balancer.serve(handle)  # 12 at once, 2 unacked per worker at most: some wait their turn
    served = [await served_by(*c) for c in clients]
    assert served == [sticky_order(src, [1, 2, 3])[0] for src in sources]


async def test_a_share_larger_than_a_frame_takes_several(setup: Setup) -> None:
    balancer = setup.balancer(max_unacked=MAX_FDS + 4)
    handle = setup.listen()
    peer = setup.peer(balancer, handle, 1)
    clients = [await connect(port_of(handle)) for _ in range(MAX_FDS + 4)]
    balancer.serve(handle)
    assert [await served_by(*c) for c in clients] == [1] * (MAX_FDS + 4)
    assert peer.frames == [MAX_FDS, 4]


# -- the worker's side: WorkerLink answering the frames of a real channel --------------------


class Picky:
    """An adopter that takes every other connection it is offered, starting with the first."""

    def __init__(self) -> None:
        self.offered = 0
        self.taken: list[socket.socket] = []

    def adopt(self, sock: socket.socket) -> bool:
        self.offered += 1
        if self.offered % 2:
            self.taken.append(sock)
            return True
        return False


@pytest.fixture
async def worker_link() -> AsyncIterator[tuple[WorkerLink, Channel]]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = WorkerLink(child.detach())
    primary = Channel(parent, lambda frame: None, name="worker", max_fds=0)
    primary.start()
    yield link, primary
    link.close()
    primary.close()
    faulthandler.unregister(signal.SIGUSR1)  # WorkerLink registered it, as in a worker


async def ask_newconn(primary: Channel, handle: int, conns: list[socket.socket]) -> object:
    answered: asyncio.Future[Frame | None] = asyncio.get_running_loop().create_future()
    newconn = Prepared({"act": "newconn", "handle": handle})
    primary.ask(newconn, [c.fileno() for c in conns], answered.set_result)
    reply = await asyncio.wait_for(answered, 5)
    assert reply is not None
    return reply.msg["accepted"]


async def test_the_worker_answers_a_batch_once_with_a_verdict_per_connection(
    worker_link: tuple[WorkerLink, Channel],
) -> None:
    link, primary = worker_link
    picky = Picky()
    link.handoffs.route(5, picky)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        conns = [listener.accept()[0] for _ in clients]
    before = open_fds()
    assert await ask_newconn(primary, 5, conns[:3]) == [True, False, True]
    assert await ask_newconn(primary, 5, conns[3:4]) is False  # the 4th offered: refused
    assert await ask_newconn(primary, 7, conns[4:]) is False  # no server for listen 7
    # The worker keeps what it took, each the very connection it was handed, and closed the rest.
    assert open_fds() - before == {s.fileno() for s in picky.taken}
    for sock, conn in zip(picky.taken, (conns[0], conns[2]), strict=True):
        assert sock.getpeername() == conn.getpeername()
    fresh = Picky()
    link.handoffs.route(5, fresh)
    assert await ask_newconn(primary, 5, conns[4:]) is True
    for sock in [*picky.taken, *fresh.taken, *conns, *clients]:
        sock.close()


def test_the_stop_summary_stays_one_short_line_for_500_workers() -> None:
    assert summarize_counts({2: 2, 1: 3}) == "1=3, 2=2"
    many = {wid: 100 + wid % 7 for wid in range(1, 501)}
    many[42] = 3
    line = summarize_counts(many)
    assert line == "51400 over 500 workers; fewest 3 (worker 42), median 103, most 106 (worker 496)"
    assert len(line) < 100


async def test_a_worker_that_exited_is_forgotten_under_every_policy(setup: Setup) -> None:
    """Every worker joins the balancer when it listens (under shared too, where nothing is
    handed over and nothing else ever pruned it): its exit must drop it, or the primary keeps
    every dead worker's channel (about 5 KiB per worker measured over 300 kills)."""
    balancer = setup.balancer()
    handle = setup.listen()
    peer = setup.peer(balancer, handle, 7)
    assert balancer.tracks(7)
    peer.close()
    balancer.forget(7)
    assert not balancer.tracks(7)
