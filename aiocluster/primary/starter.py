"""How the primary starts a worker process: a fresh interpreter, or a fork of the zygote.

``spawn`` runs the program again (``sys.executable`` and the same arguments) for every worker:
each one imports everything itself. ``fork`` starts one zygote (:mod:`aiocluster._zygote`) that
loads the program once, and asks it to fork each worker: workers start in a few milliseconds
and share the zygote's pages. Where the zygote cannot fork safely (threads started at import,
``serve()`` awaited in the program's own loop) or fails to load the program, workers are
spawned instead, and the log says why.

A rolling reload starts a new zygote first, so that new workers run the new code; if it cannot
load the program, the reload stops before any worker is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from aiocluster._config import StartMethod
from aiocluster._errors import (
    APP_ERROR_STATUS,
    AioclusterError,
    AppErrorReport,
    ChannelClosed,
    ProtocolError,
)
from aiocluster._process import Account, prepare_child
from aiocluster._role import ENV_CHANNEL_FD, ENV_WORKER_ID, ENV_WORKER_SLOT, ENV_ZYGOTE_FD
from aiocluster._zygote import take_preforked
from aiocluster.primary.upgrade_state import ChannelRecord
from aiocluster.wire import messages as proto
from aiocluster.wire.channel import Channel, channel_pair
from aiocluster.wire.codec import Frame
from aiocluster.wire.sockets import inherited_socket

__all__ = [
    "AppUnloadable",
    "ProcessHandle",
    "Starter",
    "spawn",
    "worker_argv",
]

log = logging.getLogger("aiocluster.primary")


class ProcessHandle(Protocol):
    """What the primary needs of a worker process, however it was started."""

    @property
    def pid(self) -> int:
        """The process id."""

    async def wait(self) -> int:
        """Wait for the exit; the status code, or minus the signal number that killed it."""

    def send_signal(self, sig: int) -> None:
        """Send ``sig``; raise ProcessLookupError once the process is gone."""


class ForkedProcess:
    """A worker forked by the zygote and re-parented to the primary, watched through a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        # A pidfd names this very process: a signal can never reach a recycled pid.
        self._pidfd = os.pidfd_open(pid)

    async def wait(self) -> int:
        """Wait for the exit (the pidfd becomes readable), then reap the process."""
        if self.returncode is None:
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(self._pidfd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(self._pidfd)
            self.returncode = self._reap()
        return self.returncode

    def _reap(self) -> int:
        try:
            # The pidfd is readable: the process has exited, and this returns at once.
            _, status = os.waitpid(self.pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            # Not re-parented to us (no subreaper support): it is gone, status unknown.
            log.warning("worker pid %d exited; its status is unknown", self.pid)
            returncode = 255
        os.close(self._pidfd)
        return returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` through the pidfd."""
        if self.returncode is not None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)


class AppUnloadable(AioclusterError):
    """The zygote said the application cannot be loaded, before the cluster ever served."""

    def __init__(self, message: str, report: AppErrorReport | None) -> None:
        super().__init__(message)
        #: What the zygote reported (None: it exited without a report).
        self.report = report


class ZygoteUnavailable(Exception):
    """The zygote cannot fork workers: it refused (why), failed to load, or is gone."""

    def __init__(
        self,
        why: str,
        *,
        loaded: bool,
        status: int | None = None,
        report: AppErrorReport | None = None,
    ) -> None:
        super().__init__(why)
        #: The zygote's exit status, if it exited while loading.
        self.status = status
        #: What it reported wrong with the application, if it did.
        self.report = report
        #: True when the program loaded but forking is unsafe there (use spawn, no error).
        self.loaded = loaded


class Zygote:
    """The primary's handle on one zygote process and its channel."""

    def __init__(
        self, process: ProcessHandle, sock: socket.socket, *, adopted: ChannelRecord | None = None
    ) -> None:
        """``adopted``: the zygote of an upgraded primary's old image, loaded already, on its
        inherited channel (continuing its numbering)."""
        self._process = process
        self._answer: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        last_seq = adopted.last_seq if adopted is not None else 0
        self._channel = Channel(sock, self._on_frame, name="zygote", max_fds=0, last_seq=last_seq)
        if adopted is not None:
            self._answer.set_result(Frame({"act": proto.ZYGOTE_READY}))
        self._channel.start()
        self._exit: asyncio.Task[int] = asyncio.ensure_future(process.wait())

    @classmethod
    async def spawn(cls, argv: Sequence[str], account: Account | None = None) -> Zygote:
        """A zygote running the program afresh (it then loads the program as it is now),
        as ``account`` if given."""
        parent, child = channel_pair()
        try:
            process = await spawn(
                argv, dict(os.environ), child, fd_variable=ENV_ZYGOTE_FD, account=account
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return cls(process, parent)

    @property
    def pid(self) -> int:
        """The zygote's process id."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        """True while the zygote can be asked to fork."""
        return not self._channel.closed and not self._exit.done()

    async def ready(self) -> None:
        """Wait until the zygote has loaded the program and can fork.

        Raises :class:`ZygoteUnavailable` if it refuses or exits first.
        """
        first: set[asyncio.Future[Any]] = {self._answer, self._exit}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not self._answer.done():
            await self.aclose()
            status = self._exit.result()
            raise ZygoteUnavailable(
                f"the zygote exited with status {status} while loading the program",
                loaded=False,
                status=status,
            )
        msg = self._answer.result().msg
        if msg.get("act") == proto.ZYGOTE_UNABLE:
            await self.aclose()
            raise ZygoteUnavailable(str(msg.get("why", "no reason given")), loaded=True)
        if msg.get("act") == proto.APP_ERROR:
            try:
                report: AppErrorReport | None = proto.app_error_report(msg)
            except ProtocolError:
                report = None
            await self.aclose()
            raise ZygoteUnavailable(
                "the zygote cannot load the application",
                loaded=False,
                status=APP_ERROR_STATUS,
                report=report,
            )

    def handover(self) -> tuple[int, ChannelRecord] | None:
        """Its pid and channel for an in-place upgrade; None if it is busy forking."""
        if not self._channel.idle():
            return None
        return self._process.pid, ChannelRecord(self._channel.fileno(), self._channel.last_seq)

    def pause(self) -> None:
        """Stop reading its channel (an upgrade is handing it over)."""
        self._channel.pause()

    def resume(self) -> None:
        """Read its channel again (the upgrade was refused)."""
        self._channel.resume()

    def _on_frame(self, frame: Frame) -> None:
        if not self._answer.done():
            self._answer.set_result(frame)

    async def fork(self, worker_id: int, slot: int, channel_end: socket.socket) -> ForkedProcess:
        """Ask the zygote for a worker serving over ``channel_end``; raise OSError if it fails."""
        if not self.alive:
            raise ZygoteUnavailable("the zygote is gone", loaded=True)
        msg = {"act": proto.ZYGOTE_FORK, "id": worker_id, "slot": slot}
        try:
            with _subreaper():
                reply = await self._channel.request(msg, [channel_end.fileno()])
        except ChannelClosed:
            raise ZygoteUnavailable("the zygote is gone", loaded=True) from None
        pid = reply.msg.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            code = reply.msg.get("errno")
            raise OSError(
                code if isinstance(code, int) else 0, f"fork failed: {reply.msg.get('error')}"
            )
        return ForkedProcess(pid)

    async def aclose(self) -> None:
        """Close the channel (the zygote exits when it sees that) and reap the zygote."""
        self._channel.close()
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(self._exit)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGKILL)
            await self._exit


def _take_preforked() -> Zygote | None:
    taken = take_preforked()
    return None if taken is None else Zygote(ForkedProcess(taken[0]), taken[1])


class Starter:
    """Starts the cluster's worker processes by the configured method."""

    def __init__(
        self, method: StartMethod, argv: Sequence[str], account: Account | None = None
    ) -> None:
        #: The method in use: ``fork`` falls back to ``spawn`` where it cannot work.
        self.method: StartMethod = method
        self._argv = list(argv)
        # Who spawned processes run as (--user/--group); a forked zygote drops by itself.
        self._account = account
        self._zygote: Zygote | None = None
        self._starting: asyncio.Task[Zygote | None] | None = None
        # The last zygote failed to load the program: spawn until a reload tries again.
        self._failed = False
        # Until the cluster has served, an application that cannot load ends it.
        self._served = False

    @property
    def zygote_pid(self) -> int | None:
        """The current zygote's pid (None: none running)."""
        return self._zygote.pid if self._zygote is not None and self._zygote.alive else None

    async def start(
        self, worker_id: int, slot: int, env: dict[str, str], channel_end: socket.socket
    ) -> ProcessHandle:
        """Start worker ``worker_id`` for ``slot``, serving the channel's other end."""
        if self.method == "fork" and not self._failed:
            zygote = await self._current()
            if zygote is not None:
                try:
                    return await zygote.fork(worker_id, slot, channel_end)
                except ZygoteUnavailable:
                    log.warning("the zygote is gone; starting a new one")
                    self._zygote = None
                    zygote = await self._current()
                    if zygote is not None:
                        return await zygote.fork(worker_id, slot, channel_end)
        return await spawn(self._argv, env, channel_end, account=self._account)

    async def launch(self, worker_id: int, slot: int) -> tuple[ProcessHandle, socket.socket]:
        """Start worker ``worker_id`` for ``slot`` with its channel: the process, and our end."""
        parent, child = channel_pair()
        env = dict(os.environ)
        env[ENV_WORKER_ID] = str(worker_id)
        env[ENV_WORKER_SLOT] = str(slot)
        try:
            process = await self.start(worker_id, slot, env, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return process, parent

    async def _current(self) -> Zygote | None:
        if self._zygote is not None and self._zygote.alive:
            return self._zygote
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._new_zygote())
        starting = self._starting
        try:
            zygote = await asyncio.shield(starting)
        finally:
            if self._starting is starting and starting.done():
                self._starting = None
        if zygote is not None:
            self._zygote = zygote
        return zygote

    def served(self) -> None:
        """The cluster has served: from now on a zygote that cannot load the application is a
        reason to spawn workers (which retry), not to stop."""
        self._served = True

    async def _new_zygote(self) -> Zygote | None:
        try:
            zygote = _take_preforked() or await Zygote.spawn(self._argv, self._account)
            await zygote.ready()
        except ZygoteUnavailable as err:
            if err.status == APP_ERROR_STATUS and not self._served:
                raise AppUnloadable(str(err), err.report) from None
            if err.loaded:
                log.warning("start method fork is not available (%s); spawning workers", err)
                self.method = "spawn"
            else:
                log.error("%s; starting workers as fresh interpreters instead", err)
                self._failed = True
            return None
        log.info("zygote (pid %s) loaded the program; forking workers from it", zygote.pid)
        return zygote

    async def renew(self) -> bool:
        """Before a reload: a new zygote with the program as it is now. False if it fails."""
        if self.method != "fork":
            return True
        try:
            zygote = await Zygote.spawn(self._argv, self._account)
            await zygote.ready()
        except ZygoteUnavailable as err:
            if err.loaded:
                log.warning("start method fork is not available (%s); spawning workers", err)
                self.method = "spawn"
                return True
            if err.report is not None:
                log.error("reload: the new code cannot be loaded:\n%s", err.report.text().rstrip())
            else:
                log.error("reload: %s", err)
            return False
        old, self._zygote, self._failed = self._zygote, zygote, False
        log.info("zygote (pid %s) loaded the program; forking workers from it", zygote.pid)
        if old is not None:
            await old.aclose()
        return True

    def busy(self) -> bool:
        """True while a zygote is being started."""
        return self._starting is not None

    @property
    def zygote(self) -> Zygote | None:
        """The running zygote, if any."""
        return self._zygote if self._zygote is not None and self._zygote.alive else None

    @property
    def has_served(self) -> bool:
        """True once the cluster has served (see :meth:`served`)."""
        return self._served

    def adopt_zygote(self, pid: int, channel: ChannelRecord) -> None:
        """After an in-place upgrade: fork workers from the zygote the old image ran."""
        self._zygote = Zygote(ForkedProcess(pid), inherited_socket(channel.fd), adopted=channel)

    async def aclose(self) -> None:
        """Stop the zygote, if any."""
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
            self._starting = None
        if self._zygote is not None:
            await self._zygote.aclose()
            self._zygote = None


async def spawn(
    argv: Sequence[str],
    env: dict[str, str],
    channel_end: socket.socket,
    *,
    fd_variable: str = ENV_CHANNEL_FD,
    account: Account | None = None,
) -> asyncio.subprocess.Process:
    """A fresh interpreter running ``argv`` on ``channel_end``, named by ``fd_variable``: a
    worker (start method spawn), or with ``ENV_ZYGOTE_FD`` a zygote; as ``account`` if given."""
    env = dict(env)
    env[fd_variable] = str(channel_end.fileno())
    return await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        pass_fds=(channel_end.fileno(),),
        stdin=subprocess.DEVNULL,
        # Own process group: a terminal's Ctrl-C reaches only the primary, which then drains
        # the workers in order instead of every process (and the zygote) dying at once.
        preexec_fn=prepare_child(account),
    )


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_subreaping = 0
_was_subreaper: bool | None = None


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """The primary is a child subreaper while a fork is in flight, and only then.

    The worker's intermediate parent exits at once; the worker is then re-parented to the
    nearest subreaper among its ancestors, which must be us. Off again afterwards, so that
    processes orphaned by workers later go to init, as they would under spawn.
    """
    global _subreaping, _was_subreaper
    libc = ctypes.CDLL(None, use_errno=True)
    if _was_subreaper is None:
        flag = ctypes.c_int(0)
        libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
        _was_subreaper = bool(flag.value)
    if _subreaping == 0 and not _was_subreaper:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _subreaping += 1
    try:
        yield None
    finally:
        _subreaping -= 1
        if _subreaping == 0 and not _was_subreaper:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def worker_argv() -> list[str]:
    """The command line that runs this program again: the worker's (and the zygote's).

    ``sys.orig_argv`` keeps interpreter options (``-m``, ``-X``...) that ``sys.argv`` loses.
    A script named by a relative path is named by its absolute one, which ``__main__`` knows
    from the start: ``--chdir`` would lose it otherwise.
    """
    argv = [sys.executable, *sys.orig_argv[1:]]
    script = len(sys.orig_argv) - len(sys.argv)
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if (
        isinstance(main_file, str)
        and os.path.isabs(main_file)
        and 0 < script < len(argv)
        and argv[script] == sys.argv[0]
        and not os.path.isabs(sys.argv[0])
    ):
        argv[script] = main_file
    return argv
