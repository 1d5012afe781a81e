"""The primary's answers to a worker's frames: one table from message name to handler.

Each handler reads one kind of message strictly (anything malformed raises
:class:`~aiocluster.ProtocolError`, which cuts the worker off), updates the worker's view
through its methods, and passes listen business to :class:`~aiocluster.primary.listens.Listens`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiocluster._config import ClusterConfig
from aiocluster._errors import ProtocolError
from aiocluster.primary.events import Events
from aiocluster.primary.listens import Listens
from aiocluster.primary.metrics import REPORT_BURST, REPORT_RATE, MetricsStore
from aiocluster.primary.process import WorkerProcess
from aiocluster.primary.supervisor import heartbeat_interval
from aiocluster.wire import messages as proto
from aiocluster.wire.address import Address
from aiocluster.wire.codec import Frame
from aiocluster.wire.metricsform import METRICS, OWN_FAMILIES, parse_report

__all__ = ["Dispatcher"]

log = logging.getLogger("aiocluster.primary")

Handler = Callable[[WorkerProcess, Frame], None]

# A sockname is ``host:port`` or ``unix:`` and a path of at most 100 bytes.
_MAX_ADDRESS = 300


class Dispatcher:
    """Hands each frame a worker sends to the handler of its ``act``.

    ``binds()`` is what workers are told to listen on; ``listened(worker)`` hears a worker's
    first report of each listen; ``retire(worker, reason)`` recycles one over its limits.
    """

    def __init__(
        self,
        config: ClusterConfig,
        listens: Listens,
        events: Events,
        *,
        binds: Callable[[], list[Address]],
        listened: Callable[[WorkerProcess], None],
        retire: Callable[[WorkerProcess, str], None],
        metrics: MetricsStore,
    ) -> None:
        self.config = config
        self.listens = listens
        self._events = events
        self._binds = binds
        self._listened = listened
        self._retire = retire
        self._metrics_store = metrics
        self._handlers: dict[str, Handler] = {
            proto.QUERY_SERVER: listens.query,
            proto.ONLINE: self._online,
            proto.LISTENING: self._listening,
            proto.HEARTBEAT: self._heartbeat,
            proto.MESSAGE: self._message,
            proto.CLOSE: self._close,
            proto.LOAD: self._load,
            proto.APP_ERROR: self._app_error,
            METRICS: self._metrics,
        }

    def dispatch(self, worker: WorkerProcess, frame: Frame) -> None:
        """Act on ``frame`` from ``worker``; raises :class:`ProtocolError` if it is malformed."""
        act = frame.msg["act"]
        handler = self._handlers.get(act)
        if handler is None:
            raise ProtocolError(f"unknown act {act!r} from {worker.describe()}")
        handler(worker, frame)

    def _online(self, worker: WorkerProcess, frame: Frame) -> None:
        worker.came_online()
        worker.reply(
            frame,
            {
                "graceful_timeout": self.config.graceful_timeout,
                "cleanup_timeout": self.config.cleanup_timeout,
                "ws_grace": self.config.ws_grace,
                "heartbeat": heartbeat_interval(self.config.timeout),
                "binds": [a.to_wire() for a in self._binds()],
                "name": self.config.name,
                # Workers report their metrics only for a primary that serves them.
                "metrics": self.config.admin is not None,
                **self.listens.settings(),
            },
        )
        worker.arm_hang_timer(self.config.timeout)
        self._events.emit("online", worker)

    def _app_error(self, worker: WorkerProcess, frame: Frame) -> None:
        worker.report_app_error(proto.app_error_report(frame.msg))

    def _listening(self, worker: WorkerProcess, frame: Frame) -> None:
        address = _require_address(frame.msg)
        was_ready = worker.has_listened
        if worker.started_listening(address, more=frame.msg.get("more") is True):
            self.listens.joined(worker, frame.msg)
            log.info("%s listening on %s", worker.describe(), address)
            self._events.emit("listening", worker, address)
        if worker.has_listened and not was_ready:
            self._listened(worker)

    def _heartbeat(self, worker: WorkerProcess, frame: Frame) -> None:
        stats = {
            key: value
            for key in ("requests", "connections", "rss", "lag")
            if (value := proto.optional_number(frame.msg, key)) is not None
        }
        worker.arm_hang_timer(self.config.timeout)
        worker.record_stats(stats)
        requests = int(stats.get("requests", 0))
        if worker.request_limit and requests >= worker.request_limit:
            self._retire(worker, f"served {requests} requests, limit {worker.request_limit}")
        rss = int(stats.get("rss", 0))
        limit = self.config.max_memory
        if limit and rss > limit:
            self._retire(worker, f"uses {rss >> 20} MiB, limit {limit >> 20} MiB")

    def _metrics(self, worker: WorkerProcess, frame: Frame) -> None:
        store = self._metrics_store
        if not store.allow(worker.id, asyncio.get_running_loop().time()):
            raise ProtocolError(
                f"sends metrics reports faster than {REPORT_RATE:g} a second "
                f"(burst {REPORT_BURST:g})"
            )
        store.report(worker.id, worker.slot, parse_report(frame.msg, OWN_FAMILIES))

    def _message(self, worker: WorkerProcess, frame: Frame) -> None:
        self._events.emit("message", worker, frame.msg.get("data"))

    def _close(self, worker: WorkerProcess, frame: Frame) -> None:
        address = _require_address(frame.msg)
        log.debug("%s closed %s", worker.describe(), address)
        worker.stopped_listening(address)
        self.listens.left(worker, address, frame.msg)

    def _load(self, worker: WorkerProcess, frame: Frame) -> None:
        self.listens.load_report(worker, frame.msg)


def _require_address(msg: dict[str, Any]) -> str:
    address = proto.require(msg, "address", str)
    if len(address) > _MAX_ADDRESS:
        raise ProtocolError(f"{msg['act']!r}: address of {len(address)} characters")
    return address
