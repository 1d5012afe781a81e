"""The application's own Prometheus metrics and aiocluster's request metrics, merged over the
workers at the primary's ``/metrics``: summed counters that survive a worker's SIGKILL, gauges
per worker or combined, and bounds on what a worker may report."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import aiohttp
import pytest

from aiocluster.primary.metrics import MAX_RETIRED, MetricsStore
from aiocluster.wire.metricsform import Family

from .actions import HOSTILE, inject, kill_and_wait, live_workers
from .conftest import StartCluster
from .harness import ClusterProcess, cli
from .procfs import rss_bytes
from .test_operations import free_port, scrape

pytestmark = pytest.mark.timeout(60)

Metrics = dict[str, float]


async def scrape_until(
    s: aiohttp.ClientSession, url: str, done: Callable[[Metrics], bool], timeout: float = 10
) -> Metrics:
    """Scrape until ``done`` holds (reports travel with heartbeats, a few a second)."""
    found: Metrics = {}
    try:
        async with asyncio.timeout(timeout):
            while not done(found := await scrape(s, url)):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"never seen; last scrape: {found}") from None
    return found


async def start_metrics_app(
    start_cluster: StartCluster, workers: int
) -> tuple[ClusterProcess, str]:
    """tests/apps/metrics_app.py with ``workers`` workers and the admin endpoint (heartbeats,
    which carry the reports, every 0.25 s); the cluster and the admin endpoint's base URL."""
    admin = free_port()
    c = await start_cluster(
        *cli("run", "metrics_app:app", "-w", str(workers), "-b", "127.0.0.1:0"),
        *("--admin", f"127.0.0.1:{admin}", "--timeout", "1"),
    )
    return c, f"http://127.0.0.1:{admin}"


async def hit(s: aiohttp.ClientSession, url: str, n: int) -> set[int]:
    workers = set()
    for _ in range(n):
        async with s.get(f"{url}/hit") as r:
            assert r.status == 200
            workers.add((await r.json())["worker"])
    return workers


async def test_an_app_counter_is_exact_over_two_workers_and_a_sigkill(
    start_cluster: StartCluster,
) -> None:
    c, base = await start_metrics_app(start_cluster, 2)
    url = f"{base}/metrics"
    hits = "app_hits_total{path=hit}"
    # A new connection per request: the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        served_by = await hit(s, c.url, 40)
        assert served_by == {1, 2}, "both workers must have counted some"
        m = await scrape_until(s, url, lambda m: m.get(hits) == 40)
        assert m["app_work_seconds_count{}"] == 40
        assert m["app_work_seconds_bucket{le=0.1}"] == 40
        assert m["app_busy{}"] == 2  # summed: each worker set it to 1
        assert m["app_worker_number{slot=1,worker=1}"] == 1
        assert m["app_worker_number{slot=2,worker=2}"] == 2
        assert m["aiocluster_http_responses_total{code=2xx}"] == 40
        # The killed worker's count stays in the total; its gauges go with it.
        await kill_and_wait(c, 1)
        m = await scrape(s, url)
        assert m[hits] == 40
        assert "app_worker_number{slot=1,worker=1}" not in m
        assert m["app_work_seconds_count{}"] == 40
        assert m["aiocluster_http_request_duration_seconds_count{}"] == 40
        await hit(s, c.url, 10)
        m = await scrape_until(s, url, lambda m: m.get(hits) == 50)
        assert m["aiocluster_http_responses_total{code=2xx}"] == 50
    assert sorted(live_workers(c)) == [2, 3]


async def test_request_metrics_by_status_class_and_per_worker(start_cluster: StartCluster) -> None:
    c, base = await start_metrics_app(start_cluster, 1)
    url = f"{base}/metrics"
    async with aiohttp.ClientSession() as s:
        for path, status in (("/hit", 200), ("/fail", 503), ("/boom", 500), ("/nope", 404)):
            async with s.get(f"{c.url}{path}") as r:
                assert r.status == status
        m = await scrape_until(
            s, url, lambda m: m.get("aiocluster_http_request_duration_seconds_count{}") == 4
        )
    assert m["aiocluster_http_responses_total{code=2xx}"] == 1
    assert m["aiocluster_http_responses_total{code=4xx}"] == 1
    assert m["aiocluster_http_responses_total{code=5xx}"] == 2
    assert m["aiocluster_worker_http_responses_total{code=5xx,slot=1,worker=1}"] == 2
    per_worker = "aiocluster_worker_http_request_duration_seconds_bucket{le=+Inf,slot=1,worker=1}"
    assert m[per_worker] == 4
    assert m["aiocluster_http_requests_in_flight{slot=1,worker=1}"] == 0
    assert m["aiocluster_loop_lag_seconds_count{}"] >= 1


async def test_a_churning_worker_leaves_only_its_last_report(start_cluster: StartCluster) -> None:
    """A worker that reports ever new series, at the largest size allowed: the primary keeps
    its last report, not the union, so its memory stays bounded. (Its own reports, a few a
    second, replace the churn too.)"""
    admin = free_port()
    c = await start_cluster(*HOSTILE, env={"ADMIN": f"127.0.0.1:{admin}"})
    assert c.proc is not None
    before = rss_bytes(c.proc.pid)
    worker = await inject(c, "metrics-churn")
    await c.wait_for(rf"TEST primary got {{'after': 'metrics-churn'}} from worker={worker}")
    async with aiohttp.ClientSession() as s:
        m = await scrape(s, f"http://127.0.0.1:{admin}/metrics")
    churn = [key for key in m if key.startswith("churn_total")]
    assert len(churn) in (0, 9000)
    assert all(key.startswith("churn_total{id=14-") for key in churn)
    # 15 reports of 9000 series: far less than their union would take.
    assert rss_bytes(c.proc.pid) - before < 40 << 20
    assert "killing it" not in c.output
    os.kill(live_workers(c)[worker], signal.SIGKILL)
    await c.wait_for(rf"worker {worker} \(pid \d+\) was killed by SIGKILL")


def family(name: str, kind: str, samples: dict[str, tuple[str, float]], mode: str = "") -> Family:
    return Family(
        name,
        kind,
        "h",
        mode or ("sum" if kind == "counter" else "all"),
        {(sample, (("k", key),) if key else ()): v for key, (sample, v) in samples.items()},
    )


def test_exited_workers_counts_stay_bounded() -> None:
    store = MetricsStore()
    for worker in range(1, 13):
        samples = {f"{worker}-{i}": ("c_total", 1.0) for i in range(5000)}
        samples[""] = ("c_total", 2.0)
        store.report(worker, 1, {"c": family("c", "counter", samples)})
        store.retire(worker)
    assert store.retired_series == MAX_RETIRED
    (merged,) = store.collect()
    assert len(merged.samples) == MAX_RETIRED
    total = next(s.value for s in merged.samples if not s.labels)
    assert total == 24.0  # the series every worker had is exact


def test_gauge_modes_combine_live_workers_only() -> None:
    store = MetricsStore()
    for worker, value in ((1, 3.0), (2, 5.0)):
        store.report(
            worker,
            worker,
            {
                "g_sum": family("g_sum", "gauge", {"": ("g_sum", value)}, "sum"),
                "g_max": family("g_max", "gauge", {"": ("g_max", value)}, "max"),
                "g_min": family("g_min", "gauge", {"": ("g_min", value)}, "min"),
                "g": family("g", "gauge", {"": ("g", value)}),
            },
        )
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in store.collect()
        for s in m.samples
    }
    assert got[("g_sum", ())] == 8.0
    assert got[("g_max", ())] == 5.0
    assert got[("g_min", ())] == 3.0
    assert got[("g", (("slot", "2"), ("worker", "2")))] == 5.0
    store.retire(2)
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in store.collect()
        for s in m.samples
    }
    assert got[("g_sum", ())] == 3.0
    assert ("g", (("slot", "2"), ("worker", "2"))) not in got
