"""Log lines that say which process wrote them: ``[primary 1234]`` or ``[worker 2 1240]``."""

from __future__ import annotations

import logging
import os
import sys

from aiocluster._role import Role, identity

__all__ = ["ensure_logging", "role_tag", "set_level"]


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


def ensure_logging(level: int | str | None = None) -> None:
    """Send every logger's records to stderr, prefixed with the role, at the configured level.

    aiocluster's own lines, aiohttp's access log and the application's loggers all reach the
    same output, unless the application configured logging itself (a handler on the root
    logger): then it keeps full control. Call it once the application is imported, so that a
    ``logging.basicConfig()`` it runs at import wins.
    """
    global _handler
    if level is not None:
        set_level(level)
    root = logging.getLogger()
    if _handler is not None or root.handlers:
        return
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(
        _RoleFormatter("%(asctime)s [%(role)s] %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(_handler)
    root.setLevel(_level)
