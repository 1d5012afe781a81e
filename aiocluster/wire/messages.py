"""Names shared by both ends of the channel: message acts, and field checks (pure).

The environment variables that tell a process its role are in :mod:`aiocluster._role`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aiocluster._errors import AppErrorReport, ProtocolError

__all__ = [
    "APP_ERROR",
    "BUSY",
    "CLOSE",
    "DISCONNECT",
    "HEARTBEAT",
    "LATE",
    "LISTENING",
    "LOAD",
    "MAX_ERROR_LINE",
    "MAX_TRACEBACK",
    "MESSAGE",
    "NEWCONN",
    "ONLINE",
    "QUERY_SERVER",
    "UPGRADED",
    "ZYGOTE_FORK",
    "ZYGOTE_READY",
    "ZYGOTE_UNABLE",
    "app_error_report",
    "optional_number",
    "require",
]

# worker -> primary
ONLINE = "online"  # request; the reply carries the primary's settings (policy...)
# request; the reply carries errno, sockname, the handle id, and the socket's fd, or under
# policy rr no fd and "accept": "primary"
QUERY_SERVER = "queryServer"
# address, and the handle id now served; "more": true while the worker is still starting the
# other listens it serves (it counts as listening, for readiness and reloads, after the last)
LISTENING = "listening"
CLOSE = "close"  # address, and the handle id no longer served
LOAD = "load"  # counters: accepted (in all), open (adopted, still open), adopted
HEARTBEAT = "heartbeat"  # from the worker's event loop: lag, requests, connections, rss
# worker or zygote -> primary, once, just before it exits with status 4: the application
# cannot be loaded. error (one line), traceback (text, may be empty); the primary says it once
APP_ERROR = "appError"
# both ways
MESSAGE = "message"
# primary -> worker
DISCONNECT = "disconnect"
# the primary re-executed itself with new code (same pid, same channel): "version" (the new
# aiocluster version), "upgrades" (how many so far). Nothing changes for the worker.
UPGRADED = "upgraded"
# request with 1..MAX_FDS fds, connections the primary accepted for the listen "handle" (a
# worker's share of one burst). The worker replies once: {"accepted": true} once it owns them
# all, false for none (stopping, or no server for them), or a list of bools, one per fd in order.
# "until" (time.monotonic(), one clock for every process): a frame read later is refused with
# "why": LATE, since the primary has handed those connections to another worker by then.
NEWCONN = "newconn"
# Why a worker refused a newconn frame while it still serves the listen (``why``): it is out
# of descriptors (the frame came truncated), or it read the frame after its ``until``.
BUSY = "busy"
LATE = "late"

# The zygote's channel (start method fork, see _zygote.py). zygote -> primary, once: it loaded
# the program and forks on request (pid), or it cannot fork safely here (why).
ZYGOTE_READY = "zygoteReady"
ZYGOTE_UNABLE = "zygoteUnable"
# primary -> zygote: request with one fd, the new worker's channel end, and its id and slot;
# the reply carries the worker's pid, or errno and error
ZYGOTE_FORK = "fork"

#: The longest ``appError`` texts the primary keeps (a line; a traceback).
MAX_ERROR_LINE = 4096
MAX_TRACEBACK = 65536

T = TypeVar("T")


def require(msg: dict[str, Any], key: str, kind: type[T]) -> T:
    """``msg[key]`` if it is a ``kind`` (bools are not ints here), else :class:`ProtocolError`."""
    value = msg.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(
            f"{msg.get('act')!r}: field {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


# Numbers the primary reads from a worker (counts, bytes, seconds) fit in 63 bits.
_NUMBER_LIMIT = 2**63


def optional_number(msg: dict[str, Any], key: str) -> float | None:
    """``msg[key]`` as a float if present, None if absent; :class:`ProtocolError` if it is not a
    number in ``0..2**63`` (a string, a bool, a negative or a huge value)."""
    if key not in msg:
        return None
    value = msg[key]
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= _NUMBER_LIMIT
    ):
        raise ProtocolError(
            f"{msg.get('act')!r}: field {key!r} must be a number in 0..2**63, got {value!r:.40}"
        )
    return float(value)


def app_error_report(msg: dict[str, Any]) -> AppErrorReport:
    """The report an ``appError`` frame carries, its texts cut to their bounds."""
    error = require(msg, "error", str)
    trace = msg.get("traceback", "")
    if not isinstance(trace, str):
        raise ProtocolError(
            f"'appError': field 'traceback' must be str, not {type(trace).__name__}"
        )
    return AppErrorReport(error[:MAX_ERROR_LINE], trace[-MAX_TRACEBACK:])
