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
    from . import web as web
    from ._address import Address as Address
    from ._adopt import HandedServer as HandedServer
    from ._child import Worker as Worker
    from ._config import ClusterConfig as ClusterConfig
    from ._config import default_workers as default_workers
    from ._errors import AioclusterError as AioclusterError
    from ._errors import ChannelClosed as ChannelClosed
    from ._errors import ConfigError as ConfigError
    from ._errors import NotInCluster as NotInCluster
    from ._errors import ProtocolError as ProtocolError
    from ._primary import Cluster as Cluster
    from ._primary import ClusterFailed as ClusterFailed
    from ._serve import create_server as create_server
    from ._serve import run as run
    from ._serve import serve as serve
    from ._serve import supervise as supervise
    from ._serve import until_stopped as until_stopped
    from ._worker import is_primary as is_primary
    from ._worker import is_worker as is_worker
    from ._worker import messages as messages
    from ._worker import send as send
    from ._worker import worker_id as worker_id
    from ._worker import worker_slot as worker_slot

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


# Where each public name lives. Nothing is imported with the package itself: the command line
# forks its zygote before it loads the rest, a primary never loads aiohttp (``web``), and a
# protocol worker never loads what only aiohttp apps use.
_HOMES = {
    "Address": "_address",
    "AioclusterError": "_errors",
    "ChannelClosed": "_errors",
    "Cluster": "_primary",
    "ClusterConfig": "_config",
    "ClusterFailed": "_primary",
    "ConfigError": "_errors",
    "HandedServer": "_adopt",
    "NotInCluster": "_errors",
    "ProtocolError": "_errors",
    "Worker": "_child",
    "create_server": "_serve",
    "default_workers": "_config",
    "is_primary": "_worker",
    "is_worker": "_worker",
    "messages": "_worker",
    "run": "_serve",
    "send": "_worker",
    "serve": "_serve",
    "supervise": "_serve",
    "until_stopped": "_serve",
    "worker_id": "_worker",
    "worker_slot": "_worker",
}


def __getattr__(name: str) -> object:
    if name == "web":
        return importlib.import_module(".web", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
