"""The worker side: its end of the channel, ``queryServer``, and stopping when told to.

Counting the connections this worker accepted (``load`` reports) and adopting the ones the
primary hands over (``newconn``) are :mod:`aiocluster.worker.handoff`'s.

Whether this process is a worker, and which, is :mod:`aiocluster._role`'s to say.
"""

from __future__ import annotations

import asyncio
import collections
import faulthandler
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiocluster._errors import (
    ChannelClosed,
    ConfigError,
    NotInCluster,
    ProtocolError,
    listen_refused,
)
from aiocluster._role import Role, identity, role
from aiocluster._title import set_title, worker_title
from aiocluster._zygote import refuse
from aiocluster.wire import messages as proto
from aiocluster.wire.address import Address
from aiocluster.wire.channel import Channel
from aiocluster.wire.codec import Frame
from aiocluster.wire.fds import close_fds
from aiocluster.wire.metricsform import METRICS
from aiocluster.wire.sockets import format_sockname, open_listener
from aiocluster.worker.deadline import CLEANUP_TIMEOUT, WS_GRACE, DrainPlan
from aiocluster.worker.handoff import Adopter, Handoffs
from aiocluster.worker.metrics import Reporter, requests

__all__ = [
    "Adopter",
    "Grant",
    "WorkerLink",
    "is_primary",
    "is_worker",
    "link",
    "listen",
    "messages",
    "send",
    "worker_id",
    "worker_slot",
]

log = logging.getLogger("aiocluster.worker")


def is_worker() -> bool:
    """True in a worker process started by an aiocluster primary.

    Also True in the zygote (start method ``fork``): what the program does there at import,
    it does for every worker forked from it. :func:`worker_id` is None there.
    """
    return role() is not Role.PRIMARY


def is_primary() -> bool:
    """True in any process that is not a worker (nor the zygote): it becomes the primary when it
    serves."""
    return not is_worker()


def worker_id() -> int | None:
    """This worker's id (1, 2, ... unique for the cluster's life), or None outside a worker."""
    return identity().worker_id


def worker_slot() -> int | None:
    """This worker's slot (1..N; a replacement takes the slot of the worker it replaces)."""
    return identity().slot


P = TypeVar("P", bound=asyncio.BaseProtocol)


@dataclass(frozen=True, slots=True)
class Grant:
    """The primary's answer to one listen: the socket to accept on, or none (policy rr)."""

    address: Address
    #: The real address (port 0 resolved), as ``host:port`` or ``unix:path``.
    sockname: str
    #: The listen's id on the channel: ``newconn`` frames for it name it (0 outside a cluster).
    handle: int = 0
    #: The listening socket; None when the primary accepts and hands connections over.
    sock: socket.socket | None = None


class WorkerLink:
    """The worker's end of the control channel to the primary."""

    def __init__(self, fd: int) -> None:
        #: Set when this worker must drain and exit: ``disconnect``, SIGTERM, or primary gone.
        self.stopping = asyncio.Event()
        #: Seconds to let in-flight work finish once stopping (the primary's setting).
        self.graceful_timeout = 30.0
        #: Seconds cleanup hooks may take after the graceful deadline (the primary's setting).
        self.cleanup_timeout = CLEANUP_TIMEOUT
        #: Seconds open websockets get, once stopping, before they are closed with 1001.
        self.ws_grace = WS_GRACE
        #: Where the primary wants this worker to listen (it may differ from the worker's own
        #: configuration: sockets passed by systemd).
        self.binds: list[Address] = []
        #: The primary's scheduling policy and balance (its settings win over this process's).
        self.policy = "shared"
        self.balance = "round-robin"
        self._online: asyncio.Task[None] | None = None
        self._indexes: collections.Counter[Address] = collections.Counter()
        self._starting_listens = 0  # listens still to come before this worker fully serves
        self._inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=10_000)
        self._stats_sources: list[StatsSource] = []
        self._heartbeat: asyncio.Task[None] | None = None
        # Set when the primary serves /metrics (--admin): then reports go with the heartbeats.
        self._reporter: Reporter | None = None
        self._next_report = 0.0
        # The primary sends SIGUSR1 to a worker whose loop stopped answering, before killing
        # it: faulthandler writes every thread's stack to stderr even while the loop is stuck.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        sock = socket.socket(fileno=fd)
        # Inherited via pass_fds, so inheritable: children of this worker must not hold the
        # channel open, or the primary would never see this worker's end close.
        sock.set_inheritable(False)
        # A newconn that comes truncated (out of descriptors) is refused, never a death.
        self.channel = Channel(
            sock,
            self._on_frame,
            name="primary",
            on_close=self._on_close,
            truncatable=(proto.NEWCONN,),
        )
        #: Counting connections, and adopting the ones the primary hands over.
        self.handoffs = Handoffs(self.channel, self.stopping)
        self.channel.start()

    def drain_plan(self) -> DrainPlan:
        """The budget of a drain that begins now, from the primary's settings."""
        return DrainPlan.starting_now(
            self.graceful_timeout, cleanup_timeout=self.cleanup_timeout, ws_grace=self.ws_grace
        )

    @property
    def reports_metrics(self) -> bool:
        """True once online if the primary takes metric reports (it serves ``--admin``).

        Without them nothing reads a request's latency or status class, so servers do not
        count them: a request then costs what it costs under gunicorn or uvicorn.
        """
        return self._reporter is not None

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
            requests().lag.observe(lag)
            try:
                self.channel.send({"act": proto.HEARTBEAT, "lag": lag, **self.stats()})
                if self._reporter is not None and loop.time() >= self._next_report:
                    # At most 4 reports a second, whatever the heartbeat's pace.
                    self._next_report = loop.time() + 0.25
                    if families := self._reporter.report():
                        self.channel.send({"act": METRICS, "families": families})
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
        self.graceful_timeout = _seconds(reply.msg, "graceful_timeout", self.graceful_timeout)
        self.cleanup_timeout = _seconds(reply.msg, "cleanup_timeout", self.cleanup_timeout)
        self.ws_grace = _seconds(reply.msg, "ws_grace", self.ws_grace)
        binds = reply.msg.get("binds")
        if isinstance(binds, list):
            try:
                self.binds = [Address.from_wire(b) for b in binds]
            except ConfigError as err:
                raise ProtocolError(f"bad binds in the online reply: {err}") from None
        if reply.msg.get("metrics") is True:
            self._reporter = Reporter()
        interval = reply.msg.get("heartbeat")
        if isinstance(interval, int | float) and interval > 0 and not self.channel.closed:
            self._heartbeat = asyncio.ensure_future(self._beat(float(interval)))
        name = reply.msg.get("name")
        me = identity()
        if isinstance(name, str) and me.worker_id is not None:
            # A spawned worker's first title; a forked one had it from the zygote's config.
            set_title(worker_title(me.worker_id, me.slot, name))
        policy, balance = reply.msg.get("policy"), reply.msg.get("balance")
        if isinstance(policy, str):
            self.policy = policy
        if isinstance(balance, str):
            self.balance = balance
        self.handoffs.configure(self.policy, self.balance)

    async def query_server(self, address: Address, backlog: int) -> Grant:
        """Ask the primary for the listen on ``address``; raise its ``OSError``.

        The grant holds the listening socket, or under policy rr no socket: the primary
        accepts, and hands each connection to a server :meth:`route` registered for it.
        """
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
            raise listen_refused(code, f"{reply.msg.get('error', os.strerror(code))} ({address})")
        primary_accepts = reply.msg.get("accept") == "primary"
        if len(reply.fds) != (0 if primary_accepts else 1):
            close_fds(reply.fds)
            raise ProtocolError(f"queryServer reply for {address} carried {len(reply.fds)} fds")
        handle, sockname = reply.msg.get("handle", 0), reply.msg.get("sockname")
        if not isinstance(handle, int) or not isinstance(sockname, str):
            close_fds(reply.fds)
            raise ProtocolError(f"queryServer reply for {address} lacks its handle or sockname")
        sock = None if primary_accepts else socket.socket(fileno=reply.fds[0])
        return Grant(address, sockname, handle, sock)

    def expect_listens(self, count: int) -> None:
        """This worker is about to start ``count`` listens: it is ready after the last one.

        Until then each listen is announced with ``more``, so the primary neither counts the
        worker ready nor lets a reload retire its predecessor while some of its binds are
        not served yet. Hand-built workers never call this: their first listen counts.
        """
        self._starting_listens = count

    def announce_listening(self, grant: Grant) -> None:
        """Tell the primary this worker now serves ``grant``'s listen."""
        msg: dict[str, object] = {
            "act": proto.LISTENING,
            "address": grant.sockname,
            "handle": grant.handle,
        }
        if self._starting_listens > 0:
            self._starting_listens -= 1
            if self._starting_listens:
                msg["more"] = True
        self.channel.send(msg)

    def announce_closed(self, grant: Grant) -> None:
        """Tell the primary this worker stopped serving ``grant``'s listen."""
        if not self.channel.closed:
            msg = {"act": proto.CLOSE, "address": grant.sockname, "handle": grant.handle}
            self.channel.send(msg)

    def _on_frame(self, frame: Frame) -> None:
        act = frame.msg["act"]
        if act == proto.NEWCONN:
            self.handoffs.on_newconn(frame)
            return
        if frame.fds:
            close_fds(frame.fds)
            raise ProtocolError(f"unexpected descriptors with {act!r}")
        if act == proto.DISCONNECT:
            if not self.stopping.is_set():  # the primary may ask again (a stop after a reload)
                log.info("asked to disconnect; draining")
            self.stopping.set()
        elif act == proto.UPGRADED:
            # The same primary process, now running new code: nothing changes here.
            log.info(
                "the primary was upgraded in place to aiocluster %.40s; serving on",
                frame.msg.get("version"),
            )
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
        """Send the last counters, close the channel; the primary then sees this end close."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.handoffs.close()
        self.channel.close()


StatsSource = Callable[[], tuple[int, int]]


def _seconds(msg: dict[str, Any], key: str, default: float) -> float:
    value = msg.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e9:
        return float(value)
    return default


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
    me = identity()
    if me.role is Role.ZYGOTE:
        refuse("the program reached a worker API before aiocluster.run()")
    if me.role is not Role.WORKER or me.channel_fd is None:
        raise NotInCluster(
            "not a cluster worker: this process was not started by an aiocluster primary"
        )
    if _link is None:
        _link = WorkerLink(me.channel_fd)
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


async def listen(address: Address, backlog: int) -> Grant:
    """The listen for ``address``: granted by the primary in a worker, bound here otherwise."""
    if is_worker():
        return await link().query_server(address, backlog)
    sock, _ = open_listener(address, backlog)
    return Grant(address, format_sockname(sock), 0, sock)


def counted(factory: Callable[[], P]) -> Callable[[], P]:
    """In a worker, ``factory`` counting the connections it serves; elsewhere ``factory``."""
    return link().handoffs.counted(factory) if is_worker() else factory


def announce_listening(grant: Grant) -> None:
    """In a worker, tell the primary that ``grant`` is being served; elsewhere do nothing."""
    if is_worker():
        link().announce_listening(grant)


def announce_closed(grant: Grant) -> None:
    """In a worker, tell the primary that ``grant`` is no longer served; elsewhere nothing."""
    if is_worker():
        link().announce_closed(grant)
