"""The primary's side of ``queryServer``: the listening sockets, and who serves which.

:class:`Listens` owns the handle table (every listening socket, bound once and shared, or one
per slot under ``reuseport``) and the balancer (policy ``rr``: the primary accepts and hands
connections over). It answers a worker's ``queryServer`` with the socket, or under ``rr`` with
the listen's id once the primary accepts on it; it hears which workers start and stop serving
a listen, and their load reports. The cluster's life (starting, ready, stopping, failing) stays
with :class:`~aiocluster.primary.cluster.Cluster`, which it asks through three callables.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Literal

from aiocluster._config import ClusterConfig
from aiocluster._errors import ConfigError, ProtocolError
from aiocluster._process import Account
from aiocluster.primary.balancer import Balancer
from aiocluster.primary.handles import Handle, HandleTable
from aiocluster.primary.process import WorkerProcess
from aiocluster.primary.steering import Steering
from aiocluster.primary.upgrade_state import HandleRecord
from aiocluster.wire import messages as proto
from aiocluster.wire.address import Address
from aiocluster.wire.codec import Frame
from aiocluster.wire.sockets import AddrInfo, needs_resolver, resolve_async

__all__ = ["Listens", "Phase", "refusal"]

log = logging.getLogger("aiocluster.primary")

#: Where the cluster is in its life, as far as a listen is concerned: a bind error while it
#: starts fails the cluster; once it serves it fails only that worker's call; once it stops,
#: nothing is bound any more.
Phase = Literal["starting", "serving", "stopping"]

# The kernel caps the backlog at somaxconn anyway; past a C int, listen() would raise.
_MAX_BACKLOG = 2**31 - 1
#: Ports below this need privileges (CAP_NET_BIND_SERVICE) to bind.
PRIVILEGED_PORTS = 1024


def refusal(address: Address, configured: Collection[Address]) -> str | None:
    """Why a worker running as another user may not have the primary bind ``address``.

    The primary keeps root only to bind what the configuration names: a worker (which runs
    the application, and may be compromised) must not use it to bind what its own user could
    not — a privileged port, or a Unix socket path (binding one replaces a stale file there).
    None: allowed, as a configured address or an unprivileged port is.
    """
    if address in configured:
        return None
    if address.kind == "unix":
        return "workers may listen through the primary only on the Unix paths configured"
    if 0 < address.port < PRIVILEGED_PORTS:
        return f"port {address.port} is privileged and not a configured address"
    return None


class Listens:
    """Every listen of the cluster: its sockets, and the workers that serve each one."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        phase: Callable[[], Phase],
        fail: Callable[[str], None],
        background: Callable[[Coroutine[Any, Any, None]], bool],
        counted: Callable[[int, int], None] | None = None,
        configured: Callable[[], Collection[Address]] | None = None,
        restricted_to: Account | None = None,
    ) -> None:
        """``phase()`` says where the cluster is (:data:`Phase`); ``fail(reason)`` stops the
        cluster as failed; ``background(coro)`` runs a task for the cluster's life (False:
        that life is over); ``counted(worker_id, total)`` hears a worker's count of accepted
        connections. With ``restricted_to`` (workers run as that unprivileged account), a
        listen on anything :func:`refusal` refuses is answered EACCES, unless it is one of
        ``configured()``."""
        self.config = config
        self._configured = configured or (lambda: config.binds)
        self._restricted_to = restricted_to
        self.handles = HandleTable()
        #: Hands out the connections the primary accepts (policy rr); counts every worker's.
        self.balancer = Balancer(
            balance=config.balance,
            sticky=config.sticky,
            count_handoffs=config.policy == "rr",
            on_count=counted,
        )
        #: Policy reuseport's rotation over the serving slots (None under other policies).
        self.steering = Steering() if config.policy == "reuseport" else None
        self._phase = phase
        self._fail = fail
        self._background = background
        for address in set(config.binds):
            for index in range(config.binds.count(address)):
                self.handles.pin(address, index)

    def settings(self) -> dict[str, Any]:
        """What a worker is told about the policy when it comes online."""
        return {"policy": self.config.policy, "balance": self.config.balance}

    def query(self, worker: WorkerProcess, frame: Frame) -> None:
        """Answer ``worker``'s queryServer ``frame``: a grant, or the error (never raises one
        for a bind failure; a malformed request raises :class:`ProtocolError`)."""
        msg = frame.msg
        try:
            address = Address.from_wire(msg.get("address"))
        except ConfigError as err:
            raise ProtocolError(f"bad queryServer address: {err}") from None
        index = proto.require(msg, "index", int)
        backlog = msg.get("backlog", self.config.backlog)
        if index < 0 or not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < 1:
            raise ProtocolError(f"bad queryServer index/backlog {index!r}/{backlog!r:.40}")
        backlog = min(backlog, _MAX_BACKLOG)
        slot = self._slot(worker)
        if needs_resolver(address) and not self.handles.exists(address, index, slot=slot):
            # A host name: resolving it may wait on DNS, which must not stall this loop (the
            # heartbeats of every worker are read here).
            resolving = self._resolve_and_listen(worker, frame, address, index, backlog)
            if not self._background(resolving):
                resolving.close()
            return
        self._listen(worker, frame, address, index, backlog, None)

    def joined(self, worker: WorkerProcess, msg: dict[str, Any]) -> None:
        """``worker`` serves the listen its ``listening`` message names."""
        handle = msg.get("handle")
        if isinstance(handle, int):
            self.rejoin(worker, [handle])

    def rejoin(self, worker: WorkerProcess, listens: Collection[int]) -> None:
        """``worker`` serves these listens (by id): it said so, or the old image of an
        in-place upgrade knew it."""
        channel = worker.channel
        if channel is None:
            return
        for listen in listens:
            self.balancer.join(worker.id, worker.slot, worker.describe(), channel, listen)
            if self.steering is not None:
                self.steering.join(worker.id, worker.slot, listen)

    def left(self, worker: WorkerProcess, address: str, msg: dict[str, Any]) -> None:
        """``worker`` stopped serving ``address`` (its ``close`` message)."""
        self.handles.release(worker.id, address)
        handle = msg.get("handle")
        if isinstance(handle, int):
            self.balancer.part(worker.id, handle)
            if self.steering is not None:
                self.steering.part(worker.id, handle)

    def gone(self, worker: WorkerProcess) -> None:
        """``worker`` exited: it holds no listen any more, and the balancer forgets it."""
        self.handles.release(worker.id)
        self.balancer.forget(worker.id)
        if self.steering is not None:
            self.steering.part(worker.id)

    def load_report(self, worker: WorkerProcess, msg: dict[str, Any]) -> None:
        """A worker's counters of handed-over connections (policy rr's least-conn)."""
        counts = [proto.require(msg, key, int) for key in ("accepted", "open", "adopted")]
        if min(counts) < 0:
            raise ProtocolError(f"negative counters in a load report: {counts}")
        accepted, open_, adopted = counts
        self.balancer.report(worker.id, accepted=accepted, open_=open_, adopted=adopted)

    def drain_slot(self, slot: int) -> int:
        """Hand what ``slot``'s reuseport sockets queued to the other workers, close them."""
        return self.balancer.drain(self.handles.pop_slot(slot))

    def restore(
        self,
        records: list[HandleRecord],
        ids: list[tuple[Address, int, int]],
        pinned: list[tuple[Address, int]],
    ) -> None:
        """After an in-place upgrade: the old image's sockets; under rr the primary accepts on
        each of them again (the workers rejoin their listens as they are adopted)."""
        for handle in self.handles.restore(records, ids, pinned):
            if self.config.policy == "rr":
                self.balancer.serve(handle)
            self._steer(handle)

    def hold(self) -> None:
        """An in-place upgrade quiesces: under rr stop accepting, under reuseport free the
        sockets for the new image's rotation (the kernel's hash spreads meanwhile)."""
        self.balancer.hold()
        if self.steering is not None:
            self.steering.release()

    def settled(self) -> bool:
        """Held, and nothing accepted waits in the primary or is handed over unanswered."""
        return self.balancer.settled()

    def release(self) -> None:
        """The upgrade did not happen: accept and steer again."""
        self.balancer.release()
        if self.steering is not None:
            self.steering.resume()

    def close_sockets(self) -> None:
        """Close the primary's copies of every listening socket (a stop begins)."""
        self.handles.close_all()

    def close(self) -> None:
        """The cluster has stopped: close every socket and what the balancer still holds."""
        self.handles.close_all()
        self.balancer.close()
        if self.steering is not None:
            self.steering.close()

    # -- answering queryServer ---------------------------------------------------------------

    def _slot(self, worker: WorkerProcess) -> int | None:
        return worker.slot if self.config.policy == "reuseport" else None

    async def _resolve_and_listen(
        self, worker: WorkerProcess, frame: Frame, address: Address, index: int, backlog: int
    ) -> None:
        try:
            resolved = await resolve_async(address)
        except OSError as err:
            self._refuse(worker, frame, address, err)
            return
        if worker.is_connected():
            self._listen(worker, frame, address, index, backlog, resolved)

    def _listen(
        self,
        worker: WorkerProcess,
        frame: Frame,
        address: Address,
        index: int,
        backlog: int,
        resolved: AddrInfo | None,
    ) -> None:
        if self._phase() == "stopping":
            # The listening sockets are closed or closing: a listen now would open the port
            # again (or fail on a draining worker's copy) and hold it past the stop.
            self._refuse(
                worker, frame, address, OSError(errno.ESHUTDOWN, "the cluster is stopping")
            )
            return
        if self._restricted_to is not None:
            why = refusal(address, self._configured())
            if why is not None:
                # _refuse logs it: a warning once the cluster serves, the failure at start.
                text = f"refused for workers running as {self._restricted_to.name}: {why}"
                self._refuse(worker, frame, address, OSError(errno.EACCES, text))
                return
        try:
            handle, created = self.handles.get_or_create(
                address,
                index,
                backlog,
                slot=self._slot(worker),
                holder=worker.id,
                resolved=resolved,
            )
        except OSError as err:
            self._refuse(worker, frame, address, err)
            return
        if created:
            log.info("listening on %s", handle.describe())
            self._steer(handle)
        self._grant(worker, frame, handle)

    def _steer(self, handle: Handle) -> None:
        """A slot's SO_REUSEPORT socket joins its listen's rotation until it closes."""
        steering = self.steering
        if steering is None or not handle.slot:
            return
        listen, slot = handle.id, handle.slot
        steering.add(listen, slot, handle.sock)
        handle.on_close(lambda: steering.remove(listen, slot))

    def _refuse(self, worker: WorkerProcess, frame: Frame, address: Address, err: OSError) -> None:
        code = err.errno or 0
        text = err.strerror or str(err)
        worker.reply(frame, {"errno": code, "error": text, "address": str(address)})
        phase = self._phase()
        if phase == "stopping":
            log.debug("%s cannot listen on %s: %s", worker.describe(), address, text)
        elif phase == "serving":
            # A listen asked for once the cluster serves (a worker's create_server, a
            # reload's new code) fails only that worker's call, never the cluster.
            log.warning(
                "%s cannot listen on %s: [Errno %d] %s", worker.describe(), address, code, text
            )
        else:
            self._fail(f"cannot listen on {address}: [Errno {code}] {text}")

    def _grant(self, worker: WorkerProcess, frame: Frame, handle: Handle) -> None:
        """Answer a queryServer: the socket, or under rr only the handle id (we accept)."""
        msg = {"errno": 0, "sockname": handle.sockname, "handle": handle.id}
        if self.config.policy == "rr":
            self.balancer.serve(handle)
            worker.reply(frame, {**msg, "accept": "primary"})
        else:
            worker.reply(frame, msg, [handle.sock.fileno()])
