"""Log lines that say which process wrote them: ``[primary 1234]`` or ``[worker 2 1240]``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from aiocluster._role import Role, identity

__all__ = ["Throttled", "ensure_logging", "role_tag", "set_level"]


def role_tag() -> str:
    """``primary 1234``, ``worker 2 1240`` or ``zygote 1236`` for this process."""
    me = identity()
    if me.role is Role.WORKER:
        return f"worker {me.worker_id} {os.getpid()}"
    return f"{me.role.value} {os.getpid()}"


class _RoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.role = role_tag()
        return super().format(record)


_level = logging.INFO
_handler: logging.Handler | None = None


def set_level(level: int | str) -> None:
    """The level :func:`ensure_logging` gives the root logger (``--log-level``): a number or
    a name in any case (``"warning"``)."""
    global _level
    _level = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if _handler is not None:
        logging.getLogger().setLevel(level)


def ensure_logging() -> None:
    """Send every logger's records to stderr, prefixed with the role, at :func:`set_level`'s
    level.

    aiocluster's own lines, aiohttp's access log and the application's loggers all reach the
    same output, unless the application configured logging itself (a handler on the root
    logger): then it keeps full control. Call it once the application is imported, so that a
    ``logging.basicConfig()`` it runs at import wins.
    """
    global _handler
    root = logging.getLogger()
    if _handler is not None or root.handlers:
        return
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(
        _RoleFormatter("%(asctime)s [%(role)s] %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(_handler)
    root.setLevel(_level)


class Throttled:
    """A warning that may repeat fast (one per bad connection): one line per ``interval``.

    The first occurrence is logged at once with its reason; those that follow within
    ``interval`` seconds are counted, and one line at the end of the interval gives their
    number and the last reason. A flood costs a line every ``interval``, not a line each.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval: float = 10.0,
        level: int = logging.WARNING,
    ) -> None:
        self._logger = logger
        self._what = what
        self._interval = interval
        self._level = level
        self._quiet_until = 0.0
        self._count = 0
        self._last = ""
        self._flush: asyncio.TimerHandle | None = None

    def note(self, reason: str) -> None:
        """One more occurrence, for ``reason``: logged now, or counted into the next line."""
        now = time.monotonic()
        if now >= self._quiet_until and not self._count:
            self._logger.log(self._level, "%s: %s", self._what, reason)
            self._quiet_until = now + self._interval
            return
        self._count += 1
        self._last = reason
        if now >= self._quiet_until:
            self._report()
        elif self._flush is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop to flush from: the next occurrence after the interval does
            self._flush = loop.call_later(self._quiet_until - now, self._report)

    def _report(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._count:
            return
        self._logger.log(
            self._level,
            "%s: %d more in the last %gs (the last: %s)",
            self._what,
            self._count,
            self._interval,
            self._last,
        )
        self._count = 0
        self._quiet_until = time.monotonic() + self._interval
