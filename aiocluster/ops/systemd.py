"""systemd integration without libsystemd: sd_notify datagrams and socket activation.

Both protocols are small and stable (``man sd_notify``, ``man sd_listen_fds``): a datagram of
``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``, and listening sockets passed as descriptors 3.. with
``$LISTEN_FDS``/``$LISTEN_PID``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

__all__ = ["LISTEN_FDS_START", "Notifier", "listen_fds"]

log = logging.getLogger("aiocluster.systemd")

LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to the service manager when ``$NOTIFY_SOCKET`` is set (else no-op)."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        #: ``$NOTIFY_SOCKET`` as it was given ("" : none); an upgraded primary's new image
        #: gets it from the old one, since the variable is gone from the environment.
        self.address = address
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address:
            # "@name" is an abstract socket: a leading NUL byte on the wire.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Workers are not the service: they must not talk to the manager in its name.
        os.environ.pop("NOTIFY_SOCKET", None)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        """Send ``KEY=VALUE`` lines; a manager that went away is logged once, never fatal."""
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as err:
            log.warning("cannot notify the service manager (%r): %s", self._address, err)
            self.close()

    def ready(self, status: str) -> None:
        """``READY=1``: the service is up (after start, and after a reload)."""
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """``RELOADING=1``, with the monotonic timestamp that ``Type=notify-reload`` requires."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading workers")

    def upgrading(self) -> None:
        """``RELOADING=1`` before the primary re-executes itself (same pid, new code)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=upgrading the primary")

    def stopping(self) -> None:
        """``STOPPING=1``: draining has begun."""
        self.notify("STOPPING=1", "STATUS=draining workers")

    def status(self, text: str) -> None:
        """A free-form ``STATUS=`` line for ``systemctl status``."""
        self.notify(f"STATUS={text}")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    def close(self) -> None:
        """Stop notifying."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds() -> list[socket.socket]:
    """Listening sockets passed by socket activation, as socket objects (none if not activated).

    Only honoured when ``$LISTEN_PID`` is this process; the variables are then removed so that
    workers do not see them.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            with contextlib.suppress(OSError):
                sock.detach()
            raise OSError(f"socket activation passed fd {fd}, which is not a stream socket")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
