"""What surrounds a running primary: signals, the control socket, the admin endpoint, systemd.

Every way an operator acts on the cluster (a signal, ``aiocluster reload``, the service manager)
goes through the same three methods — :meth:`Operations.reload`, :meth:`~Operations.scale`,
:meth:`~Operations.stop` — so they behave the same whichever way they came.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiocluster._errors import ConfigError
from aiocluster.ops.control import ControlServer, answer, control_path
from aiocluster.ops.pidfile import PidFile
from aiocluster.ops.systemd import Notifier, listen_fds
from aiocluster.primary.cluster import Cluster
from aiocluster.primary.starter import worker_argv
from aiocluster.primary.upgrade import UpgradeRefused, execute, preflight, quiesce, refusal
from aiocluster.primary.upgrade_state import UpgradeState
from aiocluster.wire.codec import Message

if TYPE_CHECKING:
    from aiocluster.ops.admin import AdminServer
    from aiocluster.ops.reloader import Reloader

__all__ = ["Operations"]

log = logging.getLogger("aiocluster")


class Operations:
    """Runs the operator-facing services of one cluster, as an async context manager."""

    def __init__(self, cluster: Cluster, resumed: UpgradeState | None = None) -> None:
        """``resumed``: this process is the new image of an in-place upgrade; its services
        take over the old image's sockets."""
        self.cluster = cluster
        config = cluster.config
        self._resumed = resumed
        self._upgrading = False
        self.notifier = Notifier(None if resumed is None else resumed.notify_socket or "")
        owner = cluster.account
        self.control: ControlServer | None = None
        if config.control != "off":
            path = control_path(config.name, config.control, uid=owner.uid if owner else None)
            self.control = ControlServer(path, self._command, owner)
        self.pidfile = PidFile(Path(config.pid), owner) if config.pid else None
        self.reloader: Reloader | None = None
        if config.reload:
            # Here: watchfiles is loaded only when asked for.
            from aiocluster.ops.reloader import Reloader

            self.reloader = Reloader(
                config.reload_dir, config.reload_include, config.reload_exclude, self.reload
            )
        self.admin: AdminServer | None = None
        if config.admin is not None:
            # Here: aiohttp and prometheus_client are loaded only when asked for.
            from aiocluster.ops.admin import AdminServer

            self.admin = AdminServer(cluster)
        self._tasks: list[asyncio.Task[Any]] = []
        self._signals: list[signal.Signals] = []

    async def __aenter__(self) -> Operations:
        resumed = self._resumed
        try:
            if self.pidfile is not None:
                if resumed is None:
                    self.pidfile.claim()
                else:
                    self.pidfile.adopt(resumed.pidfile_written)
            if self.control is not None:
                if resumed is not None and resumed.control_fd is not None:
                    await self.control.adopt(resumed.control_fd, resumed.control_inode)
                else:
                    await self.control.start()
            if resumed is None:
                self.cluster.adopt_listeners(listen_fds())
            if self.admin is not None:
                await self.admin.start(resumed.admin_fd if resumed is not None else None)
            if self.reloader is not None:
                await self.reloader.start()
            self._install_signals()
            if (interval := self.notifier.watchdog_interval()) is not None:
                self._tasks.append(asyncio.create_task(self._watchdog(interval)))
        except BaseException:
            await self.aclose()
            raise
        return self

    def cluster_started(self) -> None:
        """Call once the cluster is started: READY=1 goes out when every worker listens.

        In the new image of an upgrade: answer the ``aiocluster upgrade`` that asked for it
        (after the rolling reload, with ``--workers``)."""
        self._spawn(self._announce_ready())
        if self._resumed is not None:
            self._spawn(self._after_upgrade(self._resumed))

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every service; idempotent."""
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.reloader is not None:
            await self.reloader.aclose()
        if self.admin is not None:
            await self.admin.aclose()
        if self.control is not None:
            await self.control.aclose()
        if self.pidfile is not None:
            self.pidfile.remove()
        self.notifier.close()

    # -- the three actions -------------------------------------------------------------------

    async def reload(self) -> bool:
        """Rolling reload, announced to the service manager."""
        self.notifier.reloading()
        ok = await self.cluster.reload()
        self.notifier.ready(self._summary())
        return ok

    def scale(self, size: int) -> None:
        """Change the number of workers."""
        self.cluster.scale(size)
        self.notifier.status(f"scaling to {size} workers")

    async def upgrade(self, *, workers: bool = False, connection: int | None = None) -> None:
        """Re-execute the primary with the code installed now: same pid, workers and sockets.

        Returns only if the upgrade was refused (:class:`UpgradeRefused`: nothing changed);
        on success this process runs the new code from its start, and its new image answers
        ``connection`` (the control client that asked, if one did). ``workers``: the new image
        then runs the rolling reload so the workers run the new code too.
        """
        if self._upgrading:
            raise UpgradeRefused("upgrade refused: an upgrade is under way already")
        why = refusal(self.cluster)
        if why is not None:
            raise UpgradeRefused(f"upgrade refused: {why}")
        self._upgrading = True
        try:
            argv = worker_argv()
            version = await preflight(self._state(argv))
            why = refusal(self.cluster)  # the cluster may have changed during the pre-flight
            if why is not None:
                raise UpgradeRefused(f"upgrade refused: {why}")
            log.info("upgrade: the pre-flight passed (aiocluster %s); handing over", version)
            self.notifier.upgrading()
            try:
                undo = await quiesce(self.cluster)
            except UpgradeRefused:
                self.notifier.ready(self._summary())
                raise
            reply_fd = os.dup(connection) if connection is not None and connection >= 0 else None
            try:
                execute(self._state(argv, reply_fd=reply_fd, then_reload=workers))
            except UpgradeRefused:
                undo()
                self.notifier.ready(self._summary())
                raise
            finally:
                if reply_fd is not None:  # reached only if the exec failed
                    os.close(reply_fd)
        except UpgradeRefused as err:
            text = str(err)
            if not text.startswith("upgrade refused"):
                text = f"upgrade refused: {text}"
            log.error("%s; the primary keeps running its code", text)
            raise UpgradeRefused(text) from None
        finally:
            self._upgrading = False

    def _state(
        self, argv: list[str], *, reply_fd: int | None = None, then_reload: bool = False
    ) -> UpgradeState:
        """The cluster's state, with what the operator-facing services hand over."""
        control = self.control.handover() if self.control is not None else None
        return dataclasses.replace(
            self.cluster.handover(argv),
            control_fd=control[0] if control else None,
            control_path=str(self.control.path) if self.control is not None else None,
            control_inode=control[1] if control else None,
            admin_fd=self.admin.fileno() if self.admin is not None else None,
            notify_socket=self.notifier.address or None,
            pidfile_written=self.pidfile.written if self.pidfile is not None else False,
            reply_fd=reply_fd,
            then_reload=then_reload,
        )

    async def _after_upgrade(self, state: UpgradeState) -> None:
        from aiocluster import __version__

        reply: dict[str, Any] = {"ok": True, "version": __version__, "pid": os.getpid()}
        if state.then_reload:
            log.info("upgrade --workers: reloading the workers onto the new code")
            reply["reloaded"] = await self.reload()
            if not reply["reloaded"]:
                reply = {
                    "ok": False,
                    "error": f"the primary was upgraded to aiocluster {__version__}, but the "
                    "reload stopped: a new worker could not start; the old workers keep serving",
                }
        if state.reply_fd is not None:
            answer(state.reply_fd, reply)

    def stop(self, *, now: bool = False) -> None:
        """Drain and stop; with ``now``, kill the workers at once (a stop already under way too).

        Asking again for a graceful stop changes nothing: the drain goes on to its deadline.
        """
        if not self.cluster.stopping:
            self.notifier.stopping()
        elif not now:
            return
        self.cluster.stop(force=now)

    # -- signals -----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        # Handlers only ask; the cluster's own tasks do the work.
        handlers: dict[signal.Signals, Callable[[], None]] = {
            signal.SIGINT: lambda: self._on_stop(signal.SIGINT),
            signal.SIGTERM: lambda: self._on_stop(signal.SIGTERM),
            signal.SIGQUIT: lambda: self._on_stop(signal.SIGQUIT),
            signal.SIGHUP: self._on_reload,
            signal.SIGUSR2: self._on_upgrade,
            signal.SIGTTIN: lambda: self._on_scale(+1),
            signal.SIGTTOU: lambda: self._on_scale(-1),
        }
        if signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            # The program took SIGUSR2 for itself (its on_primary hook): it stays the program's.
            del handlers[signal.SIGUSR2]
            log.info("SIGUSR2 is the program's own signal here: upgrade with 'aiocluster upgrade'")
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
            self._signals.append(sig)

    def _on_stop(self, sig: signal.Signals) -> None:
        # SIGTERM is always graceful: timeout(1), process-group kills and orchestrators send
        # it more than once. Ctrl-C twice (SIGINT during a stop) or SIGQUIT is the way to force.
        now = sig == signal.SIGQUIT or (sig == signal.SIGINT and self.cluster.stopping)
        if now:
            log.warning("%s received: stopping now (workers are killed)", sig.name)
        elif self.cluster.stopping:
            log.info(
                "%s received: already draining (Ctrl-C again or SIGQUIT stops at once)", sig.name
            )
        else:
            log.info("%s received: draining", sig.name)
        self.stop(now=now)

    def _on_reload(self) -> None:
        log.info("SIGHUP received: reloading workers")
        self._spawn(self.reload())

    def _on_upgrade(self) -> None:
        log.info("SIGUSR2 received: upgrading the primary in place")
        self._spawn(self._upgrade_quietly())

    async def _upgrade_quietly(self) -> None:
        with contextlib.suppress(UpgradeRefused):  # logged; nobody to answer
            await self.upgrade()

    def _on_scale(self, step: int) -> None:
        name = "SIGTTIN" if step > 0 else "SIGTTOU"
        if self.cluster.stopping or self.cluster.size + step < 1:
            log.info("%s received: ignored (%d workers)", name, self.cluster.size)
            return
        log.info("%s received: %s a worker", name, "adding" if step > 0 else "removing")
        self.scale(self.cluster.size + step)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[Any]) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    # -- control commands --------------------------------------------------------------------

    async def _command(self, request: Message, connection: int) -> dict[str, Any]:
        act = request.get("act")
        if act == "status":
            return {
                "status": self.cluster.status(),
                "name": self.cluster.config.name,
                "pid": os.getpid(),
            }
        if act == "upgrade":
            workers = request.get("workers", False)
            if not isinstance(workers, bool):
                raise ConfigError(f"upgrade: 'workers' must be true or false, not {workers!r}")
            log.info("upgrade requested on the control socket")
            await self.upgrade(workers=workers, connection=connection)
            raise UpgradeRefused("upgrade refused: the exec did not happen")  # not reached
        if act == "reload":
            log.info("reload requested on the control socket")
            if not await self.reload():
                raise ConfigError(
                    "reload stopped: a new worker could not start; the old "
                    "workers keep serving (see the cluster's log)"
                )
            return {"workers": self.cluster.size}
        if act == "scale":
            size = request.get("workers")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"scale needs a number of workers >= 1, not {size!r}")
            log.info("scale to %d requested on the control socket", size)
            self.scale(size)
            return {"workers": size}
        if act == "stop":
            log.info("stop requested on the control socket")
            self.stop()
            return {"pid": os.getpid()}
        raise ConfigError(f"unknown control command {act!r}")

    # -- systemd -----------------------------------------------------------------------------

    def _summary(self) -> str:
        status = self.cluster.status()
        return f"{status['listening']} of {status['size']} workers listening"

    async def _announce_ready(self) -> None:
        with contextlib.suppress(Exception):
            await self.cluster.wait_ready()
            if self.pidfile is not None:
                self.pidfile.write()
            self.notifier.ready(self._summary())

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the primary's loop: a primary whose loop is stuck stops pinging.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
