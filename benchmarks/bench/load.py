"""Load and its context: wrk runs and their reports, pid probes, CPU sampling, a quiet machine.

wrk reports through ``wrk_report.lua`` (one ``BENCH_JSON`` line: requests, errors, latency
percentiles, and with BENCH_TALLY=1 the answers per X-Worker-Pid). Every wrk run is bounded by
``-d`` and by a timeout on top.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from .config import HOST, LUA, Settings
from .process import Running


def wrk_argv(
    port: int,
    mode: str,
    duration: float,
    settings: Settings,
    *,
    connections: int | None = None,
    threads: int | None = None,
) -> list[str]:
    """wrk's command line: ``settings``' threads and connections unless others are given."""
    return [
        "wrk",
        f"-t{threads or settings.wrk_threads}",
        f"-c{connections or settings.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA[mode]),
        f"http://{HOST}:{port}/",
    ]


def wrk_env(tally: bool) -> dict[str, str]:
    """wrk's environment: BENCH_TALLY=1 makes wrk_report.lua count answers per worker pid."""
    return {**os.environ, "BENCH_TALLY": "1" if tally else "0"}


def wrk_result(stdout: str, stderr: str, returncode: int) -> dict[str, Any]:
    """wrk's BENCH_JSON report (see wrk_report.lua), plus requests/s and error sums."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            break
    else:
        raise RuntimeError(f"wrk printed no report (exit {returncode}): {stderr.strip()}")
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds if seconds else 0.0
    errors = result["errors"]
    result["socket_errors"] = sum(errors[k] for k in ("connect", "read", "write", "timeout"))
    result["non_2xx"] = errors["status"]
    return result


def wrk(
    port: int,
    mode: str,
    duration: float,
    settings: Settings,
    *,
    tally: bool = False,
    connections: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One wrk run, bounded by -d (and a timeout on top)."""
    proc = subprocess.run(
        wrk_argv(port, mode, duration, settings, connections=connections, threads=threads),
        capture_output=True,
        text=True,
        env=wrk_env(tally),
        timeout=duration + 30,
        check=False,
    )
    return wrk_result(proc.stdout, proc.stderr, proc.returncode)


class BackgroundLoad:
    """Keep-alive wrk load for the length of a with-block, bounded by ``-d`` at ``bound``
    seconds. Leaving the block stops wrk with SIGINT, which makes it report: its report is
    then ``result`` (wrk_result's). On an error wrk is killed instead."""

    def __init__(self, port: int, bound: float, settings: Settings) -> None:
        self.argv = wrk_argv(port, "keepalive", bound, settings)
        self.result: dict[str, Any] = {}

    def __enter__(self) -> BackgroundLoad:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=wrk_env(False),
        )
        return self

    def running(self) -> bool:
        """Whether wrk still runs (it ends by itself at ``bound``)."""
        return self.proc.poll() is None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self.proc.send_signal(signal.SIGINT)
                stdout, stderr = self.proc.communicate(timeout=30)
                self.result = wrk_result(stdout, stderr, self.proc.returncode)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def balance(pids: dict[str, int]) -> dict[str, Any]:
    """Share of answers per worker pid, and min/max of those shares (1.0 = perfectly even)."""
    total = sum(pids.values())
    if not total:
        return {"shares": [], "min_over_max": None}
    shares = sorted((n / total for n in pids.values()), reverse=True)
    return {
        "shares": [round(s, 4) for s in shares],
        "min_over_max": round(shares[-1] / shares[0], 4),
        "answers": total,
    }


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> tuple[float, float, float]:
    """CPU seconds since boot, all CPUs, from /proc/stat: (not idle, of which in interrupts,
    of which stolen).

    Loopback TCP does much of its work in softirqs, which the kernel may account there rather
    than to the sending or receiving process; they are reported apart from "other". Steal is
    time the hypervisor gave this VM's CPUs to someone else while they had work: a busy host,
    invisible from inside but for this column; it is reported apart from "other" too.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / _CLK_TCK
    return busy, (irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def children_cpu_s() -> float:
    """CPU seconds of our reaped children (wrk, once it has exited)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Where the machine's CPU time went, to tell a measurement from a busy neighbour."""

    wall: float
    busy: float
    irq: float
    steal: float
    server: float
    children: float
    primary: float  # the primary's own share of ``server``

    @classmethod
    def take(cls, running: Running) -> CpuSample:
        busy, irq, steal = machine_busy_s()
        return cls(
            time.monotonic(),
            busy,
            irq,
            steal,
            running.cpu_s(),
            children_cpu_s(),
            running.primary_cpu_s(),
        )

    def per_request(self, end: CpuSample, requests: int) -> dict[str, float]:
        """CPU µs per answered request over the window: the primary's own (its accepts and
        hand-offs under rr, its heartbeats) and the rest of the server's (the workers, and an
        idle zygote). With a connection per request, that is per connection."""
        count = max(1, requests)
        primary = end.primary - self.primary
        return {
            "primary_us": round(primary / count * 1e6, 2),
            "workers_us": round((end.server - self.server - primary) / count * 1e6, 2),
        }

    def until(self, end: CpuSample) -> dict[str, float]:
        """Cores used over the window by the server, by wrk, by interrupts, by everything else,
        and stolen by the hypervisor."""
        wall = end.wall - self.wall
        server = (end.server - self.server) / wall
        wrk_cores = (end.children - self.children) / wall
        busy = (end.busy - self.busy) / wall
        irq = (end.irq - self.irq) / wall
        steal = (end.steal - self.steal) / wall
        return {
            "server_cores": round(server, 3),
            "wrk_cores": round(wrk_cores, 3),
            "irq_cores": round(irq, 3),
            "other_cores": round(max(0.0, busy - server - wrk_cores - irq - steal), 3),
            "steal_cores": round(steal, 3),
        }


QUIET_WINDOW = 0.3  # seconds: 60 ticks of 2 cores at 100 Hz, enough to see 0.2 busy cores


def wait_quiet(settings: Settings) -> dict[str, float]:
    """Wait (up to settings.quiet_wait) until the machine is idle besides us, before a run.

    This machine may be shared (other sessions run test suites on it): a load run measured
    while something else takes a core says little. Samples busy cores over 0.3 s windows,
    with the server idle, until they drop under settings.quiet_cores; returns what was seen.
    """
    began = time.monotonic()
    busy = 0.0
    while True:
        start_busy, _, start_steal = machine_busy_s()
        start = time.monotonic()
        time.sleep(QUIET_WINDOW)
        end_busy, _, end_steal = machine_busy_s()
        wall = time.monotonic() - start
        busy = (end_busy - start_busy) / wall  # steal included: a busy host counts too
        waited = time.monotonic() - began
        if busy < settings.quiet_cores or waited >= settings.quiet_wait:
            return {
                "idle_busy_cores": round(busy, 3),
                "idle_steal_cores": round((end_steal - start_steal) / wall, 3),
                "waited_s": round(waited, 1),
            }


def listen_overflows() -> int:
    """The machine's count of connections dropped at a full accept queue so far (TcpExt
    ListenOverflows in /proc/net/netstat): machine-wide, so a delta counts every server's."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names and names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return 0


# -- the file limit ---------------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to the hard one; (soft, hard) after.

    wrk and the servers inherit it: a burst of 10,000 connections needs as many descriptors
    in wrk and, spread over the workers, in the server.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- which worker answers ---------------------------------------------------------------------


_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
_PID = re.compile(rb"^x-worker-pid:\s*(\d+)", re.I | re.M)
_STATUS = re.compile(rb"HTTP/1\.[01] 200 ")


@dataclasses.dataclass(frozen=True)
class Answer:
    """One probe: when it ended (time.monotonic()) and the worker pid that answered 200, or
    None if it failed (refused, reset, timed out, not a 200)."""

    at: float
    pid: int | None


class PidWatch:
    """Requests on new connections, from ``clients`` loops at once, in a thread of its own;
    every answer's X-Worker-Pid kept with its time, for the measures of events to read.

    Each loop sends a request, reads the answer's head, closes, pauses ``pause`` seconds (5 ms
    after a failure: a server not listening yet is polled, not hammered: the probes share the
    cores with the server being timed) and goes again, until the watch is left. A new
    connection per request lets any worker take the next one, so the pids seen are the
    workers that accept.
    """

    def __init__(
        self, port: int, *, clients: int = 4, pause: float = 0.002, timeout: float = 2.0
    ) -> None:
        self.port, self.clients, self.pause, self.timeout = port, clients, pause, timeout
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pid-watch", daemon=True)

    def __enter__(self) -> PidWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)

    def answers(self, since: float = 0.0) -> list[Answer]:
        """The answers that ended at or after ``since``, in order."""
        with self._lock:
            return [a for a in self._answers if a.at >= since]

    def _run(self) -> None:
        asyncio.run(self._loops())

    async def _loops(self) -> None:
        await asyncio.gather(*(self._loop() for _ in range(self.clients)))

    async def _loop(self) -> None:
        while not self._stop.is_set():
            pid = await self._probe()
            with self._lock:
                self._answers.append(Answer(time.monotonic(), pid))
            await asyncio.sleep(self.pause if pid is not None else 0.005)

    async def _probe(self) -> int | None:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(_REQUEST)
                    head = await reader.readuntil(b"\r\n\r\n")
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        found = _PID.search(head)
        return int(found.group(1)) if found and _STATUS.match(head) else None


def wait_until(
    check: Callable[[], float | None], deadline: float, poll: float = 0.01
) -> float | None:
    """Poll ``check`` until it returns a figure (not None) or ``deadline`` passes."""
    while True:
        found = check()
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(poll)


def distinct_after(
    answers: list[Answer], start: float, count: int, exclude: Collection[int] = ()
) -> float | None:
    """Seconds from ``start`` until ``count`` distinct pids (none in ``exclude``) had answered."""
    seen: set[int] = set()
    for answer in answers:
        if answer.at >= start and answer.pid is not None and answer.pid not in exclude:
            seen.add(answer.pid)
            if len(seen) >= count:
                return answer.at - start
    return None
