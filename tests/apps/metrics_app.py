"""An application with its own prometheus_client metrics (``aiocluster run metrics_app:app``).

``GET /hit`` counts one hit (a labelled Counter), observes a Histogram and sets two gauges: one
shown per worker, one summed over the workers (declared with ``aiocluster.metrics_registry``).
``GET /fail`` answers 503, ``GET /boom`` raises (a 500).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

import aiocluster

HITS = Counter("app_hits", "Hits served by the application.", ["path"])
WORK = Histogram("app_work_seconds", "Work done per hit.", buckets=(0.1, 1.0))
WORKER = Gauge("app_worker_number", "The worker's own id, per worker.")
BUSY = Gauge("app_busy", "Workers that served a hit, summed.")
aiocluster.metrics_registry(gauges={"app_busy": "livesum"})


async def hit(request: web.Request) -> web.Response:
    HITS.labels(path="hit").inc()
    WORK.observe(0.05)
    WORKER.set(aiocluster.worker_id() or 0)
    BUSY.set(1)
    return web.json_response({"worker": aiocluster.worker_id()})


async def fail(request: web.Request) -> web.Response:
    raise web.HTTPServiceUnavailable()


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("boom")


app = web.Application()
app.router.add_get("/hit", hit)
app.router.add_get("/fail", fail)
app.router.add_get("/boom", boom)
