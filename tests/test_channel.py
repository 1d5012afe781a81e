"""The channel over a real AF_UNIX socketpair in one loop: framing, SCM_RIGHTS, errors, limits."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from aiocluster._errors import ChannelClosed, ProtocolError
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import HEADER, Frame, Prepared, encode
from aiocluster.wire.fds import close_fds

from .procfs import open_fds

pytestmark = pytest.mark.timeout(20)


@dataclass
class Inbox:
    frames: list[Frame] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.arrived.set()

    async def wait_for(self, count: int) -> list[Frame]:
        async with asyncio.timeout(10):
            while len(self.frames) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.frames


@dataclass
class Pair:
    a: Channel
    b: Channel
    inbox_a: Inbox
    inbox_b: Inbox
    #: ``a``'s socket, for writing what no Channel would send.
    raw_a: socket.socket


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    inbox_a, inbox_b = Inbox(), Inbox()
    a = Channel(sa, inbox_a, name="a")
    b = Channel(sb, inbox_b, name="b")
    a.start()
    b.start()
    yield Pair(a, b, inbox_a, inbox_b, sa)
    a.close()
    b.close()
    for frame in inbox_a.frames + inbox_b.frames:
        close_fds(frame.fds)


async def test_request_and_reply(pair: Pair) -> None:
    async def answer() -> None:
        (frame,) = await pair.inbox_b.wait_for(1)
        pair.b.reply(frame, {"sum": sum(frame.msg["numbers"])})

    responder = asyncio.create_task(answer())
    reply = await pair.a.request({"act": "add", "numbers": [1, 2, 3]})
    await responder
    assert reply.msg["sum"] == 6
    assert reply.msg["act"] == "add"
    assert reply.msg["ack"] == pair.inbox_b.frames[0].msg["seq"]


class Replies:
    """An ``on_reply`` for Channel.ask that can be awaited."""

    def __init__(self) -> None:
        self.got: list[Frame | None] = []
        self.arrived = asyncio.Event()

    def __call__(self, frame: Frame | None) -> None:
        self.got.append(frame)
        self.arrived.set()

    async def wait(self) -> list[Frame | None]:
        await asyncio.wait_for(self.arrived.wait(), 5)
        return self.got


async def test_ask_passes_the_reply_to_its_callback(pair: Pair) -> None:
    replies = Replies()
    seq = pair.a.ask({"act": "add", "numbers": [1, 2]}, [], replies)
    assert replies.got == []  # never from within ask()
    (frame,) = await pair.inbox_b.wait_for(1)
    assert frame.msg["seq"] == seq
    pair.b.reply(frame, Prepared({"act": "add", "sum": 3}))
    (reply,) = await replies.wait()
    assert reply is not None
    assert (reply.msg["act"], reply.msg["sum"], reply.msg["ack"]) == ("add", 3, seq)


async def test_ask_whose_send_fails_gets_none_soon_after(pair: Pair) -> None:
    pair.b.close()  # a has not read the EOF yet: its next send fails (EPIPE)
    replies = Replies()
    pair.a.ask({"act": "first"}, [], replies)
    assert pair.a.closed
    assert replies.got == []  # not from within ask(), which the caller is still in
    assert await replies.wait() == [None]
    with pytest.raises(ChannelClosed):
        pair.a.ask({"act": "again"}, [], replies)


async def test_request_whose_send_fails_fails_rather_than_hangs(pair: Pair) -> None:
    pair.b.close()  # a has not read the EOF yet: its next send fails (EPIPE)
    fut = pair.a.call({"act": "first"})
    assert pair.a.closed
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(fut, 5)


async def test_descriptors_that_must_wait_are_copies_the_caller_may_close() -> None:
    """Sent at once, descriptors need no copy; queued behind a full socket, they do."""
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sa.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = Channel(sa, Inbox(), name="w")
    writer.start()
    inbox = Inbox()
    reader = Channel(sb, inbox, name="r")
    r, w = os.pipe()
    try:
        writer.send({"act": "big", "pad": "x" * 500_000})  # more than the socket holds
        writer.send({"act": "fd"}, [r])  # so this one waits in the queue
        os.close(r)  # ours: the queued copy must not depend on it
        reader.start()
        big, with_fd = await inbox.wait_for(2)
        assert (big.msg["act"], with_fd.msg["act"]) == ("big", "fd")
        (received,) = with_fd.fds
        os.write(w, b"!")
        assert os.read(received, 1) == b"!"
        os.close(received)
    finally:
        writer.close()
        reader.close()
        os.close(w)


async def test_a_listening_socket_crosses_with_scm_rights(pair: Pair) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    before = open_fds()
    pair.a.send({"act": "sock"}, [listener.fileno()])
    (frame,) = await pair.inbox_b.wait_for(1)
    assert open_fds() - before == set(frame.fds)  # the channel's own dup is gone
    (fd,) = frame.fds
    assert not os.get_inheritable(fd)
    received = socket.socket(fileno=fd)
    try:
        assert received.getsockname() == listener.getsockname()
        client = socket.create_connection(listener.getsockname(), timeout=5)
        received.settimeout(5)
        conn, _ = received.accept()  # the same kernel socket: a connection to one is on both
        conn.close()
        client.close()
    finally:
        received.close()
        listener.close()


async def test_descriptors_stay_with_their_frames_under_load(pair: Pair) -> None:
    r, w = os.pipe()
    try:
        count = 300
        for n in range(count):
            fds = [r, w][: n % 3] if n % 3 else []
            pair.a.send({"act": "n", "n": n, "pad": "x" * (n * 37 % 5000)}, fds)
        frames = await pair.inbox_b.wait_for(count)
        for n, frame in enumerate(frames):
            assert frame.msg["n"] == n
            assert len(frame.fds) == n % 3
            for fd, original in zip(frame.fds, (r, w), strict=False):
                assert os.fstat(fd).st_ino == os.fstat(original).st_ino
    finally:
        os.close(r)
        os.close(w)


async def test_garbage_from_the_peer_closes_the_channel(pair: Pair) -> None:
    pair.raw_a.send(HEADER.pack(5, 0) + b"\xff\xfe{}}")
    await asyncio.wait_for(pair.b.wait_closed(), 5)
    assert isinstance(pair.b.close_reason, ProtocolError)
    with pytest.raises(ChannelClosed):
        pair.b.send({"act": "x"})


async def test_a_huge_length_is_refused_without_reading_it(pair: Pair) -> None:
    pair.raw_a.send(HEADER.pack(0xFFFFFFFF, 0))
    await asyncio.wait_for(pair.b.wait_closed(), 5)
    assert "more than the 1048576 allowed" in str(pair.b.close_reason)


async def test_unexpected_descriptors_are_closed(pair: Pair) -> None:
    sa, sb = socket.socketpair()
    strict = Channel(sb, Inbox(), name="strict", max_fds=0)
    strict.start()
    r, w = os.pipe()
    before = open_fds()
    # Real descriptors (both ends of a pipe) to a receiver that accepts none.
    sa.sendmsg(
        [encode({"act": "y"}, 2)],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))],
    )
    await asyncio.wait_for(strict.wait_closed(), 5)
    assert isinstance(strict.close_reason, ProtocolError)
    assert open_fds() <= before  # nothing received was kept
    sa.close()
    os.close(r)
    os.close(w)


async def test_eof_fails_pending_requests(pair: Pair) -> None:
    request = asyncio.create_task(pair.a.request({"act": "never-answered"}))
    await pair.inbox_b.wait_for(1)
    pair.b.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(request, 5)
    assert pair.a.closed
    assert isinstance(pair.a.close_reason, ChannelClosed)


async def test_a_peer_that_stops_reading_is_cut_off() -> None:
    sa, sb = socket.socketpair()
    closed: list[BaseException | None] = []
    writer = Channel(sa, Inbox(), name="w", max_buffer=256 * 1024, on_close=closed.append)
    writer.start()
    r, w = os.pipe()
    before = open_fds()
    sent = 0
    with pytest.raises(ChannelClosed):  # noqa: PT012 - the send that overflows raises
        while sent < 100_000:
            writer.send({"act": "flood", "pad": "x" * 4096}, [r])
            sent += 1
    assert 0 < sent < 100_000
    assert writer.closed
    assert closed and "not reading" in str(closed[0])
    assert open_fds() <= before  # queued duplicates were closed
    sb.close()
    os.close(r)
    os.close(w)


async def test_a_late_reply_is_dropped_and_its_descriptors_closed(pair: Pair) -> None:
    with pytest.raises(TimeoutError):
        await pair.a.request({"act": "slow"}, timeout=0.05)
    (frame,) = await pair.inbox_b.wait_for(1)
    r, w = os.pipe()
    before = open_fds()
    pair.b.reply(frame, {"late": True}, [r])
    # A frame after the late reply proves the reply was processed (and dropped) first.
    pair.b.send({"act": "after"})
    await pair.inbox_a.wait_for(1)
    assert pair.inbox_a.frames[0].msg["act"] == "after"
    assert open_fds() <= before
    os.close(r)
    os.close(w)
