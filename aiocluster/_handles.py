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

__all__ = ["Handle", "HandleTable", "open_listener"]

log = logging.getLogger("aiocluster.primary")

HandleKey = tuple[Address, int]


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
    except socket.gaierror as err:
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

    def __len__(self) -> int:
        return len(self._handles)

    def get_or_create(self, address: Address, index: int, backlog: int) -> tuple[Handle, bool]:
        """Return the handle for ``(address, index)`` and whether it was just created.

        Raises ``OSError`` (EADDRINUSE, EACCES, ...) if the socket cannot be bound.
        """
        key = (address, index)
        handle = self._handles.get(key)
        if handle is not None:
            return handle, False
        sock, unix_inode = open_listener(address, backlog)
        handle = Handle(key, sock, unix_inode)
        self._handles[key] = handle
        return handle, True

    def adopt(self, sock: socket.socket) -> Address:
        """Serve an already listening socket (systemd socket activation) as index 0 of its address.

        The file of an adopted Unix socket belongs to whoever made it: it is never removed here.
        """
        name = format_sockname(sock)
        if name.startswith("unix:"):
            address = Address.unix(name[len("unix:") :])
        else:
            host, _, port = name.rpartition(":")
            address = Address.tcp(host.strip("[]"), int(port))
        self._handles[(address, 0)] = Handle((address, 0), sock)
        return address

    def handles(self) -> list[Handle]:
        """Every handle, in creation order."""
        return list(self._handles.values())

    def close_all(self) -> None:
        """Close every socket and remove the Unix socket files this table created."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
