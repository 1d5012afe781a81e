"""Fault runs by hand: how a cluster serves while its workers are killed, stopped or starved.

Every run starts its own cluster of ``tests/apps/webapp.py`` on 127.0.0.1, drives a bounded
load at it with aiohttp's client and prints one line of figures. Nothing here is a test: the
tests assert the behaviour; these scripts measure it (issue 15's targets).

    python benchmarks/faults.py kills --policy shared --seconds 20      # SIGKILL a worker a second
    python benchmarks/faults.py kills --policy rr --close               # connection per request
    python benchmarks/faults.py sigstop --policy rr                     # one worker stopped 10 s
    python benchmarks/faults.py fds --policy rr                         # workers at 256 open files
    python benchmarks/faults.py slow --clients 500                      # slow clients at a stop
    python benchmarks/faults.py rss --kills 300                         # primary RSS over kills
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"


class Cluster:
    """An ``aiocluster run webapp:app`` on a free loopback port, with its own control socket."""

    def __init__(self, workers: int, policy: str, extra: list[str]) -> None:
        self.workers, self.policy, self.extra = workers, policy, extra
        self.dir = Path(tempfile.mkdtemp(prefix="aiocluster-faults-"))
        self.control = self.dir / "control.sock"
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def __aenter__(self) -> Cluster:
        argv = [sys.executable, "-m", "aiocluster", "run", "webapp:app", "-w", str(self.workers)]
        argv += ["-b", "127.0.0.1:0", "--policy", self.policy, "--control", str(self.control)]
        argv += ["--log-level", "warning", *self.extra]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, cwd=APPS, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
        )
        asyncio.get_running_loop().create_task(self._read())
        async with asyncio.timeout(30):
            while True:
                status = await self.status()
                if status and status["ready"]:
                    break
                await asyncio.sleep(0.05)
        workers = status["workers"]
        assert isinstance(workers, list)
        self.port = int(workers[0]["listening"][0].rsplit(":", 1)[1])  # the real port
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())

    async def status(self) -> dict[str, object] | None:
        """The primary's status over its control socket (None until it answers)."""
        from aiocluster.ops.control import ControlError, call

        try:
            reply = await asyncio.to_thread(call, self.control, {"act": "status"}, 5.0)
        except ControlError:
            return None
        status: dict[str, object] = reply["status"]
        return status

    def pids(self, status: dict[str, object]) -> list[int]:
        workers = status["workers"]
        assert isinstance(workers, list)
        return [int(w["pid"]) for w in workers if w["state"] == "listening" and w["pid"]]

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(40):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Load:
    """``connections`` clients sending back to back until stopped; latencies and failures."""

    def __init__(self, url: str, connections: int, *, close: bool) -> None:
        self.url, self.connections, self.close = url, connections, close
        self.latencies: list[float] = []
        self.failed = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=self.close)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.connections)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                async with session.get(self.url) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                self.latencies.append(time.monotonic() - began)
            else:
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()

    def p99_ms(self) -> float:
        if len(self.latencies) < 100:
            return float("nan")
        return statistics.quantiles(self.latencies, n=100)[98] * 1000


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[Load]:
    task = asyncio.create_task(load.run())
    try:
        yield load
    finally:
        load.stop()
        await task


async def kills(args: argparse.Namespace) -> None:
    """SIGKILL a random listening worker every second; sample how many listen every 20 ms."""
    async with Cluster(args.workers, args.policy, []) as c:
        load = Load(f"http://127.0.0.1:{c.port}/", args.connections, close=args.close)
        samples: list[int] = []
        killed = 0
        rng = random.Random(args.seed)
        async with running(load):
            end = time.monotonic() + args.seconds
            next_kill = time.monotonic() + 1
            while time.monotonic() < end:
                status = await c.status()
                if status is not None:
                    samples.append(int(str(status["listening"])))
                    if time.monotonic() >= next_kill and (pids := c.pids(status)):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(rng.choice(pids), signal.SIGKILL)
                            killed += 1
                        next_kill += 1
                await asyncio.sleep(0.02)
        some = sum(1 for n in samples if n >= 1) / len(samples) * 100
        full = sum(1 for n in samples if n >= args.workers) / len(samples) * 100
        print(
            f"kills policy={args.policy} {'close' if args.close else 'keep-alive'} "
            f"workers={args.workers} connections={args.connections} seconds={args.seconds}: "
            f"{killed} kills, some worker listening {some:.1f}% of {len(samples)} samples, "
            f"all {full:.1f}%, served {len(load.latencies)}, failed {load.failed} "
            f"({load.failed / max(killed, 1):.2f} per kill), p99 {load.p99_ms():.1f} ms"
        )


async def sigstop(args: argparse.Namespace) -> None:
    """SIGSTOP one worker for 10 s; fresh connections (probes) meanwhile, one every 100 ms."""
    async with Cluster(args.workers, args.policy, ["-t", "0"]) as c:
        status = await c.status()
        assert status is not None
        victim = c.pids(status)[0]
        os.kill(victim, signal.SIGSTOP)
        probes = failed = 0
        try:
            connector = aiohttp.TCPConnector(force_close=True)
            timeout = aiohttp.ClientTimeout(total=3)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
                end = time.monotonic() + 10
                while time.monotonic() < end:
                    probes += 1
                    try:
                        async with s.get(f"http://127.0.0.1:{c.port}/") as r:
                            failed += r.status != 200
                    except (aiohttp.ClientError, TimeoutError):
                        failed += 1
                    await asyncio.sleep(0.1)
        finally:
            os.kill(victim, signal.SIGCONT)
        print(f"sigstop policy={args.policy}: {probes} probes over 10 s, {failed} failed")


async def fds(args: argparse.Namespace) -> None:
    """Workers at 256 open files and 1,000 concurrent connections for 10 s; deaths, recovery."""
    async with Cluster(args.workers, args.policy, []) as c:
        status = await c.status()
        assert status is not None
        for pid in c.pids(status):
            limit = await asyncio.create_subprocess_exec(
                "prlimit", f"--pid={pid}", "--nofile=256:256"
            )
            await limit.wait()
        load = Load(f"http://127.0.0.1:{c.port}/", 1000, close=False)
        async with running(load):
            await asyncio.sleep(10)
        flood_failed = load.failed
        began = time.monotonic()
        after = Load(f"http://127.0.0.1:{c.port}/", 8, close=False)
        async with running(after):
            await asyncio.sleep(3)
        status = await c.status()
        assert status is not None
        deaths = sum(1 for line in c.lines if "exited" in line or "killed by" in line)
        print(
            f"fds policy={args.policy}: flood served {len(load.latencies)}, failed {flood_failed}; "
            f"worker exits logged {deaths}; then 3 s of 8 clients: served {len(after.latencies)}, "
            f"failed {after.failed}, p99 {after.p99_ms():.1f} ms, listening "
            f"{status['listening']}/{args.workers} ({time.monotonic() - began:.1f} s after)"
        )


async def rss(args: argparse.Namespace) -> None:
    """Kill a worker ``--kills`` times, one after another; the primary's RSS every 25 kills."""
    async with Cluster(args.workers, args.policy, []) as c:
        assert c.proc is not None
        curve: list[str] = []
        for n in range(args.kills + 1):
            status = await c.status()
            while status is None or int(str(status["listening"])) < args.workers:
                await asyncio.sleep(0.01)  # the replacement is on its way
                status = await c.status()
            if n % 25 == 0:
                curve.append(f"{n}:{_rss_kib(c.proc.pid)}")
            if n < args.kills:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(c.pids(status)[0], signal.SIGKILL)
                await asyncio.sleep(0.05)
        print(f"rss policy={args.policy}: primary RSS KiB after N kills: {' '.join(curve)}")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def slow(args: argparse.Namespace) -> None:
    """``clients`` connections sending one header byte a second, then SIGTERM: stop time."""
    async with Cluster(args.workers, args.policy, ["--graceful-timeout", "20"]) as c:
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

        async def client() -> None:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", c.port)
                for byte in request:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1)
                writer.close()

        tasks = [asyncio.create_task(client()) for _ in range(args.clients)]
        await asyncio.sleep(3)
        assert c.proc is not None
        began = time.monotonic()
        c.proc.send_signal(signal.SIGTERM)
        await c.proc.wait()
        took = time.monotonic() - began
        for task in tasks:
            task.cancel()
        print(f"slow policy={args.policy}: {args.clients} slow clients; the stop took {took:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("run", choices=["kills", "sigstop", "fds", "slow", "rss"])
    parser.add_argument("--policy", default="shared", choices=["shared", "rr", "reuseport"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--close", action="store_true", help="a connection per request")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=300)
    args = parser.parse_args()
    runs = {"kills": kills, "sigstop": sigstop, "fds": fds, "slow": slow, "rss": rss}
    asyncio.run(runs[args.run](args))


if __name__ == "__main__":
    main()
