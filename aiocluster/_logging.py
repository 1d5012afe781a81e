"""Log lines that say which process wrote them: ``[primary 1234]`` or ``[worker 2 1240]``."""

from __future__ import annotations

import logging
import os
import sys

from aiocluster._zygote import is_zygote

__all__ = ["ensure_logging", "role_tag"]


def role_tag() -> str:
    """``primary 1234``, ``worker 2 1240`` or ``zygote 1236`` for this process."""
    from aiocluster.worker.link import (
        worker_id,  # loaded by then; not at import, for the command line's sake
    )

    wid = worker_id()
    if wid is None and is_zygote():
        return f"zygote {os.getpid()}"
    return f"primary {os.getpid()}" if wid is None else f"worker {wid} {os.getpid()}"


class _RoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.role = role_tag()
        return super().format(record)


def ensure_logging(level: int | str = logging.INFO) -> None:
    """Give the ``aiocluster`` logger a stderr handler unless the application configured logging.

    ``level`` is a number or a name in any case (``"warning"``).

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
    logger.setLevel(level.upper() if isinstance(level, str) else level)
