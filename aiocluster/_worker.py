"""The worker side: its end of the channel, ``queryServer``, and stopping when told to.

A process is a worker when the primary started it with ``AIOCLUSTER_WORKER_ID`` and
``AIOCLUSTER_CHANNEL_FD`` in its environment. Both are read once, at import; the channel
variable is then removed so that programs this worker starts do not mistake themselves for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import faulthandler
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from . import _protocol as proto
from ._address import Address
from ._channel import Channel, close_fds
from ._codec import Frame
from ._errors import ChannelClosed, NotInCluster, ProtocolError
from ._handles import format_sockname, open_listener

__all__ = [
    "WorkerLink",
    "is_primary",
    "is_worker",
    "link",
    "listen_socket",
    "messages",
    "send",
    "worker_id",
    "worker_slot",
]

log = logging.getLogger("aiocluster.worker")


def _read_env() -> tuple[int | None, int | None, int | None]:
    try:
        wid = int(os.environ[proto.ENV_WORKER_ID])
        fd = int(os.environ.pop(proto.ENV_CHANNEL_FD))
    except (KeyError, ValueError):
        return None, None, None
    try:
        slot: int | None = int(os.environ.get(proto.ENV_WORKER_SLOT, ""))
    except ValueError:
        slot = None
    _close_inherited(keep=fd)
    return wid, fd, slot


def _close_inherited(keep: int) -> None:
    """Close every descriptor this worker inherited except stdio and its channel.

    Python creates only non-inheritable descriptors (PEP 446), so an inheritable one here came
    through exec. The primary passes only the channel, but uvloop's subprocess_exec does not
    implement close_fds: under it a worker would inherit every inheritable descriptor of the
    primary (and libuv's copies of stdio), holding them open for its whole life.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            fd = int(name)
            if fd > 2 and fd != keep:
                with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                    if os.get_inheritable(fd):
                        os.close(fd)
        return


_WORKER_ID, _CHANNEL_FD, _WORKER_SLOT = _read_env()


def is_worker() -> bool:
    """True in a worker process started by an aiocluster primary."""
    return _WORKER_ID is not None


def is_primary() -> bool:
    """True in any process that is not a worker: it becomes the primary when it serves."""
    return _WORKER_ID is None


def worker_id() -> int | None:
    """This worker's id (1, 2, ... unique for the cluster's life), or None outside a worker."""
    return _WORKER_ID


def worker_slot() -> int | None:
    """This worker's slot (1..N; a replacement takes the slot of the worker it replaces)."""
    return _WORKER_SLOT


class WorkerLink:
    """The worker's end of the control channel to the primary."""

    def __init__(self, fd: int) -> None:
        #: Set when this worker must drain and exit: ``disconnect``, SIGTERM, or primary gone.
        self.stopping = asyncio.Event()
        #: Seconds to let in-flight work finish once stopping (the primary's setting).
        self.graceful_timeout = 30.0
        self._online: asyncio.Task[None] | None = None
        self._indexes: collections.Counter[Address] = collections.Counter()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=10_000)
        self._stats_sources: list[StatsSource] = []
        self._heartbeat: asyncio.Task[None] | None = None
        # The primary sends SIGUSR1 to a worker whose loop stopped answering, before killing
        # it: faulthandler writes every thread's stack to stderr even while the loop is stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        sock = socket.socket(fileno=fd)
        # Inherited via pass_fds, so inheritable: children of this worker must not hold the
        # channel open, or the primary would never see this worker's end close.
        sock.set_inheritable(False)
        self.channel = Channel(sock, self._on_frame, name="primary", on_close=self._on_close)
        self.channel.start()

    def add_stats_source(self, source: StatsSource) -> None:
        """Count ``source()``'s (requests served, connections open) in this worker's reports."""
        self._stats_sources.append(source)

    def stats(self) -> dict[str, float]:
        """Requests served, connections open and resident memory of this worker, now."""
        requests = connections = 0
        for source in self._stats_sources:
            served, open_now = source()
            requests += served
            connections += open_now
        return {"requests": requests, "connections": connections, "rss": _rss_bytes()}

    async def _beat(self, interval: float) -> None:
        # Runs on the worker's own loop: if the application blocks the loop, the beats stop,
        # and that silence is exactly what the primary watches for.
        loop = asyncio.get_running_loop()
        while not self.channel.closed:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - expected)
            try:
                self.channel.send({"act": proto.HEARTBEAT, "lag": lag, **self.stats()})
            except ChannelClosed:
                return

    def _on_close(self, reason: BaseException | None) -> None:
        if not self.stopping.is_set() and reason is not None:
            log.warning("lost the channel to the primary (%s); stopping", reason)
        self.stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        # Wake readers of messages(); a full inbox already has items to wake them.
        if not self._inbox.full():
            self._inbox.put_nowait(_END)

    async def ensure_online(self) -> None:
        """Announce this worker to the primary once, and take the primary's settings."""
        if self._online is None:
            self._online = asyncio.ensure_future(self._announce())
        await asyncio.shield(self._online)

    async def _announce(self) -> None:
        reply = await self.channel.request({"act": proto.ONLINE, "pid": os.getpid()})
        timeout = reply.msg.get("graceful_timeout")
        if isinstance(timeout, int | float) and timeout >= 0:
            self.graceful_timeout = float(timeout)
        interval = reply.msg.get("heartbeat")
        if isinstance(interval, int | float) and interval > 0 and not self.channel.closed:
            self._heartbeat = asyncio.ensure_future(self._beat(float(interval)))

    async def query_server(self, address: Address, backlog: int) -> socket.socket:
        """Ask the primary for the listening socket for ``address``; raise its ``OSError``."""
        await self.ensure_online()
        index = self._indexes[address]
        self._indexes[address] += 1
        reply = await self.channel.request(
            {
                "act": proto.QUERY_SERVER,
                "address": address.to_wire(),
                "index": index,
                "backlog": backlog,
            }
        )
        code = reply.msg.get("errno", 0)
        if code:
            close_fds(reply.fds)
            raise OSError(code, f"{reply.msg.get('error', os.strerror(code))} ({address})")
        if len(reply.fds) != 1:
            close_fds(reply.fds)
            raise ProtocolError(f"queryServer reply for {address} carried {len(reply.fds)} fds")
        return socket.socket(fileno=reply.fds[0])

    def announce_listening(self, sockname: str) -> None:
        """Tell the primary this worker now accepts on ``sockname``."""
        self.channel.send({"act": proto.LISTENING, "address": sockname})

    def announce_closed(self, sockname: str) -> None:
        """Tell the primary this worker stopped accepting on ``sockname``."""
        if not self.channel.closed:
            self.channel.send({"act": proto.CLOSE, "address": sockname})

    def _on_frame(self, frame: Frame) -> None:
        act = frame.msg["act"]
        if frame.fds:
            close_fds(frame.fds)
            raise ProtocolError(f"unexpected descriptors with {act!r}")
        if act == proto.DISCONNECT:
            log.info("asked to disconnect; draining")
            self.stopping.set()
        elif act == proto.MESSAGE:
            if self._inbox.full():
                log.warning("message from the primary dropped: nobody reads aiocluster.messages()")
            else:
                self._inbox.put_nowait(frame.msg.get("data"))
        else:
            raise ProtocolError(f"unknown act {act!r} from the primary")

    async def receive(self) -> Any:
        """The next user message from the primary; raises ChannelClosed once the link is gone."""
        if self._inbox.empty() and self.channel.closed:
            raise ChannelClosed("the channel to the primary is closed")
        item = await self._inbox.get()
        if item is _END:
            self._inbox.put_nowait(_END)  # so every other reader stops too
            raise ChannelClosed("the channel to the primary is closed")
        return item

    def close(self) -> None:
        """Close the channel; the primary then sees this worker's end close."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.channel.close()


StatsSource = Callable[[], tuple[int, int]]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0  # no /proc (macOS): memory is not reported


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_END: Any = object()
_link: WorkerLink | None = None


def link() -> WorkerLink:
    """This worker's link to the primary, created on first use in the running loop."""
    global _link
    if _CHANNEL_FD is None:
        raise NotInCluster(
            "not a cluster worker: this process was not started by an aiocluster primary"
        )
    if _link is None:
        _link = WorkerLink(_CHANNEL_FD)
    return _link


def send(data: Any) -> None:
    """Send a JSON-serialisable message to the primary (its ``message`` event receives it)."""
    link().channel.send({"act": proto.MESSAGE, "data": data})


async def messages() -> AsyncIterator[Any]:
    """Iterate over messages the primary sends with ``worker.send()``, until the link closes."""
    current = link()
    await current.ensure_online()
    while True:
        try:
            yield await current.receive()
        except ChannelClosed:
            return


async def listen_socket(address: Address, backlog: int) -> socket.socket:
    """A listening socket for ``address``: from the primary in a worker, bound here otherwise."""
    if is_worker():
        return await link().query_server(address, backlog)
    sock, _ = open_listener(address, backlog)
    return sock


def announce_listening(sock: socket.socket) -> None:
    """In a worker, tell the primary that ``sock`` is being served; elsewhere do nothing."""
    if is_worker():
        link().announce_listening(format_sockname(sock))
