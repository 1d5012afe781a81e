"""The primary's handle table: listening sockets created once and shared with every worker.

Keyed like Node's cluster (address, and the index of the listen within one worker), so the
n-th listen on an address in every worker gets the same socket, and port 0 resolves to one
real port for the whole cluster.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass

from ._address import Address

__all__ = ["MAX_HANDLES", "Handle", "HandleTable", "open_listener"]

log = logging.getLogger("aiocluster.primary")

HandleKey = tuple[Address, int]

MAX_HANDLES = 256
"""Most listening sockets the primary holds at once: a worker asking for more gets EMFILE."""


@dataclass(slots=True)
class Handle:
    """One listening socket owned by the primary."""

    key: HandleKey
    sock: socket.socket
    # The Unix socket file we created, with its inode, so we only ever unlink our own file.
    unix_inode: tuple[str, int] | None = None

    @property
    def sockname(self) -> str:
        """The real address, as a string: ``host:port`` or ``unix:path``."""
        return format_sockname(self.sock)

    def close(self) -> None:
        """Close the socket and remove the Unix socket file if it is still ours."""
        self.sock.close()
        if self.unix_inode is not None:
            path, inode = self.unix_inode
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            self.unix_inode = None


def format_sockname(sock: socket.socket) -> str:
    """``host:port`` (``[v6]:port``) for TCP, ``unix:path`` for Unix sockets."""
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def _remove_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a dead server; refuse to touch anything else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EADDRINUSE, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a stale file from a server that died
        return
    except OSError:
        return  # let bind() report whatever is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}")


def open_listener(address: Address, backlog: int) -> tuple[socket.socket, tuple[str, int] | None]:
    """Create, bind and listen a socket for ``address``; raises ``OSError`` as ``bind`` does."""
    if address.kind == "unix":
        _remove_stale_unix_socket(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address.path)
            inode = os.stat(address.path).st_ino
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock, (address.path, inode)

    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as err:
        # UnicodeError: a host name the IDNA codec refuses (an empty or 64+ character label).
        raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {address.host!r}: {err}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock, None


class HandleTable:
    """Listening sockets by key; the first request for a key creates the socket."""

    def __init__(self) -> None:
        self._handles: dict[HandleKey, Handle] = {}
        # Worker ids holding each handle; handles with no entry here are held by nobody.
        self._holders: dict[HandleKey, set[int]] = {}
        self._pinned: set[HandleKey] = set()

    def __len__(self) -> int:
        return len(self._handles)

    def get_or_create(
        self, address: Address, index: int, backlog: int, *, holder: int | None = None
    ) -> tuple[Handle, bool]:
        """Return the handle for ``(address, index)`` and whether it was just created.

        ``holder`` (a worker id) now holds the handle, until :meth:`release`. Raises ``OSError``
        (EADDRINUSE, EACCES, ...) if the socket cannot be bound, and EMFILE past
        :data:`MAX_HANDLES`.
        """
        key = (address, index)
        handle = self._handles.get(key)
        created = handle is None
        if handle is None:
            if len(self._handles) >= MAX_HANDLES:
                raise OSError(
                    errno.EMFILE, f"the primary already holds {MAX_HANDLES} listening sockets"
                )
            sock, unix_inode = open_listener(address, backlog)
            handle = Handle(key, sock, unix_inode)
            self._handles[key] = handle
        if holder is not None:
            self._holders.setdefault(key, set()).add(holder)
        return handle, created

    def pin(self, address: Address, index: int) -> None:
        """Keep the handle for ``(address, index)`` open for the table's life, held or not."""
        self._pinned.add((address, index))

    def release(self, holder: int, sockname: str | None = None) -> None:
        """``holder`` no longer holds the handle serving ``sockname`` (None: any handle).

        A handle that nobody holds any more is closed unless it is pinned: the first listen on
        each address, and the cluster's configured addresses, stay open while workers restart.
        """
        for key in list(self._holders):
            handle = self._handles[key]
            if sockname is not None and handle.sockname != sockname:
                continue
            holders = self._holders[key]
            holders.discard(holder)
            if not holders:
                del self._holders[key]
                if key[1] != 0 and key not in self._pinned:
                    name = handle.sockname
                    del self._handles[key]
                    handle.close()
                    log.info("closed %s: no worker listens on it any more", name)

    def handles(self) -> list[Handle]:
        """Every handle, in creation order."""
        return list(self._handles.values())

    def close_all(self) -> None:
        """Close every socket and remove the Unix socket files this table created."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._holders.clear()
