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

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # real attributes for type checkers; imported on first use at run time
    from aiocluster import web as web
    from aiocluster._config import ClusterConfig as ClusterConfig
    from aiocluster._config import default_workers as default_workers
    from aiocluster._entry import run as run
    from aiocluster._entry import serve as serve
    from aiocluster._entry import supervise as supervise
    from aiocluster._errors import AioclusterError as AioclusterError
    from aiocluster._errors import ChannelClosed as ChannelClosed
    from aiocluster._errors import ClusterFailed as ClusterFailed
    from aiocluster._errors import ConfigError as ConfigError
    from aiocluster._errors import ListenRefused as ListenRefused
    from aiocluster._errors import NotInCluster as NotInCluster
    from aiocluster._errors import ProtocolError as ProtocolError
    from aiocluster.primary.cluster import Cluster as Cluster
    from aiocluster.primary.process import Worker as Worker
    from aiocluster.wire.address import Address as Address
    from aiocluster.worker.adopt import HandedServer as HandedServer
    from aiocluster.worker.link import is_primary as is_primary
    from aiocluster.worker.link import is_worker as is_worker
    from aiocluster.worker.link import messages as messages
    from aiocluster.worker.link import send as send
    from aiocluster.worker.link import worker_id as worker_id
    from aiocluster.worker.link import worker_slot as worker_slot
    from aiocluster.worker.metrics import metrics_registry as metrics_registry
    from aiocluster.worker.serve import create_server as create_server
    from aiocluster.worker.serve import until_stopped as until_stopped

__all__ = [
    "Address",
    "AioclusterError",
    "ChannelClosed",
    "Cluster",
    "ClusterConfig",
    "ClusterFailed",
    "ConfigError",
    "HandedServer",
    "ListenRefused",
    "NotInCluster",
    "ProtocolError",
    "Worker",
    "__version__",
    "create_server",
    "default_workers",
    "is_primary",
    "is_worker",
    "messages",
    "metrics_registry",
    "run",
    "send",
    "serve",
    "supervise",
    "until_stopped",
    "web",
    "worker_id",
    "worker_slot",
]


# Where each public name lives. Nothing is imported with the package itself: the command line
# forks its zygote before it loads the rest, a primary never loads aiohttp (``web``), and a
# protocol worker never loads what only aiohttp apps use.
_HOMES = {
    "Address": "wire.address",
    "AioclusterError": "_errors",
    "ChannelClosed": "_errors",
    "Cluster": "primary.cluster",
    "ClusterConfig": "_config",
    "ClusterFailed": "_errors",
    "ConfigError": "_errors",
    "HandedServer": "worker.adopt",
    "ListenRefused": "_errors",
    "NotInCluster": "_errors",
    "ProtocolError": "_errors",
    "Worker": "primary.process",
    "create_server": "worker.serve",
    "default_workers": "_config",
    "is_primary": "worker.link",
    "is_worker": "worker.link",
    "messages": "worker.link",
    "metrics_registry": "worker.metrics",
    "run": "_entry",
    "send": "worker.link",
    "serve": "_entry",
    "supervise": "_entry",
    "until_stopped": "worker.serve",
    "worker_id": "worker.link",
    "worker_slot": "worker.link",
}


def __getattr__(name: str) -> object:
    if name == "web":
        return importlib.import_module(".web", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
