"""Policy ``reuseport`` in rotation: a BPF program that gives each new connection to the next
slot whose worker serves.

Without it the kernel picks a listen's SO_REUSEPORT socket by a hash of the connection's
addresses: even on average, blind to which slots have a worker. A slot whose worker crashed
keeps receiving its share, queued until the replacement listens (seconds, under a crash
back-off). With it, one ``BPF_PROG_TYPE_SK_REUSEPORT`` program per listen picks
``serving[counter++ % len(serving)]`` from a ``REUSEPORT_SOCKARRAY`` map that the primary
rewrites whenever a slot's first worker starts serving or its last one stops. The kernel does
the choosing, so the primary still touches no connection (unlike ``rr``).

Loading the program needs ``CAP_BPF`` (or ``CAP_SYS_ADMIN``; unprivileged BPF never covers
this program type); where it is refused the kernel's hash spreads the connections, as before,
and the primary says so once. The instructions are built in
:mod:`aiocluster.primary.steering_program` (pure) and loaded here with the ``bpf(2)`` system
call through :mod:`ctypes`: no compiler, no library.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiocluster.primary.steering_program import MAX_SLOTS, program, state_value

__all__ = ["Rotation", "Steering"]

log = logging.getLogger("aiocluster.primary")

# bpf(2) commands, map and program types (include/uapi/linux/bpf.h).
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _PROG_LOAD = 0, 2, 3, 5
_MAP_TYPE_ARRAY, _MAP_TYPE_REUSEPORT_SOCKARRAY = 2, 20
_PROG_TYPE_SK_REUSEPORT = 21
_SO_ATTACH_REUSEPORT_EBPF = 52
_ATTR_SIZE = 128
#: The system call's number, where this module knows it.
_NR_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280, "riscv64": 280, "ppc64le": 361}


class _Bpf:
    """The few bpf(2) commands used here, through libc's ``syscall``."""

    def __init__(self) -> None:
        number = _NR_BPF.get(platform.machine())
        if not sys.platform.startswith("linux") or number is None or sys.byteorder != "little":
            raise OSError(errno.ENOSYS, f"no bpf(2) here ({sys.platform}, {platform.machine()})")
        self._number = number
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall

    def call(self, command: int, attr: bytes) -> int:
        buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
        result = int(self._syscall(self._number, command, buf, _ATTR_SIZE))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result

    def create_map(self, kind: int, value_size: int, entries: int) -> int:
        return self.call(_MAP_CREATE, struct.pack("<IIIII", kind, 4, value_size, entries, 0))

    def update(self, map_fd: int, key: int, value: bytes) -> None:
        k = ctypes.create_string_buffer(struct.pack("<I", key))
        v = ctypes.create_string_buffer(value)
        self.call(
            _MAP_UPDATE_ELEM,
            struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0),
        )

    def delete(self, map_fd: int, key: int) -> None:
        k = ctypes.create_string_buffer(struct.pack("<I", key))
        self.call(_MAP_DELETE_ELEM, struct.pack("<IIQ", map_fd, 0, ctypes.addressof(k)))

    def load(self, code: bytes) -> int:
        insns = ctypes.create_string_buffer(code)
        license_ = ctypes.create_string_buffer(b"GPL")  # sk_select_reuseport is GPL-only
        attr = struct.pack(
            "<IIQQIIQII16s",
            _PROG_TYPE_SK_REUSEPORT,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license_),
            0,
            0,
            0,
            0,
            0,
            b"aiocluster_rot",
        )
        return self.call(_PROG_LOAD, attr)


class Rotation:
    """One listen's reuseport group, steered in rotation over the sockets placed in it."""

    def __init__(self, member: socket.socket) -> None:
        """Load the program and attach it to the group ``member`` (a bound, listening
        SO_REUSEPORT socket) belongs to. Raises ``OSError`` if the kernel refuses."""
        self._bpf = _Bpf()
        self._fds: list[int] = []
        try:
            self._state = self._own(self._bpf.create_map(_MAP_TYPE_ARRAY, len(state_value(())), 1))
            self._sockets = self._own(
                self._bpf.create_map(_MAP_TYPE_REUSEPORT_SOCKARRAY, 8, MAX_SLOTS)
            )
            prog = self._bpf.load(program(self._state, self._sockets))
            try:
                member.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF, prog)
            finally:
                os.close(prog)  # the group holds the program now
        except BaseException:
            self.close()
            raise

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def place(self, index: int, sock: socket.socket) -> None:
        """Put ``sock`` (of this group) at ``index`` of the map, once; the kernel takes it out
        when it closes. Raises ``OSError`` (EBUSY: it is still in another program's map)."""
        self._bpf.update(self._sockets, index, struct.pack("<Q", sock.fileno()))

    def steer(self, order: Sequence[int]) -> None:
        """New connections go, in turn, to the sockets placed at ``order``; none: the hash."""
        self._bpf.update(self._state, 0, state_value(order))

    def unplace(self, index: int) -> None:
        """Take the socket at ``index`` out of the map (it may join another map then)."""
        self._bpf.delete(self._sockets, index)

    def close(self) -> None:
        """Close the maps (the program stays with the group's sockets until they close)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


@dataclass(slots=True)
class _Listen:
    rotation: Rotation
    sockets: dict[int, socket.socket] = field(default_factory=dict)  # by slot
    placed: set[int] = field(default_factory=set)  # slots whose socket is in the map
    serving: dict[int, set[int]] = field(default_factory=dict)  # slot: worker ids
    steered: tuple[int, ...] | None = None


class Steering:
    """Every reuseport listen's rotation, kept to the slots whose workers serve it."""

    def __init__(self) -> None:
        self._listens: dict[int, _Listen] = {}
        self._refused: str | None = None

    @property
    def refused(self) -> str | None:
        """Why the kernel would not load the program (the hash spreads connections), if so."""
        return self._refused

    def add(self, listen: int, slot: int, sock: socket.socket) -> None:
        """``sock`` is ``slot``'s SO_REUSEPORT socket of the listen ``listen``."""
        entry = self._listens.get(listen)
        if entry is None:
            if self._refused is not None:
                return
            try:
                entry = self._listens[listen] = _Listen(Rotation(sock))
            except OSError as err:
                self._refused = f"[Errno {err.errno}] {err.strerror}"
                log.info(
                    "reuseport: the kernel's hash spreads new connections; the BPF program "
                    "that gives them to the serving slots in turn was refused (%s; it needs "
                    "CAP_BPF and Linux 5.12+)",
                    self._refused,
                )
                return
            log.info("reuseport: new connections go to the serving slots in turn (BPF)")
        entry.sockets[slot] = sock
        self._sync(entry)

    def remove(self, listen: int, slot: int) -> None:
        """``slot``'s socket of ``listen`` is closing (drained, or no longer held)."""
        entry = self._listens.get(listen)
        if entry is not None and entry.sockets.pop(slot, None) is not None:
            entry.serving.pop(slot, None)
            entry.placed.discard(slot)
            self._sync(entry)

    def join(self, worker_id: int, slot: int, listen: int) -> None:
        """Worker ``worker_id`` of ``slot`` serves ``listen``."""
        entry = self._listens.get(listen)
        if entry is not None and slot in entry.sockets:
            entry.serving.setdefault(slot, set()).add(worker_id)
            self._sync(entry)

    def part(self, worker_id: int, listen: int | None = None) -> None:
        """Worker ``worker_id`` stopped serving ``listen`` (None: every listen; it exited)."""
        for key, entry in self._listens.items():
            if listen is None or key == listen:
                for workers in entry.serving.values():
                    workers.discard(worker_id)
                self._sync(entry)

    def release(self) -> None:
        """Leave the sockets to the kernel's hash and free them for another primary's maps
        (an in-place upgrade's new image: a socket can be in one map only)."""
        for entry in self._listens.values():
            try:
                entry.rotation.steer(())
                for slot in entry.placed:
                    entry.rotation.unplace(slot - 1)
            except OSError as err:  # not expected: the new image then keeps the hash
                log.warning("reuseport: could not release the rotation's sockets: %s", err)
            entry.placed.clear()
            entry.steered = None

    def resume(self) -> None:
        """Steer again after :meth:`release` (the upgrade did not happen)."""
        for entry in self._listens.values():
            self._sync(entry)

    def close(self) -> None:
        """The listens are closed: close every map."""
        for entry in self._listens.values():
            entry.rotation.close()
        self._listens.clear()

    def _sync(self, entry: _Listen) -> None:
        for slot, sock in entry.sockets.items():
            if slot not in entry.placed and slot <= MAX_SLOTS:
                try:
                    entry.rotation.place(slot - 1, sock)
                except OSError as err:  # retried on the next change
                    log.debug("reuseport: slot %d's socket not placed yet: %s", slot, err)
                else:
                    entry.placed.add(slot)
        serving = sorted(slot for slot, ids in entry.serving.items() if ids)
        # A serving slot the map lacks would get nothing: then the hash serves them all.
        steered = tuple(serving) if set(serving) <= entry.placed else ()
        if steered == entry.steered:
            return
        try:
            entry.rotation.steer([slot - 1 for slot in steered])
        except OSError as err:  # our own map, sized for it: not expected; the hash decides
            log.warning("reuseport: could not steer to slots %s: %s", steered, err)
            return
        entry.steered = steered
