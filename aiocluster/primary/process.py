"""The primary's view of one worker process (Node's ``cluster.Worker``).

A :class:`WorkerProcess` holds one worker's state and changes it itself: the cluster tells it
what happened (its process and channel are attached, it came online, it listens, it died) and
it reports what users did to it (``disconnect()``) through the callback it was given. It never
reaches into the cluster; the counters it shows (``accepted``) are pushed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from aiocluster._errors import AppErrorReport, ChannelClosed, ProtocolError
from aiocluster.primary.handles import MAX_HANDLES
from aiocluster.primary.upgrade_state import ChannelRecord, WorkerRecord
from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel, PeerNotReading
from aiocluster.wire.codec import Frame

if TYPE_CHECKING:
    from aiocluster.primary.starter import ProcessHandle

__all__ = ["EventSink", "Worker", "WorkerProcess", "WorkerState", "cut_off_because"]

log = logging.getLogger("aiocluster.primary")

WorkerState = Literal["starting", "online", "listening", "disconnecting", "dead"]

#: Where a worker reports what happened to it: ``sink(event, worker, *args)``.
EventSink = Callable[..., None]


class WorkerProcess:
    """The primary's view of one worker process (Node's ``cluster.Worker``).

    ``on_event(name, worker, *args)`` hears the events the worker itself causes: ``disconnect``,
    once, when its channel closes (Node's contract: whether it was asked to leave, exited, or
    was killed), always before the cluster's ``exit``. ``drain_limit`` is how long it may take
    to exit once told to drain (the graceful timeout, the cleanup allowance and a margin):
    then it is killed.
    """

    def __init__(
        self, worker_id: int, slot: int, *, on_event: EventSink, drain_limit: float = 0.0
    ) -> None:
        self.id = worker_id
        self.slot = slot
        self.state: WorkerState = "starting"
        #: True once the worker was asked to leave (disconnect/kill): its exit is expected.
        self.exited_after_disconnect = False
        #: True once the primary killed it for a fault (hung, broke its channel): a crash.
        self.faulted = False
        #: The exit status once dead: the code, or the negative signal number as asyncio reports.
        self.returncode: int | None = None
        #: The addresses it listens on now (it reports each listen and each close).
        self.listening: list[str] = []
        #: The last report from the worker's event loop: requests, connections, rss, lag.
        self.stats: dict[str, float] = {}
        #: The worker this one is replacing (rolling reload, recycling), until it listens.
        self.replaces: WorkerProcess | None = None
        #: Why this worker is being replaced, once its replacement is on the way.
        self.retiring: str | None = None
        #: Requests after which this worker is recycled (0: never).
        self.request_limit = 0
        #: What the worker reported wrong with the application, before it exited (status 4).
        self.app_error: AppErrorReport | None = None
        self.started_at = asyncio.get_running_loop().time()
        self._on_event = on_event
        self._accepted = 0
        self._process: ProcessHandle | None = None
        self._channel: Channel | None = None
        self._exited = asyncio.Event()
        self._listening = asyncio.Event()
        self._hang: asyncio.TimerHandle | None = None
        self._drain_limit = drain_limit
        self._overdue: asyncio.TimerHandle | None = None
        self._disconnected = False  # the disconnect event went out
        self._announced = False  # sent `online`

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state}>"

    # -- what users read and do (Node's cluster.Worker) --------------------------------------

    @property
    def accepted(self) -> int:
        """Connections this worker accepted so far (handed over by the primary under rr)."""
        return self._accepted

    @property
    def pid(self) -> int | None:
        """The worker's process id, once it has been started."""
        return self._process.pid if self._process is not None else None

    @property
    def channel(self) -> Channel | None:
        """The control channel to the worker, once attached (the balancer hands fds over it)."""
        return self._channel

    @property
    def has_listened(self) -> bool:
        """True once the worker served all its listens (it booted; some may be closed since)."""
        return self._listening.is_set()

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
            if self._drain_limit > 0:
                loop = asyncio.get_running_loop()
                self._overdue = loop.call_later(self._drain_limit, self._drain_overdue)
        if self._channel is not None:
            with contextlib.suppress(ChannelClosed):
                self._channel.send({"act": proto.DISCONNECT})

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the worker; its exit then counts as expected, not as a crash."""
        self.exited_after_disconnect = True
        self.signal(sig)

    async def wait(self) -> int:
        """Wait for the worker to exit and return its status (negative: killed by that signal)."""
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def wait_listening(self) -> None:
        """Wait until the worker serves all its listens (forever if it never does)."""
        await self._listening.wait()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process unless it is gone (no error either way)."""
        if self._process is not None and self.state != "dead":
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)

    def describe(self) -> str:
        """``worker 3 (pid 1234)``: how logs name a worker."""
        return f"worker {self.id} (pid {self.pid})"

    # -- what the cluster tells it -----------------------------------------------------------

    def attach(
        self, process: ProcessHandle, sock: socket.socket, on_frame: Callable[[Frame], None]
    ) -> None:
        """The process was started and ``sock`` is our end of its channel: read its frames."""
        self._process = process
        self._channel = Channel(sock, on_frame, name=self.describe(), max_fds=0)
        self._channel.start()

    def handover(self, groups: Sequence[int] = ()) -> WorkerRecord:
        """What the new image of an upgrading primary needs to carry on with this worker
        (``groups``: the listens it serves under rr)."""
        assert self._process is not None and self._channel is not None, "attach() first"
        return WorkerRecord(
            id=self.id,
            slot=self.slot,
            pid=self._process.pid,
            channel=ChannelRecord(self._channel.fileno(), self._channel.last_seq),
            age=max(0.0, asyncio.get_running_loop().time() - self.started_at),
            listening=tuple(self.listening),
            stats=dict(self.stats),
            accepted=self._accepted,
            request_limit=self.request_limit,
            groups=tuple(groups),
        )

    def adopt(
        self,
        record: WorkerRecord,
        process: ProcessHandle,
        sock: socket.socket,
        on_frame: Callable[[Frame], None],
    ) -> None:
        """In the new image of an upgraded primary: carry on with the worker ``record`` names,
        serving as it was, over its inherited channel ``sock``."""
        self._process = process
        self._channel = Channel(
            sock, on_frame, name=self.describe(), max_fds=0, last_seq=record.channel.last_seq
        )
        self.listening = list(record.listening)
        self.stats = dict(record.stats)
        self._accepted = record.accepted
        self.request_limit = record.request_limit
        self.started_at = asyncio.get_running_loop().time() - record.age
        self._announced = True  # it sent `online` to the old image
        self.state = "listening"
        self._listening.set()
        self._channel.start()

    def reply(self, frame: Frame, msg: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
        """Answer the worker's request ``frame`` with ``msg`` (and descriptors)."""
        assert self._channel is not None, "attach() the worker first"
        self._channel.reply(frame, msg, fds)

    def came_online(self) -> None:
        """It sent ``online`` (raises :class:`ProtocolError` the second time)."""
        if self._announced:
            raise ProtocolError(f"{self.describe()} sent 'online' twice")
        self._announced = True
        if self.state == "starting":
            self.state = "online"

    def started_listening(self, address: str, *, more: bool = False) -> bool:
        """It reported a listen on ``address``; False if it had said so already.

        ``more``: it is still starting other listens, so it does not count as listening yet.
        """
        new = address not in self.listening
        if new:
            if len(self.listening) >= MAX_HANDLES:
                # Servers from create_server() never report their close: forget the oldest.
                del self.listening[0]
            self.listening.append(address)
        if not more:
            if self.state in ("starting", "online"):
                self.state = "listening"
            self._listening.set()
        return new

    def stopped_listening(self, address: str) -> None:
        """It stopped listening on ``address`` (ignored if it never did)."""
        if address in self.listening:
            self.listening.remove(address)

    def report_app_error(self, report: AppErrorReport) -> None:
        """It reported that the application cannot be loaded (the first report counts)."""
        if self.app_error is None:
            self.app_error = report

    def record_stats(self, stats: dict[str, float]) -> None:
        """Its event loop's latest report (requests, connections, rss, lag)."""
        self.stats = stats

    def count_accepted(self, total: int) -> None:
        """It has accepted ``total`` connections so far (pushed by the balancer)."""
        self._accepted = total

    def arm_hang_timer(self, timeout: float) -> None:
        """Dump the stack and kill the worker unless re-armed within ``timeout`` s (0: never)."""
        if timeout <= 0 or self.state == "dead":
            return
        self.cancel_hang_timer()
        self._hang = asyncio.get_running_loop().call_later(timeout, self._hung, timeout)

    def cancel_hang_timer(self) -> None:
        """Stop waiting for a heartbeat (it exited)."""
        if self._hang is not None:
            self._hang.cancel()
            self._hang = None

    async def watch(self) -> int:
        """Wait for the process to exit, then mark it dead; returns its status.

        A worker whose channel broke (it violated the protocol, or stopped reading) is killed
        first: it is never trusted again and may not even read a request to leave.
        """
        assert self._process is not None and self._channel is not None, "attach() first"
        channel = self._channel
        exit_task = asyncio.create_task(self._process.wait())
        closed_task = asyncio.create_task(channel.wait_closed())
        await asyncio.wait({exit_task, closed_task}, return_when=asyncio.FIRST_COMPLETED)
        why = cut_off_because(channel.close_reason)
        if why is not None and not exit_task.done():
            log.error("%s %s; killing it", self.describe(), why)
            self.faulted = True
            self.signal(signal.SIGKILL)
        if closed_task.done():
            self._channel_closed()  # it closed its end (drained), or was cut off: before exit
        returncode = await exit_task
        closed_task.cancel()
        channel.close()
        self._channel_closed()
        self.cancel_hang_timer()
        if self._overdue is not None:
            self._overdue.cancel()
            self._overdue = None
        self.state = "dead"
        self.returncode = returncode
        self._exited.set()
        return returncode

    def _channel_closed(self) -> None:
        if not self._disconnected:
            self._disconnected = True
            self._on_event("disconnect", self)

    def _drain_overdue(self) -> None:
        self._overdue = None
        if self.state != "dead":
            log.warning(
                "killing %s: still running %gs after it was told to drain "
                "(graceful timeout, cleanup allowance and a margin)",
                self.describe(),
                self._drain_limit,
            )
            self.signal(signal.SIGKILL)

    def _hung(self, timeout: float) -> None:
        self._hang = None
        if self.state == "dead":
            return
        log.error(
            "%s is hung: no heartbeat from its event loop for %gs; dumping its stack, killing it",
            self.describe(),
            timeout,
        )
        self.faulted = True
        self.signal(signal.SIGUSR1)  # faulthandler in the worker prints every thread's stack
        # The dump is written by a C signal handler as soon as the signal lands; half a second
        # is ample for it before the kill.
        asyncio.get_running_loop().call_later(0.5, self.signal, signal.SIGKILL)


#: Node's name for the primary's view of a worker: ``aiocluster.Worker``.
Worker = WorkerProcess


def cut_off_because(reason: BaseException | None) -> str | None:
    """Why a worker whose channel closed for ``reason`` must be killed; None if it need not."""
    if isinstance(reason, ProtocolError):
        return f"broke the channel protocol ({reason})"
    if isinstance(reason, PeerNotReading):
        return f"stopped reading its channel ({reason})"
    if reason is not None and not isinstance(reason, ChannelClosed):
        # Our handler failed on its message: whatever it sent, it is cut off like a violation.
        return f"sent a message the primary could not handle ({type(reason).__name__}: {reason})"
    return None  # it closed its end (or we did): it is on its way out
