"""aiocluster: Node.js's cluster model for asyncio.

One primary process owns the listening sockets and supervises N worker processes running the
same program; workers receive the sockets over a private Unix channel (SCM_RIGHTS) and serve.

    import aiocluster
    from aiohttp import web

    app = web.Application()
    ...
    if __name__ == "__main__":
        aiocluster.run(app, port=8080, workers=4)
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from ._address import Address
from ._child import Worker
from ._config import ClusterConfig, default_workers
from ._errors import (
    AioclusterError,
    ChannelClosed,
    ConfigError,
    NotInCluster,
    ProtocolError,
)
from ._primary import Cluster, ClusterFailed
from ._serve import create_server, run, serve, supervise, until_stopped
from ._worker import is_primary, is_worker, messages, send, worker_id, worker_slot

if TYPE_CHECKING:  # real attributes for type checkers; imported on first use at run time
    from . import web as web
    from ._adopt import HandedServer as HandedServer

__all__ = [
    "Address",
    "AioclusterError",
    "ChannelClosed",
    "Cluster",
    "ClusterConfig",
    "ClusterFailed",
    "ConfigError",
    "HandedServer",
    "NotInCluster",
    "ProtocolError",
    "Worker",
    "__version__",
    "create_server",
    "default_workers",
    "is_primary",
    "is_worker",
    "messages",
    "run",
    "send",
    "serve",
    "supervise",
    "until_stopped",
    "web",
    "worker_id",
    "worker_slot",
]


def __getattr__(name: str) -> object:
    # aiohttp is imported only by those who use it: ``aiocluster.web`` on first access, so a
    # primary (which never serves) and protocol workers start without it.
    if name == "web":
        import importlib

        return importlib.import_module(".web", __name__)
    if name == "HandedServer":
        from ._adopt import HandedServer

        return HandedServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
