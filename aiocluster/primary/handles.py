"""The primary's handle table: listening sockets created once and shared with every worker.

Keyed like Node's cluster (address, and the index of the listen within one worker), so the
n-th listen on an address in every worker gets the same socket, and port 0 resolves to one
real port for the whole cluster. Under policy ``reuseport`` the key also holds the worker
slot: each slot gets its own SO_REUSEPORT socket on the one port, and keeps it across the
restarts of its worker.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from aiocluster.primary.upgrade_state import HandleRecord
from aiocluster.wire.address import Address
from aiocluster.wire.sockets import AddrInfo, format_sockname, inherited_socket, open_listener

__all__ = ["MAX_HANDLES", "Handle", "HandleTable"]

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

    def export(
        self,
    ) -> tuple[list[HandleRecord], list[tuple[Address, int, int]], list[tuple[Address, int]]]:
        """The table for an in-place upgrade: every socket with its descriptor and holders,
        every listen id given so far, and the pinned listens."""
        records = [
            HandleRecord(
                address=key[0],
                index=key[1],
                slot=key[2],
                fd=handle.sock.fileno(),
                id=handle.id,
                unix_inode=handle.unix_inode,
                holders=tuple(sorted(self._holders.get(key, ()))),
            )
            for key, handle in self._handles.items()
        ]
        ids = [(address, index, i) for (address, index), i in self._ids.items()]
        return records, ids, sorted(self._pinned, key=str)

    def restore(
        self,
        records: list[HandleRecord],
        ids: list[tuple[Address, int, int]],
        pinned: list[tuple[Address, int]],
    ) -> list[Handle]:
        """After an in-place upgrade: the table :meth:`export` described, around the inherited
        descriptors (made close-on-exec again). Returns the handles."""
        restored = []
        for record in records:
            key = (record.address, record.index, record.slot)
            sock = inherited_socket(record.fd)
            sock.setblocking(False)
            handle = Handle(key, sock, record.unix_inode, record.id)
            self._handles[key] = handle
            if record.holders:
                self._holders[key] = set(record.holders)
            restored.append(handle)
        for address, index, listen_id in ids:
            self._ids[(address, index)] = listen_id
        self._pinned.update(pinned)
        return restored

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
