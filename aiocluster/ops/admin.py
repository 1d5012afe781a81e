"""The primary's admin endpoint: ``/healthz``, ``/readyz``, Prometheus ``/metrics``, and a live
dashboard at ``/`` (one page shipped in the package, polling ``/api/dashboard``).

Workers report their counters to the primary over the channel (heartbeats), so one scrape of
the primary sees the whole cluster: no shared files, no multiprocess directory. The exposition
format comes from ``prometheus_client``; the values are read from the cluster at scrape time.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterator
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aiocluster._errors import ConfigError
from aiocluster.ops.dashboard import Dashboard
from aiocluster.primary.cluster import Cluster
from aiocluster.wire.sockets import inherited_socket, open_listener

__all__ = ["AdminServer"]

log = logging.getLogger("aiocluster.admin")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ClusterCollector(Collector):
    """Turns :meth:`Cluster.status` into Prometheus metric families on every scrape."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        """Yield the cluster's metrics, per worker (labels worker, slot) and in total."""
        status = self._cluster.status()
        yield from _per_worker(status["workers"])
        yield from _per_slot(status["workers"], status["slots"])
        yield from _cluster_wide(status)


_LABELS = ["worker", "slot"]
#: Status key -> (family, name, help) of each per-worker sample.
_WORKER_SAMPLES: dict[str, tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str]] = {
    "requests": (
        CounterMetricFamily,
        "aiocluster_worker_requests",
        "Requests served by the worker.",
    ),
    "connections": (
        GaugeMetricFamily,
        "aiocluster_worker_open_connections",
        "Connections open on the worker.",
    ),
    "rss": (
        GaugeMetricFamily,
        "aiocluster_worker_resident_memory_bytes",
        "Worker resident memory.",
    ),
    "lag": (
        GaugeMetricFamily,
        "aiocluster_worker_event_loop_lag_seconds",
        "How late the worker's last heartbeat timer fired.",
    ),
    "uptime": (
        GaugeMetricFamily,
        "aiocluster_worker_uptime_seconds",
        "Seconds since the worker started.",
    ),
    "accepted": (
        CounterMetricFamily,
        "aiocluster_worker_accepted_connections",
        "Connections accepted by the worker (per scheduling policy).",
    ),
}


def _per_worker(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    families = {
        key: kind(name, doc, labels=_LABELS) for key, (kind, name, doc) in _WORKER_SAMPLES.items()
    }
    up = GaugeMetricFamily(
        "aiocluster_worker_up", "1 while the worker is listening.", labels=_LABELS
    )
    for worker in workers:
        values = [str(worker["id"]), str(worker["slot"])]
        for key, family in families.items():
            if key in worker:
                family.add_metric(values, float(worker[key]))
        up.add_metric(values, 1.0 if worker["state"] == "listening" else 0.0)
    yield from families.values()
    yield up


def _per_slot(workers: list[dict[str, Any]], slots: list[dict[str, Any]]) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "aiocluster_slot_restarts",
        "Workers restarted in the slot after a crash or hang.",
        labels=["slot"],
    )
    for slot, count in sorted({w["slot"]: w["restarts"] for w in workers}.items()):
        restarts.add_metric([str(slot)], float(count))
    requests = CounterMetricFamily(
        "aiocluster_slot_requests",
        "Requests served by the workers of the slot, exited ones included.",
        labels=["slot"],
    )
    accepted = CounterMetricFamily(
        "aiocluster_slot_accepted_connections",
        "Connections accepted by the workers of the slot, exited ones included.",
        labels=["slot"],
    )
    for slot in slots:
        requests.add_metric([str(slot["slot"])], float(slot["requests"]))
        accepted.add_metric([str(slot["slot"])], float(slot["accepted"]))
    yield restarts
    yield requests
    yield accepted


def _cluster_wide(status: dict[str, Any]) -> Iterator[Metric]:
    totals = status["totals"]
    yield GaugeMetricFamily("aiocluster_workers", "Workers the cluster keeps.", status["size"])
    yield GaugeMetricFamily(
        "aiocluster_workers_listening", "Workers listening now.", status["listening"]
    )
    yield CounterMetricFamily(
        "aiocluster_requests",
        "Requests served by every worker the cluster ran (exited ones included).",
        totals["requests"],
    )
    yield CounterMetricFamily(
        "aiocluster_accepted_connections",
        "Connections accepted by every worker the cluster ran (exited ones included).",
        totals["accepted"],
    )
    yield GaugeMetricFamily(
        "aiocluster_open_connections",
        "Connections open on all workers.",
        sum(w["connections"] for w in status["workers"]),
    )
    yield CounterMetricFamily(
        "aiocluster_restarts", "Workers restarted after a crash or hang.", status["restarts"]
    )
    yield CounterMetricFamily("aiocluster_reloads", "Rolling reloads completed.", status["reloads"])


class WorkersCollector(Collector):
    """The workers' own metrics (their applications' and their request metrics), merged."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        """Yield every family the workers reported, merged over them."""
        yield from self._cluster.metrics.collect()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class AdminServer:
    """A small aiohttp server in the primary's own loop."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ClusterCollector(cluster))
        self._registry.register(WorkersCollector(cluster))
        self._runner: web.AppRunner | None = None
        self._dashboard = Dashboard(cluster)
        self._page = resources.files("aiocluster.ops").joinpath("dashboard.html").read_bytes()
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/dashboard", self._dashboard_view)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._app = app
        self.url = ""
        self._sock: socket.socket | None = None

    def fileno(self) -> int | None:
        """The listening socket's descriptor (for an in-place upgrade); None before start."""
        return self._sock.fileno() if self._sock is not None else None

    async def start(self, fd: int | None = None) -> None:
        """Bind the configured admin address and serve (``fd``: serve that listening socket
        instead, inherited by an upgraded primary)."""
        address = self._cluster.config.admin
        assert address is not None
        if fd is not None:
            sock = inherited_socket(fd)
        else:
            try:
                sock, _ = open_listener(address, 128)
            except OSError as err:
                raise ConfigError(
                    f"cannot serve the admin endpoint on {address}: {err.strerror or err}"
                ) from None
        self._sock = sock
        self._runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = site.name
        self._dashboard.start()
        log.info("admin endpoint at %s (dashboard /, /healthz, /readyz, /metrics)", self.url)
        if fd is None and address.kind == "tcp" and not _is_loopback(address.host):
            log.warning(
                "the admin endpoint on %s has no authentication: anyone who can reach it reads "
                "the metrics; keep it on a private network or loopback",
                address,
            )

    async def aclose(self) -> None:
        """Stop serving."""
        await self._dashboard.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def _dashboard_view(self, request: web.Request) -> web.Response:
        return web.json_response(self._dashboard.view(), headers={"Cache-Control": "no-store"})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        status = self._cluster.status()
        text = f"{status['listening']}/{status['size']} workers listening\n"
        return web.Response(text=text, status=200 if status["ready"] else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
