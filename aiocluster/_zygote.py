"""The zygote: a fresh interpreter that loads the application once, then forks the workers.

Under start method ``fork`` the primary starts one zygote: the same program, with
``AIOCLUSTER_ZYGOTE_FD`` in its environment. It runs the program as a worker would, up to
``aiocluster.run()`` (``aiocluster run APP`` imports APP first), so the application and
everything it imports are loaded. There, before any event loop has run and while it has a
single thread, it stops and serves the primary's ``fork`` requests. A worker forked from that
state inherits no running loop, no thread and nothing of the primary, and shares the zygote's
loaded pages copy-on-write instead of importing everything again.

Each fork is double: the zygote forks a short-lived intermediate that forks the worker and
exits at once, so the worker is re-parented to the primary (a child subreaper while a fork is
in flight, see :mod:`aiocluster.primary.starter`), which then waits for it like for any child. The
zygote itself never has a child for longer than that.

This module runs in the zygote without an event loop: plain blocking calls on one socket.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
from typing import NoReturn

from aiocluster._errors import ProtocolError
from aiocluster._process import own_process_group
from aiocluster._role import Role, become_zygote, identity, resuming, role
from aiocluster.wire import messages as proto
from aiocluster.wire.codec import Decoder, Frame, encode
from aiocluster.wire.fds import ancillary_space, close_fds, received_fds

__all__ = [
    "fork_problem",
    "is_zygote",
    "pause_collector",
    "prefork_zygote",
    "refuse",
    "serve_forks",
    "take_preforked",
]


# The collector's thresholds before pause_collector(), to restore (None: not paused).
_paused_thresholds: tuple[int, int, int] | None = None


def pause_collector() -> None:
    """In the zygote, before it loads the application: no automatic garbage collection until
    :func:`serve_forks` has frozen what was loaded; then the thresholds are as they were.

    Everything imported now lives as long as the process, and the zygote forks before it could
    be garbage: collections during the imports only cost time (~10 ms of CPU for aiohttp's),
    and the zygote's load is the longest step between ``exec`` and the first answer. A zero
    first threshold pauses collection without touching ``gc.isenabled()``, so that a program
    that calls ``gc.disable()`` or ``gc.set_threshold()`` at import keeps its choice.
    """
    global _paused_thresholds
    thresholds = gc.get_threshold()
    if role() is Role.ZYGOTE and _paused_thresholds is None and thresholds[0] > 0:
        _paused_thresholds = thresholds
        gc.set_threshold(0, *thresholds[1:])


def _resume_collector() -> None:
    global _paused_thresholds
    if _paused_thresholds is not None and gc.get_threshold()[0] == 0:
        gc.set_threshold(*_paused_thresholds)  # the program set none of its own meanwhile
    _paused_thresholds = None


def is_zygote() -> bool:
    """True in the zygote process (it turns into a worker in each child it forks)."""
    return role() is Role.ZYGOTE


def _channel_fd() -> int:
    fd = identity().channel_fd
    assert role() is Role.ZYGOTE and fd is not None
    return fd


def fork_problem() -> str | None:
    """Why this process cannot safely fork workers now, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "start method 'fork' needs Linux"
    if _running_loop():
        return "an event loop is running (aiocluster.serve() awaited in the program's own loop)"
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if threads:
        return f"the program started threads before aiocluster.run(): {', '.join(threads)}"
    return None


def _running_loop() -> bool:
    asyncio = sys.modules.get("asyncio")  # not loaded yet: then no loop runs either
    return asyncio is not None and asyncio._get_running_loop() is not None


def refuse(why: str) -> NoReturn:
    """In the zygote: tell the primary that forking is not possible here, and exit."""
    sock = socket.socket(fileno=_channel_fd())
    sock.setblocking(True)
    with contextlib.suppress(OSError):  # the primary is gone: it needs no answer
        sock.sendall(encode({"act": proto.ZYGOTE_UNABLE, "why": why}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve_forks() -> tuple[int, int, int]:
    """In the zygote: fork a worker for each request; return only in a worker.

    Returns ``(worker_id, slot, channel_fd)`` in the forked worker. The zygote itself exits
    when the primary closes the channel (or dies).
    """
    problem = fork_problem()
    if problem is not None:
        refuse(problem)
    sock = socket.socket(fileno=_channel_fd())
    sock.setblocking(True)
    # Objects loaded so far stay out of the collector's reach: a collection in a worker would
    # otherwise write to (and so copy) every page that holds one of them.
    gc.freeze()
    _resume_collector()  # before the first fork: workers collect as any process does
    _send(sock, {"act": proto.ZYGOTE_READY, "pid": os.getpid()})
    decoder = Decoder(max_fds=1)
    ancsize = ancillary_space(4)
    while True:
        try:
            data, ancdata, _flags, _ = sock.recvmsg(65536, ancsize, socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        except OSError:
            os._exit(0)
        fds = received_fds(ancdata)
        if not data:
            close_fds(fds)
            os._exit(0)
        try:
            frames = decoder.feed(data, fds)
        except ProtocolError:
            os._exit(1)  # the primary never sends garbage: something else holds this socket
        for i, frame in enumerate(frames):
            became = _fork(sock, frame)
            if became is not None:
                # In the new worker: nothing of the zygote's may stay open here. Other
                # workers' channel ends above all, or the primary would never see them close.
                for later in frames[i + 1 :]:
                    close_fds(later.fds)
                close_fds(decoder.close())
                sock.close()
                return became


def _fork(sock: socket.socket, frame: Frame) -> tuple[int, int, int] | None:
    msg = frame.msg
    worker_id, slot = msg.get("id"), msg.get("slot")
    if (
        msg.get("act") != proto.ZYGOTE_FORK
        or len(frame.fds) != 1
        or not isinstance(worker_id, int)
        or not isinstance(slot, int)
    ):
        close_fds(frame.fds)
        _reply(sock, frame, {"errno": 22, "error": "bad fork request"})
        return None
    fd = frame.fds[0]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        read_end, write_end = os.pipe()
    except OSError as err:
        close_fds([fd])
        _reply(sock, frame, {"errno": err.errno or 0, "error": str(err)})
        return None
    try:
        middle = os.fork()
    except OSError as err:
        close_fds([fd, read_end, write_end])
        _reply(sock, frame, {"errno": err.errno or 0, "error": str(err)})
        return None
    if middle == 0:
        try:
            os.close(read_end)
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                own_process_group()  # as a spawned worker: Ctrl-C reaches the primary only
                return worker_id, slot, fd
            os.write(write_end, str(worker).encode())
        except BaseException:
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    answer = _worker_pid(read_end, middle, fd)
    if not answer.isdigit():
        _reply(sock, frame, {"errno": 11, "error": "fork failed in the intermediate process"})
        return None
    _reply(sock, frame, {"pid": int(answer)})
    return None


def _worker_pid(read_end: int, middle: int, fd: int) -> bytes:
    """What the intermediate ``middle`` wrote on ``read_end``: the worker's pid, or nothing.

    Reaps the intermediate and closes the zygote's copy of the worker's channel end ``fd``.
    """
    try:
        answer = b""
        while chunk := os.read(read_end, 32):
            answer += chunk
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)
        close_fds([fd])
    return answer


def _reply(sock: socket.socket, request: Frame, msg: dict[str, object]) -> None:
    _send(sock, {**msg, "act": request.msg.get("act", proto.ZYGOTE_FORK), "ack": _seq(request)})


def _seq(frame: Frame) -> int:
    seq = frame.msg.get("seq", 0)
    return seq if isinstance(seq, int) else 0


def _send(sock: socket.socket, msg: dict[str, object]) -> None:
    try:
        sock.sendall(encode(msg))
    except OSError:
        os._exit(0)  # the primary is gone; so is the reason to exist


_preforked: tuple[int, socket.socket] | None = None


def prefork_zygote() -> bool:
    """In the primary, before its event loop runs: fork the zygote from this process.

    Returns True in the zygote, False in the primary. The zygote forked here starts with what
    the primary has loaded (the application too, when the program is a script) instead of a
    new interpreter; the command line calls this before it loads the rest of aiocluster, so
    the primary's own start-up and the zygote's loading of the application overlap. Nothing is
    forked where forking is unsafe (see :func:`fork_problem`), or if a zygote was forked
    already: the cluster then spawns one.
    """
    global _preforked
    if _preforked is not None or resuming() or fork_problem() is not None:
        # Resuming an in-place upgrade: the zygote of the old image carries on.
        return False
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent.close()
        own_process_group()  # as a spawned process: Ctrl-C reaches the primary only
        become_zygote(child.detach())
        pause_collector()
        return True
    child.close()
    _preforked = (pid, parent)
    return False


def take_preforked() -> tuple[int, socket.socket] | None:
    """The zygote :func:`prefork_zygote` forked (its pid and channel), once; else None."""
    global _preforked
    taken, _preforked = _preforked, None
    return taken
