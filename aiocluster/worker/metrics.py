"""A worker's metrics for the primary: its application's prometheus_client registry, and
aiocluster's own request and event-loop metrics.

The worker never serves ``/metrics`` itself: with ``--admin`` it reports what it counted to the
primary over its channel (:data:`~aiocluster.wire.metricsform.METRICS`, with a heartbeat, when
something changed), and one scrape of the primary shows the whole cluster. Requests are counted
here, in the worker, at the cost of a clock read and a few additions each: nothing travels per
request.
"""

from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from aiocluster._errors import ConfigError
from aiocluster.wire.metricsform import (
    DURATION,
    IN_FLIGHT,
    LAG,
    MAX_FAMILIES,
    MAX_REPORT_BYTES,
    MAX_SERIES,
    RESPONSES,
    SUMMED,
    gauge_mode,
)

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "LAG_BUCKETS",
    "LATENCY_BUCKETS",
    "Reporter",
    "RequestStats",
    "metrics_registry",
    "requests",
]

log = logging.getLogger("aiocluster.worker")

#: Request latency buckets, in seconds: from a cached answer to a slow report.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Event-loop lag buckets, in seconds: how late the worker's heartbeat timer fired.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Histogram:
    """Cumulative-on-export bucket counts: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def samples(self, name: str) -> list[list[Any]]:
        out: list[list[Any]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append([f"{name}_bucket", {"le": le}, running])
        out.append([f"{name}_count", {}, running])
        out.append([f"{name}_sum", {}, self.total])
        return out


class RequestStats:
    """What this worker's HTTP servers answered: latency, status classes, requests in flight."""

    def __init__(self) -> None:
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.lag = _Histogram(LAG_BUCKETS)
        #: Responses by status class: index 1..5 for 1xx..5xx (0: anything else).
        self.classes = [0] * 6
        self.in_flight = 0

    def begin(self) -> float:
        """A request starts: returns its start time for :meth:`end`."""
        self.in_flight += 1
        return time.perf_counter()

    def end(self, started: float, status: int) -> None:
        """The request that :meth:`begin` returned ``started`` for ended with ``status``.

        A websocket (101) is counted but not timed: its duration is the conversation's.
        """
        self.in_flight -= 1
        self.classes[status // 100 if 100 <= status < 600 else 0] += 1
        if status != 101:
            self.latency.observe(time.perf_counter() - started)

    def families(self) -> list[dict[str, Any]]:
        """The report's families for aiocluster's own metrics."""
        classes = [
            [f"{RESPONSES}_total", {"code": f"{i}xx" if i else "other"}, count]
            for i, count in enumerate(self.classes)
            if count
        ]
        in_flight = [[IN_FLIGHT, {}, self.in_flight]]
        return [
            _family(
                DURATION,
                "histogram",
                "HTTP request latency.",
                "each",
                self.latency.samples(DURATION),
            ),
            _family(RESPONSES, "counter", "HTTP responses by status class.", "each", classes),
            _family(IN_FLIGHT, "gauge", "HTTP requests being answered.", "all", in_flight),
            _family(
                LAG,
                "histogram",
                "How late the heartbeat timer fired.",
                "each",
                self.lag.samples(LAG),
            ),
        ]


def _family(name: str, kind: str, doc: str, mode: str, samples: list[list[Any]]) -> dict[str, Any]:
    return {"name": name, "type": kind, "help": doc, "mode": mode, "samples": samples}


_requests = RequestStats()


def requests() -> RequestStats:
    """This process's request counters (one per worker process)."""
    return _requests


class _Source:
    """The registry whose metrics the worker reports, and how its gauges combine."""

    def __init__(self) -> None:
        self.registry: CollectorRegistry | None = None
        self.gauges: dict[str, str] = {}


_source = _Source()


def metrics_registry(
    registry: CollectorRegistry | None = None, *, gauges: Mapping[str, str] | None = None
) -> None:
    """Report ``registry``'s metrics to the primary (default: prometheus_client's own registry,
    which is reported without this call), merged over the workers at the admin ``/metrics``.

    Counters, histograms and summaries are summed over the workers, exited ones included.
    Gauges are shown per worker (labels ``worker`` and ``slot``) unless ``gauges`` maps their
    name to ``"sum"``, ``"max"`` or ``"min"`` (prometheus_client's ``livesum``... spellings too).
    Call it in the worker (at import, or in the app factory); outside a cluster it does nothing
    but check its arguments.
    """
    modes: dict[str, str] = {}
    for name, mode in (gauges or {}).items():
        known = gauge_mode(mode)
        if known is None:
            raise ConfigError(
                f"gauge {name!r}: unknown mode {mode!r}; expected all, sum, max or min"
            )
        modes[name] = known
    _source.registry = registry
    _source.gauges = modes


def _registry() -> CollectorRegistry:
    if _source.registry is not None:
        return _source.registry
    from prometheus_client import REGISTRY

    return REGISTRY


def _app_families(skipped: Callable[[str], None]) -> Iterable[dict[str, Any]]:
    for metric in _registry().collect():
        if metric.name.startswith("aiocluster_"):
            skipped(f"{metric.name}: the aiocluster_ prefix is aiocluster's own")
            continue
        summed = metric.type in SUMMED
        samples = [
            [s.name, dict(s.labels), s.value]
            for s in metric.samples
            # A sample's creation time is this process's: summed over workers it means nothing.
            if not (summed and s.name.endswith("_created"))
            and s.value == s.value
            and abs(s.value) != float("inf")
        ]
        mode = "sum" if summed else _source.gauges.get(metric.name, "all")
        yield _family(metric.name, metric.type, metric.documentation, mode, samples)


class Reporter:
    """Builds the worker's ``metrics`` report within the bounds, and says what did not fit once."""

    def __init__(self) -> None:
        self._last: list[dict[str, Any]] | None = None
        self._said: set[str] = set()

    def _skip(self, why: str) -> None:
        if why not in self._said and len(self._said) < 100:
            self._said.add(why)
            log.warning("metrics not reported to the primary: %s", why)

    def report(self) -> list[dict[str, Any]] | None:
        """The families to send now, or None if nothing changed since the last report."""
        families = requests().families()
        try:
            app = list(_app_families(self._skip))
        except Exception as err:  # a custom collector of the app failed: report ours
            self._skip(f"collecting the registry failed ({type(err).__name__}: {err})")
            app = []
        size = sum(len(json.dumps(f)) for f in families)
        series = sum(len(f["samples"]) for f in families)
        names = {f["name"] for f in families}
        for family in app:
            cost = len(json.dumps(family))
            if family["name"] in names:
                self._skip(f"{family['name']}: reported twice")
            elif (
                len(families) >= MAX_FAMILIES
                or series + len(family["samples"]) > MAX_SERIES
                or size + cost > MAX_REPORT_BYTES
            ):
                self._skip(
                    f"{family['name']}: over the report's bounds ({MAX_FAMILIES} families, "
                    f"{MAX_SERIES} series, {MAX_REPORT_BYTES >> 10} KiB)"
                )
            else:
                families.append(family)
                names.add(family["name"])
                size += cost
                series += len(family["samples"])
        if families == self._last:
            return None
        self._last = families
        return families


def aiohttp_timing() -> Any:
    """An aiohttp middleware that counts each request in :func:`requests` (first in the chain,
    so that it times every other middleware too)."""
    from aiohttp import web

    stats = requests()

    @web.middleware
    async def timing(request: web.Request, handler: Any) -> web.StreamResponse:
        started = stats.begin()
        status = 500  # an exception that is not an HTTP one becomes a 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            stats.end(started, status)

    return timing


class _NotingStatus:
    """An ASGI ``send`` that notes the status of ``http.response.start`` on its way.

    A plain call returning ``send``'s awaitable, not a coroutine of its own: no frame more
    per message.
    """

    __slots__ = ("send", "status")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.status = 500  # what the request counts as if the app raises before answering

    def __call__(self, message: dict[str, Any]) -> Any:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
        return self.send(message)


def asgi_timing(app: Any, *, prepare: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """``app`` (ASGI 3), counting each HTTP request in :func:`requests`: its status is the one
    of ``http.response.start``, its time until the app returns. ``prepare`` is called first
    with each HTTP and websocket scope (the proxy headers: one layer for both, not two).
    """
    stats = requests()

    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            if prepare is not None:
                prepare(scope)
            noting = _NotingStatus(send)
            started = stats.begin()
            try:
                await app(scope, receive, noting)
            finally:
                stats.end(started, noting.status)
            return
        if kind == "websocket" and prepare is not None:
            prepare(scope)
        await app(scope, receive, send)

    return timed
