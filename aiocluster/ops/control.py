"""The control socket: ``aiocluster status|reload|scale|stop`` talking to a running primary.

A Unix stream socket in a private directory (0700, the socket 0600), and on top of the file
permissions a peer-credential check: only the user who runs the cluster may control it. One
request frame, one reply frame, in the channel's own framing (``_codec``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiocluster._config import NAME_CHARS
from aiocluster._errors import AioclusterError, ConfigError, ProtocolError
from aiocluster._logging import Throttled
from aiocluster._process import Account
from aiocluster.wire.codec import HEADER, Decoder, Message, encode
from aiocluster.wire.sockets import inherited_socket

__all__ = ["ControlServer", "answer", "call", "control_path", "running_clusters"]

log = logging.getLogger("aiocluster.control")

#: ``handler(request, connection_fd)``: the answer to a request. ``connection_fd`` is the
#: client's connection (still the server's; an upgrade duplicates it to answer from its new
#: image).
Handler = Callable[[Message, int], Awaitable[dict[str, Any]]]

_MAX_REQUEST = 64 * 1024


class ControlError(AioclusterError):
    """The control socket cannot be used: no cluster is running, or it is not yours."""


def control_path(name: str = "default", path: str | None = None, *, uid: int | None = None) -> Path:
    """Where the control socket of cluster ``name`` lives, for this user (or for ``uid``).

    ``$XDG_RUNTIME_DIR/aiocluster/NAME.sock`` (a per-user directory systemd makes), else
    ``$TMPDIR/aiocluster-UID/NAME.sock``. An explicit ``path`` wins. For another ``uid`` (a
    primary whose workers run as ``--user``): where that user's own ``aiocluster status``
    looks, ``/run/user/UID/aiocluster`` if systemd made that directory for them, else the
    temporary directory's ``aiocluster-UID``.
    """
    if path:
        return Path(path)
    if not name or not set(name) <= NAME_CHARS:
        raise ConfigError(f"cluster name {name!r} may use only letters, digits, '.', '_', '-'")
    return _control_dir(uid) / f"{name}.sock"


def _control_dir(uid: int | None = None) -> Path:
    if uid is not None and uid != os.getuid():
        systemd_dir = Path(f"/run/user/{uid}")
        with contextlib.suppress(OSError):
            if systemd_dir.stat().st_uid == uid:
                return systemd_dir / "aiocluster"
        return Path(tempfile.gettempdir()) / f"aiocluster-{uid}"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "aiocluster"
    return Path(tempfile.gettempdir()) / f"aiocluster-{os.getuid()}"


def running_clusters() -> dict[str, Path]:
    """The clusters of this user that are running: name -> control socket, by name.

    Those whose control socket is in the per-user directory (not ``--control PATH``) and
    answers; a socket file left by a killed primary does not count.
    """
    directory = _control_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return {}
    found = {}
    for entry in names:
        path = directory / entry
        if entry.endswith(".sock") and _is_alive(path):
            found[entry.removesuffix(".sock")] = path
    return found


def _private_dir(directory: Path, owner: Account | None = None) -> None:
    """Create ``directory`` 0700 (``owner``'s, if given), or check that an existing one is
    its owner's and private."""
    # The primary's own directory will do too (its user chose a --control path there).
    allowed = {os.getuid()} | ({owner.uid} if owner is not None else set())
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
        if owner is not None:
            os.chown(directory, owner.uid, owner.gid)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"control directory {directory} is not a directory")
    if st.st_uid not in allowed:
        whose = "to you" if owner is None else f"to you or {owner.name}"
        raise ConfigError(f"control directory {directory} belongs to uid {st.st_uid}, not {whose}")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"control directory {directory} is open to others (mode {stat.S_IMODE(st.st_mode):o});"
            " make it 0700 or remove it"
        )


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, where the OS says."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return int(uid)
    if sys.platform == "darwin":  # LOCAL_PEERCRED: struct xucred {u_int version; uid_t uid; ...}
        sol_local, local_peercred = 0, 0x001
        creds = sock.getsockopt(sol_local, local_peercred, 76)
        return int(struct.unpack_from("=II", creds)[1])
    return None


class ControlServer:
    """The primary's control socket; ``handler`` answers each request.

    With ``owner`` (the ``--user`` the workers run as), the directory and the socket are that
    user's, and the user may control the cluster as well as the primary's own.
    """

    def __init__(self, path: Path, handler: Handler, owner: Account | None = None) -> None:
        self.path = path
        self._handler = handler
        self._owner = owner
        self._allowed = {os.getuid()} | ({owner.uid} if owner is not None else set())
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._sock: socket.socket | None = None  # the listening socket, for an upgrade
        # One line per 10 s, with a count, however many clients connect and say nothing.
        self._bad = Throttled(log, "bad control request")

    def handover(self) -> tuple[int, int] | None:
        """The listening socket's descriptor and the file's inode (an in-place upgrade)."""
        if self._server is None or self._inode is None or self._sock is None:
            return None
        return self._sock.fileno(), self._inode

    async def adopt(self, fd: int, inode: int | None) -> None:
        """Serve the listening socket an upgraded primary's old image handed over."""
        sock = inherited_socket(fd)
        sock.setblocking(False)
        self._inode = inode
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        self._sock = sock

    async def start(self) -> None:
        """Create the directory and socket; fail if another cluster uses this name."""
        try:
            await self._bind()
        except OSError as err:
            raise ConfigError(
                f"cannot create the control socket {self.path}: {err.strerror or err} "
                "(--control PATH picks another, --control off none)"
            ) from None
        log.info("control socket at %s", self.path)

    async def _bind(self) -> None:
        _private_dir(self.path.parent, self._owner)
        if self.path.exists() or self.path.is_symlink():
            if _is_alive(self.path):
                raise ConfigError(
                    f"a cluster is already running with control socket {self.path}; "
                    "give this one another --name"
                )
            self.path.unlink()  # left by a primary that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask covers the window between bind and chmod: the file never exists 0777.
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            if self._owner is not None:
                os.chown(self.path, self._owner.uid, self._owner.gid)
            self._inode = os.stat(self.path).st_ino
            sock.listen(16)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
            self._sock = sock
        except BaseException:
            sock.close()
            raise

    async def aclose(self) -> None:
        """Stop listening and remove the socket file (only if it is still ours)."""
        if self._server is not None:
            self._server.close()
            self._server = None
            self._sock = None
        if self._inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()
            self._inode = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if uid is not None and uid not in self._allowed:
                log.warning("control connection from uid %d refused", uid)
                await _reply(writer, {"ok": False, "error": "permission denied"})
                return
            try:
                async with asyncio.timeout(10):
                    request = await _read_frame(reader)
            except asyncio.IncompleteReadError as err:
                if err.partial:
                    self._bad.note(_why_bad(err))
                else:
                    # Connected and closed without a byte: how `aiocluster status` (and a second
                    # cluster of this name) check that this one is alive. Not a bad request.
                    log.debug("control connection closed without a request (a liveness probe)")
                return
            except (ProtocolError, TimeoutError) as err:
                self._bad.note(_why_bad(err))
                return
            try:
                result = await self._handler(request, sock.fileno() if sock is not None else -1)
                reply: dict[str, Any] = {"ok": True, **result}
            except (AioclusterError, ValueError) as err:
                reply = {"ok": False, "error": str(err)}
            except Exception as err:
                log.exception("control command %r failed", request.get("act"))
                reply = {"ok": False, "error": f"internal error: {err}"}
            await _reply(writer, reply)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def answer(fd: int, reply: dict[str, Any]) -> None:
    """Answer the control connection ``fd`` (ours to close) with one reply frame, blocking
    for at most 2 s: how an upgraded primary's new image answers ``aiocluster upgrade``."""
    with socket.socket(fileno=fd) as sock:
        sock.settimeout(2.0)
        with contextlib.suppress(OSError):
            sock.sendall(encode({"act": "reply", **reply}))


def _why_bad(err: Exception) -> str:
    """What went wrong with a control request, in words (a TimeoutError has none of its own)."""
    if isinstance(err, TimeoutError):
        return "no complete request within 10s"
    if isinstance(err, asyncio.IncompleteReadError):
        if not err.partial:
            return "the client closed the connection without sending a request"
        return (
            f"the client closed the connection {len(err.partial)} bytes into a "
            f"{err.expected}-byte read"
        )
    return str(err) or type(err).__name__


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(encode({"act": "reply", **reply}))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> Message:
    decoder = Decoder(max_frame=_MAX_REQUEST, max_fds=0)
    header = await reader.readexactly(HEADER.size)
    frames = decoder.feed(header)
    if not frames:
        length = HEADER.unpack(header)[0]
        frames = decoder.feed(await reader.readexactly(length))
    return frames[0].msg


def _is_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def call(path: Path, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one command to the primary listening on ``path``; return its reply.

    Raises :class:`ControlError` with a message an operator can act on.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlError(
                f"no cluster is running here: {path} does not exist (check --name/--control, "
                "and that you are the user who started it)"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(f"no cluster is running: nobody listens on {path}") from None
        except PermissionError:
            owner = _owner(path)
            raise ControlError(
                f"permission denied on {path}: the cluster belongs to uid {owner}, you are "
                f"uid {os.getuid()}"
            ) from None
        sock.sendall(encode(request))
        decoder = Decoder(max_fds=0)
        while True:
            data = sock.recv(65536)
            if not data:
                raise ControlError("the primary closed the control connection without answering")
            frames = decoder.feed(data)
            if frames:
                reply = frames[0].msg
                if not reply.get("ok"):
                    raise ControlError(str(reply.get("error", "the command failed")))
                return reply
    except TimeoutError:
        raise ControlError(f"the primary did not answer within {timeout:g}s") from None
    except ProtocolError as err:
        raise ControlError(f"unreadable answer from the primary: {err}") from None
    except OSError as err:
        if err.errno == errno.ECONNRESET:
            raise ControlError("the primary closed the control connection") from None
        raise
    finally:
        sock.close()


def _owner(path: Path) -> str:
    for candidate in (path, path.parent):
        with contextlib.suppress(OSError):
            return str(os.stat(candidate).st_uid)
    return "unknown"
