"""Process titles, so that ``ps`` and ``top`` tell the processes of a cluster apart.

``aiocluster primary [NAME]``, ``aiocluster zygote [NAME]``, ``aiocluster worker 3 slot 1
[NAME]``: set with the ``setproctitle`` package (``pip install 'aiocluster[setproctitle]'``).
Without it, titles are simply not set: every process keeps its command line.
"""

from __future__ import annotations

import contextlib

__all__ = ["primary_title", "set_title", "worker_title", "zygote_title"]


def set_title(title: str) -> None:
    """Set this process's title, if ``setproctitle`` is installed."""
    try:
        import setproctitle
    except ImportError:
        return
    with contextlib.suppress(Exception):  # a title is a courtesy: never fail for one
        setproctitle.setproctitle(title)


def primary_title(name: str) -> str:
    """The primary's title."""
    return f"aiocluster primary [{name}]"


def zygote_title(name: str) -> str:
    """The zygote's title."""
    return f"aiocluster zygote [{name}]"


def worker_title(worker_id: int, slot: int | None, name: str) -> str:
    """A worker's title: its id, its slot, the cluster's name."""
    where = f" slot {slot}" if slot is not None else ""
    return f"aiocluster worker {worker_id}{where} [{name}]"
