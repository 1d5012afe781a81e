"""Log lines that say which process wrote them: ``[primary 1234]`` or ``[worker 2 1240]``."""

from __future__ import annotations

import logging
import os
import sys

from aiocluster._role import Role, identity

__all__ = ["ensure_logging", "role_tag"]


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


def ensure_logging(level: int = logging.INFO) -> None:
    """Give the ``aiocluster`` logger a stderr handler unless the application configured logging.

    An application that set up logging itself (a handler on the root logger) keeps full control.
    """
    logger = logging.getLogger("aiocluster")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RoleFormatter("%(asctime)s [%(role)s] %(levelname)s %(name)s: %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(level)
