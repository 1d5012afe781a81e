"""The primary's handle table: listening sockets created once and shared with every worker.

Keyed like Node's cluster (address, and the index of the listen within one worker), so the
n-th listen on an address in every worker gets the same socket, and port 0 resolves to one
real port for the whole cluster. Under policy ``reuseport`` the key also holds the worker
slot: each slot gets its own SO_REUSEPORT socket on the one port, and keeps it across the
restarts of its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from ._address import Address

__all__ = ["MAX_HANDLES", "Handle", "HandleTable", "open_listener"]

log = logging.getLogger("aiocluster.primary")

#: (address asked for, index of the listen within a worker, slot; 0: shared by every slot)
HandleKey = tuple[Address, int, int]

MAX_HANDLES = 256
"""Most listening sockets the primary holds at once: a worker asking for more gets EMFILE."""


@dataclass(slots=True)
class Handle:
    """One listening socket owned by the primary."""

    key: HandleKey
    sock: socket.socket
    # The Unix socket file we created, with its inode, so we only ever unlink our own file.
    unix_inode: tuple[str, int] | None = None
    #: Names the listen on the channel; the same for every slot's socket of one listen.
    id: int = 0
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def slot(self) -> int:
        """The worker slot whose SO_REUSEPORT socket this is; 0 for a socket shared by all."""
        return self.key[2]

    def describe(self) -> str:
        """The real address, and the slot for a SO_REUSEPORT socket: how logs name it."""
        return f"{self.sockname} (SO_REUSEPORT, slot {self.slot})" if self.slot else self.sockname

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` just before the socket closes (to stop watching it first)."""
        self._closers.append(callback)

    @property
    def sockname(self) -> str:
        """The real address, as a string: ``host:port`` or ``unix:path``."""
        return format_sockname(self.sock)

    def close(self) -> None:
        """Close the socket and remove the Unix socket file if it is still ours."""
        closers, self._closers = self._closers, []
        for callback in closers:
            try:
                callback()
            except Exception:
                log.exception("closing %s: callback failed", self.sockname)
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


#: One ``getaddrinfo`` result: family, type, proto, canonical name, socket address.
AddrInfo: TypeAlias = tuple[int, int, int, str, Any]


def resolve(address: Address) -> AddrInfo:
    """The first passive ``getaddrinfo`` answer for a TCP ``address`` (may block on DNS)."""
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as err:
        raise unresolvable(address, err) from None
    return infos[0]


async def resolve_async(address: Address) -> AddrInfo:
    """:func:`resolve` without blocking the event loop (the resolver runs in a thread)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as err:
        raise unresolvable(address, err) from None
    return infos[0]


def unresolvable(address: Address, err: Exception) -> OSError:
    """The error a listen on a host name that does not resolve gets, as an ``OSError``.

    UnicodeError: a host name the IDNA codec refuses (an empty or 64+ character label).
    """
    return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {address.host!r}: {err}")


def needs_resolver(address: Address) -> bool:
    """True for a TCP address whose host is a name, not an IP literal: resolving may block."""
    if address.kind != "tcp" or not address.host:
        return False
    try:
        address.host.encode("idna")
    except UnicodeError:
        return False  # the resolver refuses it at once: no wait, no thread needed
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address.host)
        except OSError:
            continue
        return False
    return True


def open_listener(
    address: Address, backlog: int, *, reuseport: bool = False, resolved: AddrInfo | None = None
) -> tuple[socket.socket, tuple[str, int] | None]:
    """Create, bind and listen a socket for ``address``; raises ``OSError`` as ``bind`` does.

    With ``reuseport`` (TCP only) the socket has SO_REUSEPORT set, so that several sockets of
    this user can listen on the same port and the kernel spreads connections over them.
    ``resolved`` is the address already resolved (see :func:`resolve_async`).
    """
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

    family, kind, proto, _, sockaddr = resolved or resolve(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
        self._ids: dict[tuple[Address, int], int] = {}
        # Worker ids holding each handle; handles with no entry here are held by nobody.
        self._holders: dict[HandleKey, set[int]] = {}
        # (address, index) listens kept open for the table's life, held or not.
        self._pinned: set[tuple[Address, int]] = set()

    def __len__(self) -> int:
        return len(self._handles)

    @staticmethod
    def _key(address: Address, index: int, slot: int | None) -> HandleKey:
        reuseport = slot is not None and address.kind == "tcp"
        return (address, index, slot if reuseport and slot is not None else 0)

    def exists(self, address: Address, index: int, *, slot: int | None = None) -> bool:
        """True if the listen ``(address, index)`` (for ``slot``) has its socket already."""
        return self._key(address, index, slot) in self._handles

    def get_or_create(
        self,
        address: Address,
        index: int,
        backlog: int,
        *,
        slot: int | None = None,
        holder: int | None = None,
        resolved: AddrInfo | None = None,
    ) -> tuple[Handle, bool]:
        """Return the handle for ``(address, index)`` and whether it was just created.

        With ``slot`` (policy ``reuseport``), a TCP address gets one SO_REUSEPORT socket per
        slot, all on one port (port 0 resolves once, for the first slot); a Unix socket
        stays one socket shared by every slot, since the kernel cannot spread those.

        ``holder`` (a worker id) now holds the handle, until :meth:`release`. Raises ``OSError``
        (EADDRINUSE, EACCES, ...) if the socket cannot be bound, and EMFILE past
        :data:`MAX_HANDLES`. ``resolved``: ``address`` resolved already, if it names a host.
        """
        key = self._key(address, index, slot)
        reuseport = key[2] != 0
        handle = self._handles.get(key)
        created = handle is None
        if handle is None:
            if len(self._handles) >= MAX_HANDLES:
                raise OSError(
                    errno.EMFILE, f"the primary already holds {MAX_HANDLES} listening sockets"
                )
            bind_to = address
            if reuseport and address.port == 0:
                sibling = next((h for h in self._handles.values() if h.key[:2] == key[:2]), None)
                if sibling is not None:
                    port = sibling.sock.getsockname()[1]
                    bind_to = Address.tcp(address.host, port)
                    if resolved is not None:  # the same host, on the port the siblings share
                        sockaddr = resolved[4]
                        resolved = (*resolved[:4], (sockaddr[0], port, *sockaddr[2:]))
            sock, unix_inode = open_listener(
                bind_to, backlog, reuseport=reuseport, resolved=resolved
            )
            handle_id = self._ids.setdefault((address, index), len(self._ids) + 1)
            handle = Handle(key, sock, unix_inode, handle_id)
            self._handles[key] = handle
        if holder is not None:
            self._holders.setdefault(key, set()).add(holder)
        return handle, created

    def pin(self, address: Address, index: int) -> None:
        """Keep the handles for ``(address, index)`` open for the table's life, held or not."""
        self._pinned.add((address, index))

    def release(self, holder: int, sockname: str | None = None) -> None:
        """``holder`` no longer holds the handle serving ``sockname`` (None: any handle).

        A handle that nobody holds any more is closed unless it is pinned or the first listen on
        its address (index 0): those stay open while workers restart, and a reuseport slot's
        socket waits for its slot's next worker.
        """
        for key in list(self._holders):
            handle = self._handles.get(key)
            if handle is None:
                del self._holders[key]
                continue
            if sockname is not None and handle.sockname != sockname:
                continue
            holders = self._holders[key]
            holders.discard(holder)
            if not holders:
                del self._holders[key]
                if key[1] != 0 and key[:2] not in self._pinned:
                    name = handle.sockname
                    del self._handles[key]
                    handle.close()
                    log.info("closed %s: no worker listens on it any more", name)

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
        self._handles[(address, 0, 0)] = Handle((address, 0, 0), sock)
        return address

    def pop_slot(self, slot: int) -> list[Handle]:
        """Take the SO_REUSEPORT handles of ``slot`` out of the table, still open."""
        keys = [key for key in self._handles if slot and key[2] == slot]
        return [self._handles.pop(key) for key in keys]

    def handles(self) -> list[Handle]:
        """Every handle, in creation order."""
        return list(self._handles.values())

    def close_all(self) -> None:
        """Close every socket and remove the Unix socket files this table created."""
        handles = list(self._handles.values())
        self._handles.clear()
        self._holders.clear()
        for handle in handles:
            handle.close()
