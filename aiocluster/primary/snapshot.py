"""The cluster's status as plain data: what ``aiocluster status``, the control socket and the
admin endpoint (:mod:`aiocluster.ops`) show. Built from the cluster's public state only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiocluster.primary.cluster import Cluster
    from aiocluster.primary.process import WorkerProcess

__all__ = ["COUNTERS", "Totals", "snapshot"]

#: The per-worker counters whose cluster and slot totals never go backwards.
COUNTERS = ("requests", "accepted")


class Totals:
    """What workers that exited had counted, per slot: so totals keep it (monotonic)."""

    def __init__(self) -> None:
        self._retired: dict[int, dict[str, int]] = {}

    def retire(self, worker: WorkerProcess) -> None:
        """``worker`` exited: keep its last counts (what it served since its last report is
        not known, so it is not counted: totals stay monotonic, not exact)."""
        slot = self._retired.setdefault(worker.slot, dict.fromkeys(COUNTERS, 0))
        for key, value in _counts(worker).items():
            slot[key] += value

    def export(self) -> dict[int, dict[str, int]]:
        """What exited workers counted, per slot (for an in-place upgrade)."""
        return {slot: dict(counts) for slot, counts in self._retired.items()}

    def restore(self, retired: dict[int, dict[str, int]]) -> None:
        """After an in-place upgrade: the counts :meth:`export` gave."""
        for slot, counts in retired.items():
            self._retired[slot] = {key: int(counts.get(key, 0)) for key in COUNTERS}

    def by_slot(self, live: list[WorkerProcess]) -> dict[int, dict[str, int]]:
        """Every slot's totals: what its exited workers counted, plus its live ones."""
        slots = {slot: dict(counts) for slot, counts in self._retired.items()}
        for worker in live:
            slot = slots.setdefault(worker.slot, dict.fromkeys(COUNTERS, 0))
            for key, value in _counts(worker).items():
                slot[key] += value
        return dict(sorted(slots.items()))


def _counts(worker: WorkerProcess) -> dict[str, int]:
    return {"requests": int(worker.stats.get("requests", 0)), "accepted": worker.accepted}


def snapshot(cluster: Cluster, now: float) -> dict[str, Any]:
    """``cluster``'s status at loop time ``now``: its totals and one entry per live worker."""
    workers = sorted(cluster.workers.values(), key=lambda w: (w.slot, w.id))
    slots = cluster.totals.by_slot(workers)
    from aiocluster import __version__

    return {
        # The primary's code, when this image of it started, and when the primary first did.
        "version": __version__,
        "started": round(cluster.started, 3),
        "code_started": round(cluster.code_started, 3),
        "upgrades": cluster.upgrades,
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
        # Counters over the cluster's life: exited workers' counts stay in them.
        "totals": {key: sum(counts[key] for counts in slots.values()) for key in COUNTERS},
        "slots": [{"slot": slot, **counts} for slot, counts in slots.items()],
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
