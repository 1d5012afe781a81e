"""The cluster's status as plain data: what ``aiocluster status``, the control socket and the
admin endpoint (:mod:`aiocluster.ops`) show. Built from the cluster's public state only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiocluster.primary.cluster import Cluster
    from aiocluster.primary.process import WorkerProcess

__all__ = ["snapshot"]


def snapshot(cluster: Cluster, now: float) -> dict[str, Any]:
    """``cluster``'s status at loop time ``now``: its totals and one entry per live worker."""
    workers = sorted(cluster.workers.values(), key=lambda w: (w.slot, w.id))
    return {
        "size": cluster.size,
        "listening": sum(1 for w in workers if w.state == "listening"),
        "ready": cluster.is_ready(),
        "stopping": cluster.stopping,
        "reloads": cluster.reloads,
        "restarts": sum(cluster.restarts.values()),
        "uptime": round(now - cluster.started_at, 3),
        "binds": [str(a) for a in cluster.binds],
        "start": cluster.starter.method,
        "zygote": cluster.starter.zygote_pid,
        "workers": [_worker(w, cluster.restarts[w.slot], now) for w in workers],
    }


def _worker(w: WorkerProcess, restarts: int, now: float) -> dict[str, Any]:
    return {
        "id": w.id,
        "slot": w.slot,
        "pid": w.pid,
        "state": w.state,
        "uptime": round(now - w.started_at, 3),
        "restarts": restarts,
        "requests": int(w.stats.get("requests", 0)),
        "connections": int(w.stats.get("connections", 0)),
        "rss": int(w.stats.get("rss", 0)),
        "lag": w.stats.get("lag", 0.0),
        "accepted": w.accepted,
        "listening": list(w.listening),
    }
