"""What a process holds, from /proc (Linux): its descriptors, their kinds and flags, sockets."""

from __future__ import annotations

import collections
import os
import re

O_CLOEXEC = 0o2000000


def fd_targets(pid: int) -> dict[int, str]:
    """Every open descriptor of ``pid`` and what it points at (``socket:[123]``, a path...)."""
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
    return targets


def fd_kinds(pid: int) -> collections.Counter[str]:
    """How many descriptors of each kind ``pid`` holds (``socket``, ``pipe``, ``/dev/null``...)."""
    return collections.Counter(re.sub(r":\[\d+\]$", "", t) for t in fd_targets(pid).values())


def sockets(pid: int) -> set[int]:
    """The inodes of the sockets ``pid`` holds."""
    found = set()
    for target in fd_targets(pid).values():
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            found.add(int(m.group(1)))
    return found


def fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags for fd {fd} of {pid}")


def _listener(port: int) -> list[str]:
    """The /proc/net/tcp fields of the socket listening on ``port`` (IPv4, any address)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return fields
    raise AssertionError(f"nothing listens on port {port}")


def listening_tcp_inode(port: int) -> int:
    """The inode of the socket listening on ``port`` (IPv4, any address)."""
    return int(_listener(port)[9])


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on ``port`` (IPv4)."""
    return int(_listener(port)[4].split(":")[1], 16)  # rx_queue of a listener: its backlog


def open_fds() -> set[int]:
    """This process's open descriptors (less the one listdir used, closed once it returns)."""
    return set(fd_targets(os.getpid()))


def rss_bytes(pid: int) -> int:
    """The resident memory of ``pid``, from /proc."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
