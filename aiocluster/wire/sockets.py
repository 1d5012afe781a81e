"""Listening sockets: resolving an address, binding and listening, naming a socket.

The primary binds every socket a cluster serves; a process outside a cluster (``serve()`` run
without a primary, ``ClusterSite`` in a test) binds its own with the same code.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
from typing import Any, TypeAlias

from aiocluster.wire.address import Address

__all__ = [
    "ACCEPT_CLIENT_ERRORS",
    "AddrInfo",
    "format_sockname",
    "inherited_socket",
    "needs_resolver",
    "open_listener",
    "resolve",
    "resolve_async",
    "unresolvable",
]

#: ``accept()`` errors that are the client's: it went away between its handshake and the
#: accept (or a firewall rule refused it). Skip that connection and accept the next.
ACCEPT_CLIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO, errno.EPERM})


def inherited_socket(fd: int) -> socket.socket:
    """A socket object for ``fd``, a descriptor this process inherited across an ``execve``
    (the in-place upgrade's), made close-on-exec again like every socket of ours."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


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
            _host_arg(address.host), address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as err:
        raise unresolvable(address, err) from None
    return infos[0]


async def resolve_async(address: Address) -> AddrInfo:
    """:func:`resolve` without blocking the event loop (the resolver runs in a thread)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            _host_arg(address.host), address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
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
    if address.kind != "tcp" or not address.host or _ip_literal(address.host):
        return False
    try:
        address.host.encode("idna")
    except UnicodeError:
        return False  # the resolver refuses it at once: no wait, no thread needed
    return True


def _ip_literal(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        return True
    return False


def _host_arg(host: str) -> str | bytes:
    """``host`` as ``getaddrinfo`` should get it: an IP literal as ASCII bytes.

    A ``str`` host is IDNA-encoded first, and the codec's first use imports encodings.idna,
    stringprep and unicodedata (~2.5 ms), on the way to the first worker's first listen.
    """
    return host.encode("ascii") if host and _ip_literal(host) else host


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
