"""The admin endpoint's live dashboard: its JSON, and the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from aiocluster.ops.dashboard import quantile

from .browser import chromium, find_chromium
from .conftest import StartCluster
from .harness import cli
from .test_metrics import start_metrics_app
from .test_operations import command

pytestmark = pytest.mark.timeout(90)

CHROMIUM = find_chromium()


def test_quantiles_come_from_the_buckets_observed_between_two_samples() -> None:
    inf = float("inf")
    before = [(0.1, 10.0), (1.0, 10.0), (inf, 10.0)]
    now = [(0.1, 10.0), (1.0, 110.0), (inf, 110.0)]  # 100 more, all in (0.1, 1]
    assert quantile(0.5, before, now) == pytest.approx(0.55)
    assert quantile(0.99, before, now) == pytest.approx(0.991)
    assert quantile(0.5, now, now) is None
    assert quantile(0.5, [], [(0.1, 0.0), (inf, 4.0)]) == 0.1  # all above the last bound


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
async def test_the_dashboard_shows_each_worker_and_a_scale_up_live(
    start_cluster: StartCluster,
) -> None:
    assert CHROMIUM is not None
    c, base = await start_metrics_app(start_cluster, 2)
    async with aiohttp.ClientSession() as s:
        for _ in range(30):
            async with s.get(f"{c.url}/hit") as r:
                assert r.status == 200
        async with s.get(f"{base}/api/dashboard") as r:
            view = await r.json()
    assert [w["id"] for w in view["workers"]] == [1, 2]
    assert any("worker 1 started" in e["text"] for e in view["events"])
    async with chromium(CHROMIUM, f"{base}/") as page:
        rows = "document.querySelectorAll('#workers tr[data-worker]').length"
        assert await page.wait_for(f"{rows} === 2") is True
        await page.evaluate("window.loadedOnce = 'yes'")  # gone if the page reloads
        status, out = await command(c, "scale", "3")
        assert status == 0, out
        await page.wait_for(
            "document.querySelector('#workers tr[data-worker=\"3\"] td:nth-child(4)')"
            "?.textContent === 'listening'"
        )
        assert await page.evaluate(rows) == 3
        assert await page.evaluate("window.loadedOnce") == "yes"
        await page.wait_for(
            "[...document.querySelectorAll('#events li')].some(li => "
            "li.textContent.includes('scaled from 2 to 3 workers'))"
        )
        png = await page.screenshot()
    assert png.startswith(b"\x89PNG")
    if target := os.environ.get("AIOCLUSTER_SCREENSHOT"):
        await asyncio.to_thread(Path(target).write_bytes, png)


async def test_status_watch_redraws_the_table_until_ctrl_c(start_cluster: StartCluster) -> None:
    c = await start_cluster(*cli("run", "metrics_app:app", "-w", "2", "-b", "127.0.0.1:0"))
    proc = await asyncio.create_subprocess_exec(
        *cli("status", "--watch", "0.2"),
        env=c.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        tables = 0
        async with asyncio.timeout(20):
            while tables < 3:
                line = (await proc.stdout.readline()).decode()
                assert line, "the watch ended by itself"
                if line.startswith("cluster metrics_app"):
                    tables += 1
                elif tables >= 2 and line.lstrip().startswith("id "):
                    assert line.rstrip().endswith("req/s")  # from the second table on
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0
        assert "Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    status, out = await command(c, "status", "--watch", "0")
    assert status == 2
    assert "aiocluster: error: argument --watch: --watch takes seconds in 0.1..3600" in out
