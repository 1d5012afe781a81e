"""The primary's view of one worker process (Node's ``cluster.Worker``).

The :class:`~aiocluster.primary.cluster.Cluster` starts, watches and replaces these; this
module only holds one worker's state and the few actions on it that users call.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING, Any, Literal

from aiocluster._errors import ChannelClosed
from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel

if TYPE_CHECKING:
    from aiocluster.primary.cluster import Cluster
    from aiocluster.primary.starter import ProcessHandle

__all__ = ["Worker", "WorkerState"]

WorkerState = Literal["starting", "online", "listening", "disconnecting", "dead"]


class Worker:
    """The primary's view of one worker process (Node's ``cluster.Worker``)."""

    def __init__(self, cluster: Cluster, worker_id: int, slot: int) -> None:
        self.id = worker_id
        self.slot = slot
        self.state: WorkerState = "starting"
        #: True once the worker was asked to leave (disconnect/kill): its exit is expected.
        self.exited_after_disconnect = False
        #: The exit status once dead: the code, or the negative signal number as asyncio reports.
        self.returncode: int | None = None
        #: The addresses it listens on now (it reports each listen and each close).
        self.listening: list[str] = []
        #: The last report from the worker's event loop: requests, connections, rss, lag.
        self.stats: dict[str, float] = {}
        #: The worker this one is replacing (rolling reload, recycling), until it listens.
        self.replaces: Worker | None = None
        #: Why this worker is being replaced, once its replacement is on the way.
        self.retiring: str | None = None
        #: Requests after which this worker is recycled (0: never).
        self.request_limit = 0
        self.started_at = asyncio.get_running_loop().time()
        self._cluster = cluster
        self._process: ProcessHandle | None = None
        self._channel: Channel | None = None
        self._exited = asyncio.Event()
        self._listening = asyncio.Event()
        self._hang: asyncio.TimerHandle | None = None
        self._announced = False  # sent `online`

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state}>"

    @property
    def accepted(self) -> int:
        """Connections this worker accepted so far (handed over by the primary under rr)."""
        return self._cluster.listens.balancer.accepted.get(self.id, 0)

    @property
    def pid(self) -> int | None:
        """The worker's process id, once it has been started."""
        return self._process.pid if self._process is not None else None

    def is_dead(self) -> bool:
        """True once the process has exited."""
        return self.state == "dead"

    def is_connected(self) -> bool:
        """True while the control channel to the worker is open."""
        return self._channel is not None and not self._channel.closed

    def send(self, obj: Any) -> None:
        """Send a JSON-serialisable ``obj`` to the worker (it arrives in ``aiocluster.messages()``).

        Raises :class:`~aiocluster.ChannelClosed` if the worker is gone.
        """
        if self._channel is None:
            raise ChannelClosed(f"worker {self.id} has no channel")
        self._channel.send({"act": proto.MESSAGE, "data": obj})

    def disconnect(self) -> None:
        """Ask the worker to stop gracefully: close its servers, finish in-flight work, exit."""
        if self.state == "dead":
            return
        self.exited_after_disconnect = True
        if self.state != "disconnecting":
            self.state = "disconnecting"
            self._cluster._emit("disconnect", self)
        if self._channel is not None:
            with contextlib.suppress(ChannelClosed):
                self._channel.send({"act": proto.DISCONNECT})

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the worker; its exit then counts as expected, not as a crash."""
        self.exited_after_disconnect = True
        self._signal(sig)

    async def wait(self) -> int:
        """Wait for the worker to exit and return its status (negative: killed by that signal)."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def _signal(self, sig: int) -> None:
        if self._process is not None and self.state != "dead":
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)

    def describe(self) -> str:
        """``worker 3 (pid 1234)``: how logs name a worker."""
        return f"worker {self.id} (pid {self.pid})"
