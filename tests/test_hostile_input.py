"""Hostile input without processes: the codec, the channel and the primary's message handling.

Whatever a worker sends, the primary may only do one of two things with a message: act on it, or
raise ProtocolError (which cuts the worker off). Nothing else may escape, no descriptor may stay
open, and nothing may grow without bound.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import math
import os
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiocluster._config import ClusterConfig
from aiocluster._errors import ChannelClosed, ProtocolError
from aiocluster.primary import cluster as _primary
from aiocluster.primary import process as _child
from aiocluster.primary.handles import MAX_HANDLES, HandleTable
from aiocluster.wire import messages as proto
from aiocluster.wire.address import Address
from aiocluster.wire.channel import Channel, PeerNotReading
from aiocluster.wire.codec import HEADER, MAX_FRAME, Decoder, Frame, encode
from aiocluster.wire.fds import close_fds

from .procfs import open_fds

pytestmark = pytest.mark.timeout(60)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw(payload: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(len(payload), nfds) + payload


# --- codec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", [b"1e999", b"-1e400", b"1.5e309", b"9" * 400 + b".0"])
def test_a_number_out_of_float_range_is_a_protocol_error(number: bytes) -> None:
    with pytest.raises(ProtocolError, match="out of range"):
        Decoder().feed(raw(b'{"act":"heartbeat","rss":' + number + b"}"))


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


number_text = st.from_regex(
    r"-?(0|[1-9][0-9]{0,400})(\.[0-9]{1,5})?([eE][-+]?[0-9]{1,4})?", fullmatch=True
)


@SETTINGS
@given(numbers=st.lists(number_text, min_size=1, max_size=5))
def test_property_decoded_numbers_are_finite(numbers: list[str]) -> None:
    payload = ('{"act":"x","v":[' + ",".join(numbers) + "]}").encode()
    try:
        (frame,) = Decoder().feed(raw(payload))
    except ProtocolError:
        return
    assert _finite(frame.msg)


@SETTINGS
@given(data=st.binary(max_size=2000), max_frame=st.sampled_from([16, 1024, MAX_FRAME]))
def test_property_any_bytes_decode_or_fail_cleanly(data: bytes, max_frame: int) -> None:
    dec = Decoder(max_frame=max_frame, max_fds=0)
    frames: list[Frame] = []
    leftover: list[int] = []
    try:
        frames = dec.feed(data)
    except ProtocolError as err:
        leftover = err.fds
    assert leftover == []
    for frame in frames:
        assert isinstance(frame.msg["act"], str)
        assert frame.fds == ()
    assert dec.buffered <= max_frame + HEADER.size


# --- the channel over a real socketpair ---------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.frames: list[Frame] = []

    def __call__(self, frame: Frame) -> None:
        self.frames.append(frame)


def _pipes(n: int) -> list[int]:
    """``n`` descriptors: ends of fresh pipes."""
    fds: list[int] = []
    while len(fds) < n:
        fds.extend(os.pipe())
    close_fds(fds[n:])
    return fds[:n]


@SETTINGS
@given(
    chunks=st.lists(
        st.tuples(
            st.one_of(
                st.binary(min_size=1, max_size=64),
                st.builds(lambda a: encode({"act": a}), st.text(max_size=8)),
                st.builds(
                    lambda a, n: encode({"act": a}, n), st.text(max_size=8), st.integers(1, 3)
                ),
            ),
            st.integers(0, 40),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_property_a_worker_channel_closes_every_descriptor_it_receives(
    chunks: list[tuple[bytes, int]],
) -> None:
    """Random bytes with random numbers of real descriptors, sent to the primary's view of a
    worker (max_fds=0): afterwards the receiving side holds no descriptor it did not have."""

    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        inbox = Inbox()
        channel = Channel(ours, inbox, name="worker", max_fds=0)
        before = open_fds() - {theirs.fileno()}
        channel.start()
        try:
            for data, nfds in chunks:
                fds = _pipes(nfds)
                try:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    theirs.sendmsg([data], anc if fds else [])
                except OSError:
                    break  # the primary's side already closed
                finally:
                    close_fds(fds)  # the kernel holds its own references now
            theirs.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(10):
                await channel.wait_closed()
        finally:
            channel.close()
            theirs.close()
        for frame in inbox.frames:
            assert frame.fds == ()
        assert open_fds() <= before

    asyncio.run(scenario())


@pytest.fixture
def socketpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


async def test_a_reply_to_a_request_never_sent_is_a_protocol_error(
    socketpair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = socketpair
    channel = Channel(ours, Inbox(), name="worker", max_fds=0)
    channel.start()
    channel.send({"act": "message"})  # seq 1 was sent: a late reply to it is dropped quietly
    theirs.sendall(encode({"act": "message", "ack": 1, "seq": 1}))
    theirs.sendall(encode({"act": "online", "ack": 7, "seq": 2}))
    await asyncio.wait_for(channel.wait_closed(), 5)
    assert isinstance(channel.close_reason, ProtocolError)
    assert "reply to 7, a request never sent" in str(channel.close_reason)


async def test_descriptors_queued_for_a_peer_that_does_not_read_are_bounded(
    socketpair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = socketpair  # the peer never reads
    closed: list[BaseException | None] = []
    channel = Channel(ours, Inbox(), name="worker", max_queued_fds=8, on_close=closed.append)
    channel.start()
    listener = socket.create_server(("127.0.0.1", 0))
    before = open_fds()
    sent = 0
    try:
        with pytest.raises(ChannelClosed):  # noqa: PT012 - the send that overflows raises
            while sent < 100_000:
                channel.send({"act": "queryServer", "pad": "x" * 2000}, [listener.fileno()])
                sent += 1
    finally:
        listener.close()
    assert isinstance(closed[0], PeerNotReading)
    assert "descriptors queued" in str(closed[0])
    assert open_fds() <= before  # every queued duplicate was closed
    # Far fewer duplicates than bytes would have allowed: the descriptor bound cut it off.
    assert sent < 8 * 1024 * 1024 // 2000


async def test_a_failing_dup_leaks_no_earlier_copy(
    socketpair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _ = socketpair
    channel = Channel(ours, Inbox(), name="worker")
    channel.start()
    r, w = os.pipe()
    closed_fd = 999_999  # beyond any descriptor table here: dup() fails with EBADF
    before = open_fds()
    with pytest.raises(OSError, match="Bad file descriptor"):
        channel.send({"act": "x"}, [r, w, closed_fd])
    assert open_fds() <= before
    channel.close()
    os.close(r)
    os.close(w)


# --- the primary's message handling -------------------------------------------------------------


class NoProcess:
    """The process of a worker that is never started: it never exits, signals miss it."""

    pid = 0

    async def wait(self) -> int:
        await asyncio.Event().wait()
        return 0

    def send_signal(self, sig: int) -> None:
        raise ProcessLookupError


class Fixture:
    """A Cluster that is not started and one Worker whose channel is a socketpair end."""

    def __init__(self) -> None:
        self.cluster = _primary.Cluster(
            ClusterConfig.build(workers=1, bind=["127.0.0.1:0"], timeout=0)
        )
        self.worker = _child.WorkerProcess(1, 1, on_event=lambda *args: None)
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer.setblocking(False)
        self.worker.attach(NoProcess(), ours, lambda frame: None)
        self.cluster.workers[self.worker.id] = self.worker

    def feed(self, msg: dict[str, Any]) -> None:
        self.cluster.dispatcher.dispatch(self.worker, Frame({"seq": 1, **msg}))
        self.drain()

    def make_ready(self) -> None:
        """The cluster's one worker listens: the cluster serves (a bind error is the call's)."""
        self.feed({"act": "listening", "address": "127.0.0.1:1"})
        assert self.cluster.is_ready()

    def drain(self) -> None:
        """Read (and close the descriptors of) whatever the primary answered."""
        while True:
            try:
                _, anc, _, _ = self.peer.recvmsg(1 << 16, socket.CMSG_SPACE(64))
            except BlockingIOError:
                return
            for _, _, data in anc:
                close_fds(array.array("i", data[: len(data) - len(data) % 4]))

    def close(self) -> None:
        assert self.worker.channel is not None
        self.worker.channel.close()
        self.peer.close()
        self.cluster.listens.handles.close_all()


@pytest.fixture
async def primary() -> AsyncIterator[Fixture]:
    fixture = Fixture()
    yield fixture
    fixture.close()


TCP = {"kind": "tcp", "host": "127.0.0.1", "port": 0}
BAD_MESSAGES: list[tuple[dict[str, Any], str]] = [
    ({"act": "nope"}, "unknown act 'nope'"),
    ({"act": "disconnect"}, "unknown act 'disconnect'"),
    ({"act": "queryServer", "address": TCP, "index": "x"}, "'index' must be int"),
    ({"act": "queryServer", "address": TCP, "index": True}, "'index' must be int"),
    ({"act": "queryServer", "address": TCP, "index": -1}, "bad queryServer index"),
    ({"act": "queryServer", "address": TCP, "index": 0, "backlog": "x"}, "backlog"),
    ({"act": "queryServer", "address": TCP, "index": 0, "backlog": 0}, "backlog"),
    ({"act": "queryServer", "address": 5, "index": 0}, "address must be an object"),
    ({"act": "queryServer", "address": [1, 2], "index": 0}, "address must be an object"),
    ({"act": "queryServer", "index": 0}, "address must be an object"),
    ({"act": "queryServer", "address": {"kind": "udp"}, "index": 0}, "unknown address kind"),
    ({"act": "queryServer", "address": {**TCP, "port": 70000}, "index": 0}, "port must be"),
    ({"act": "queryServer", "address": {**TCP, "port": "80"}, "index": 0}, "port must be"),
    ({"act": "queryServer", "address": {**TCP, "host": 1}, "index": 0}, "host must be"),
    ({"act": "queryServer", "address": {**TCP, "host": "a\nb"}, "index": 0}, "host"),
    ({"act": "queryServer", "address": {**TCP, "host": "\ud800"}, "index": 0}, "UTF-8"),
    ({"act": "queryServer", "address": {"kind": "unix", "path": "\ud800"}, "index": 0}, "UTF-8"),
    ({"act": "queryServer", "address": {"kind": "unix", "path": "a\0"}, "index": 0}, "path"),
    ({"act": "queryServer", "address": {"kind": "unix", "path": "x" * 200}, "index": 0}, "long"),
    ({"act": "listening"}, "'address' must be str"),
    ({"act": "listening", "address": 80}, "'address' must be str"),
    ({"act": "listening", "address": "x" * 10_000}, "address of 10000 characters"),
    ({"act": "close", "address": None}, "'address' must be str"),
    ({"act": "heartbeat", "rss": "x"}, "'rss' must be a number"),
    ({"act": "heartbeat", "requests": True}, "'requests' must be a number"),
    ({"act": "heartbeat", "requests": -1}, "'requests' must be a number"),
    ({"act": "heartbeat", "lag": 10**400}, "'lag' must be a number"),
    ({"act": "heartbeat", "connections": [1]}, "'connections' must be a number"),
]


@pytest.mark.parametrize(("msg", "why"), BAD_MESSAGES, ids=lambda v: str(v)[:40])
async def test_a_bad_message_is_a_protocol_error(
    primary: Fixture, msg: dict[str, Any], why: str
) -> None:
    with pytest.raises(ProtocolError, match=why.replace("(", r"\(")):
        primary.feed(msg)
    assert len(primary.cluster.listens.handles) == 0
    assert not primary.cluster.stopping


async def test_online_twice_is_a_protocol_error(primary: Fixture) -> None:
    primary.feed({"act": "online", "pid": 1})
    assert primary.worker.state == "online"
    with pytest.raises(ProtocolError, match="sent 'online' twice"):
        primary.feed({"act": "online", "pid": 1})


async def test_a_heartbeat_is_read_strictly(primary: Fixture) -> None:
    primary.feed({"act": "heartbeat", "requests": 3, "rss": 1e6, "lag": 0.25, "extra": "x"})
    assert primary.worker.stats == {"requests": 3.0, "rss": 1e6, "lag": 0.25}


async def test_listening_twice_and_close_keep_one_entry(primary: Fixture) -> None:
    for _ in range(3):
        primary.feed({"act": "listening", "address": "127.0.0.1:1"})
    assert primary.worker.listening == ["127.0.0.1:1"]
    primary.feed({"act": "close", "address": "127.0.0.1:1"})
    assert primary.worker.listening == []
    primary.feed({"act": "close", "address": "127.0.0.1:9"})  # never listened: ignored
    for n in range(MAX_HANDLES + 10):
        primary.feed({"act": "listening", "address": f"127.0.0.1:{n}"})
    assert len(primary.worker.listening) == MAX_HANDLES


async def test_a_huge_backlog_is_capped_not_a_crash(primary: Fixture) -> None:
    primary.feed({"act": "queryServer", "address": TCP, "index": 0, "backlog": 10**30})
    assert len(primary.cluster.listens.handles) == 1


async def test_a_bind_error_after_ready_fails_the_call_not_the_cluster(primary: Fixture) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    busy = {**TCP, "port": taken.getsockname()[1]}
    starting = Fixture()
    try:
        primary.make_ready()
        primary.feed({"act": "queryServer", "address": busy, "index": 0})
        assert not primary.cluster.stopping
        # While the cluster starts, the same error stops it.
        starting.feed({"act": "queryServer", "address": busy, "index": 0})
        assert starting.cluster.stopping
    finally:
        starting.close()
        taken.close()


async def test_a_host_idna_refuses_is_a_bind_error(primary: Fixture) -> None:
    primary.make_ready()
    primary.feed({"act": "queryServer", "address": {**TCP, "host": "x" * 70}, "index": 0})
    primary.feed({"act": "queryServer", "address": {**TCP, "host": ".."}, "index": 0})
    assert len(primary.cluster.listens.handles) == 0
    assert not primary.cluster.stopping


known_act = st.sampled_from(
    [proto.ONLINE, proto.QUERY_SERVER, proto.LISTENING, proto.CLOSE, proto.HEARTBEAT, "x"]
)
leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=5,
)
# Addresses that never reach DNS: good ones, and every way of being wrong.
address = st.one_of(
    value,
    st.fixed_dictionaries(
        {"kind": st.sampled_from(["tcp", "unix", "x"])},
        optional={
            "host": st.sampled_from(["127.0.0.1", "", "\ud800", "x" * 70, 1]),
            "port": st.sampled_from([0, -1, 65536, "1", None]),
            "path": st.sampled_from(["", "\ud800", "a\0b", "x" * 200, 3]),
        },
    ),
)
field_values = {
    "address": address,
    "index": st.one_of(st.integers(-3, 3), value),
    "backlog": st.one_of(st.integers(-1, 2**40), value),
    "requests": st.one_of(st.integers(-1, 2**64), value),
    "rss": st.one_of(st.floats(), value),
    "lag": value,
    "connections": value,
    "pid": value,
    "data": value,
}
hostile_message = st.builds(
    lambda act, fields: {"act": act, **fields},
    known_act,
    st.fixed_dictionaries({}, optional=field_values),
)


@SETTINGS
@given(messages=st.lists(hostile_message, min_size=1, max_size=6))
def test_property_a_message_is_handled_or_is_a_protocol_error(
    messages: list[dict[str, Any]],
) -> None:
    """Any JSON object with any act and fields of any type: never anything but ProtocolError."""

    async def scenario() -> None:
        before = open_fds()
        fixture = Fixture()
        try:
            # Only loopback port 0 and unix paths refused before bind can get this far.
            fixture.make_ready()
            for msg in messages:
                with contextlib.suppress(ProtocolError):
                    fixture.feed(msg)
            assert fixture.worker.state in ("starting", "online", "listening")
            assert len(fixture.cluster.listens.handles) <= len(messages)
        finally:
            fixture.close()
        assert open_fds() <= before

    asyncio.run(scenario())


# --- the handle table ---------------------------------------------------------------------------

LOOPBACK = Address.tcp("127.0.0.1", 0)


def test_a_handle_nobody_holds_is_closed_unless_pinned() -> None:
    table = HandleTable()
    try:
        first, _ = table.get_or_create(LOOPBACK, 0, 16, holder=1)
        extra, created = table.get_or_create(LOOPBACK, 1, 16, holder=1)
        assert created
        same, created = table.get_or_create(LOOPBACK, 1, 16, holder=2)
        assert same is extra and not created
        table.release(1, extra.sockname)
        assert len(table) == 2  # worker 2 still holds it
        table.release(2)  # worker 2 exits
        assert len(table) == 1  # index 0 stays for the next worker, on the same port
        assert extra.sock.fileno() == -1
        table.release(1)
        assert len(table) == 1 and first.sock.fileno() != -1
        table.pin(LOOPBACK, 2)
        pinned, _ = table.get_or_create(LOOPBACK, 2, 16, holder=3)
        table.release(3)
        assert pinned.sock.fileno() != -1
    finally:
        table.close_all()


def test_the_handle_table_is_bounded() -> None:
    table = HandleTable()
    try:
        for index in range(MAX_HANDLES):
            table.get_or_create(LOOPBACK, index, 16, holder=1)
        with pytest.raises(OSError, match="listening sockets") as info:
            table.get_or_create(LOOPBACK, MAX_HANDLES, 16, holder=1)
        assert info.value.errno == errno.EMFILE
        table.release(1)
        assert len(table) == 1
    finally:
        table.close_all()


def test_config_binds_are_pinned() -> None:
    async def scenario() -> None:
        config = ClusterConfig.build(workers=1, bind=["127.0.0.1:0", "127.0.0.1:0"])
        cluster = _primary.Cluster(config)
        handle, _ = cluster.listens.handles.get_or_create(LOOPBACK, 1, 16, holder=1)
        cluster.listens.handles.release(1)
        assert handle.sock.fileno() != -1
        cluster.listens.handles.close_all()

    asyncio.run(scenario())


def test_cut_off_reasons() -> None:
    assert "broke the channel protocol" in str(_child.cut_off_because(ProtocolError("x")))
    assert "stopped reading" in str(_child.cut_off_because(PeerNotReading("x")))
    assert "could not handle (OverflowError" in str(_child.cut_off_because(OverflowError()))
    assert _child.cut_off_because(ChannelClosed("peer closed the channel")) is None
    assert _child.cut_off_because(None) is None
