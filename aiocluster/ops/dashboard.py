"""What the admin endpoint's live dashboard (``/``) polls (``/api/dashboard``): each worker's
requests a second and latency quantiles over the last seconds, a few minutes of the cluster's
history, and its recent events.

A sample a second, from what the workers already report (their heartbeats and their request
latency histogram): nothing more travels for the dashboard, and nothing runs without ``--admin``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from aiocluster.primary.cluster import Cluster
from aiocluster.primary.process import WorkerProcess
from aiocluster.wire.metricsform import DURATION

__all__ = ["HISTORY", "WINDOW", "Dashboard", "quantile"]

#: Seconds of the cluster's history the chart shows; seconds a worker's rates are taken over.
HISTORY = 300
WINDOW = 10
#: Recent events kept.
EVENTS = 50

Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), +Inf last


def quantile(q: float, before: Buckets, now: Buckets) -> float | None:
    """The ``q`` quantile of what was observed between two cumulative histograms (linear within
    a bucket, as Prometheus's ``histogram_quantile``); None if nothing was."""
    counts = [
        (bound, count - (before[i][1] if i < len(before) else 0.0))
        for i, (bound, count) in enumerate(now)
    ]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower  # past the last bound: its lower edge is all that is known
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def _buckets(cluster: Cluster, worker: int) -> Buckets:
    report = cluster.metrics.last(worker)
    family = report.families.get(DURATION) if report else None
    if family is None:
        return []
    found = [
        (float(dict(labels)["le"]), value)
        for (sample, labels), value in family.samples.items()
        if sample.endswith("_bucket")
    ]
    return sorted(found)


class Dashboard:
    """Samples the cluster once a second while the admin endpoint serves."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._samples: dict[int, collections.deque[tuple[float, float, Buckets]]] = {}
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        self._size = cluster.size
        self._reloads = cluster.reloads
        self._task: asyncio.Task[None] | None = None
        cluster.on("fork", lambda w: self._note(f"worker {w.id} started (slot {w.slot})"))
        cluster.on(
            "listening", lambda w, a: self._note(f"worker {w.id} (pid {w.pid}) listening on {a}")
        )
        cluster.on("exit", self._exited)

    def start(self) -> None:
        """Sample once a second from now on."""
        self._task = asyncio.ensure_future(self._run())

    async def aclose(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _note(self, text: str) -> None:
        self._events.append({"time": time.time(), "text": text})

    def _exited(self, worker: WorkerProcess, code: int) -> None:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        self._note(f"worker {worker.id} (pid {worker.pid}) {how}")
        self._samples.pop(worker.id, None)

    async def _run(self) -> None:
        while True:
            self.sample(asyncio.get_running_loop().time())
            await asyncio.sleep(1.0)

    def sample(self, now: float) -> None:
        """Take one sample of every live worker, and one point of the cluster's history."""
        cluster = self._cluster
        if cluster.size != self._size:
            self._note(f"scaled from {self._size} to {cluster.size} workers")
            self._size = cluster.size
        if cluster.reloads != self._reloads:
            self._note(f"rolling reload {cluster.reloads} complete")
            self._reloads = cluster.reloads
        for worker in cluster.workers.values():
            ring = self._samples.setdefault(worker.id, collections.deque(maxlen=WINDOW + 1))
            ring.append((now, worker.stats.get("requests", 0.0), _buckets(cluster, worker.id)))
        rates = [self._rates(w) for w in cluster.workers]
        first = [self._samples[w][0][2] for w in cluster.workers if w in self._samples]
        last = [self._samples[w][-1][2] for w in cluster.workers if w in self._samples]
        before, latest = _merge(first), _merge(last)
        self._history.append(
            {
                "time": time.time(),
                "rps": round(sum(r["rps"] for r in rates), 2),
                "p50": quantile(0.5, before, latest),
                "p99": quantile(0.99, before, latest),
            }
        )

    def _rates(self, worker: int) -> dict[str, Any]:
        ring = self._samples.get(worker)
        if not ring or len(ring) < 2:
            return {"rps": 0.0, "p50": None, "p99": None}
        (t0, r0, b0), (t1, r1, b1) = ring[0], ring[-1]
        return {
            "rps": round(max(0.0, r1 - r0) / (t1 - t0), 2) if t1 > t0 else 0.0,
            "p50": quantile(0.5, b0, b1),
            "p99": quantile(0.99, b0, b1),
        }

    def view(self) -> dict[str, Any]:
        """What the page shows: the status, each worker's rates, the history, the events."""
        status = self._cluster.status()
        for worker in status["workers"]:
            worker.update(self._rates(worker["id"]))
        status["history"] = list(self._history)
        status["events"] = list(self._events)[::-1]
        status["name"] = self._cluster.config.name
        return status


def _merge(histograms: list[Buckets]) -> Buckets:
    """Histograms with the same bounds, added up (the workers' share one set of buckets)."""
    merged: dict[float, float] = {}
    for buckets in histograms:
        for bound, count in buckets:
            merged[bound] = merged.get(bound, 0.0) + count
    return sorted(merged.items())
