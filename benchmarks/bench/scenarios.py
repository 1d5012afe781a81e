"""The measures of events, each selectable with ``--measure``:

- ``burst``: thousands of connections opened at once (``wrk -t2 -c5000 --timeout 5s``, then
  10,000 where the file limit allows), keep-alive or a connection per request: req/s,
  timeouts, socket errors, p50/p99, the primary's CPU per request, accept-queue overflows;
- ``replace``: SIGKILL one worker of a serving server; time until a new worker answers, and
  until N distinct pids answer again;
- ``reload-time``: time from the reload signal until every answering pid is new and every old
  worker has exited, at 8 workers, with the failed requests of a keep-alive load meanwhile;
  one reload per fresh start, in rounds;
- ``startup-growth``: time from exec to N distinct pids answering, for N = 1, 2, 8, 32.

Which worker answered comes from the X-Worker-Pid header every app sends, read by a
``PidWatch`` (requests on new connections, a few at a time, in a thread of its own). Each
measure runs its rows one after the other in one invocation, so that their figures are
comparable within the run (burst and reload-time in rounds, each a fresh start of every
row, the order reversed every other round); ``ROWS`` names the rows each measure runs unless
``--only`` says.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config import Context, Settings, say
from .load import (
    Answer,
    BackgroundLoad,
    CpuSample,
    PidWatch,
    distinct_after,
    listen_overflows,
    wait_quiet,
    wait_until,
    wrk,
)
from .process import Running, free_port, http_status, is_running, started
from .servers import Server

#: The rows the burst and replace measures share: aiocluster under each policy and its peers.
_PEERS = (
    "aiocluster-aiohttp",
    "aiocluster-aiohttp-rr",
    "aiocluster-aiohttp-reuseport",
    "gunicorn-aiohttp",
    "aiocluster-asgi",
    "uvicorn-asgi",
    "gunicorn-asgi",
    "granian-asgi",
    "node-cluster",
    "node-cluster-rr",
)

#: The rows each measure runs by default (``--only`` replaces them): the issue's peers.
ROWS: dict[str, tuple[str, ...]] = {
    "burst": (*_PEERS, "nginx"),
    "replace": _PEERS,
    "reload-time": (
        "aiocluster-aiohttp",
        "gunicorn-aiohttp",
        "aiocluster-asgi",
        "uvicorn-asgi",
        "gunicorn-asgi",
        "granian-asgi",
        "node-cluster",
    ),
    "startup-growth": (
        "aiocluster-aiohttp",
        "aiocluster-aiohttp-spawn",
        "gunicorn-aiohttp",
        "uvicorn-asgi",
        "granian-asgi",
        "node-cluster",
    ),
}

READY_DEADLINE = 60.0  # seconds for a server to have N distinct pids answering
REPLACE_DEADLINE = 15.0  # seconds for a killed worker's successor to answer
RELOAD_DEADLINE = 90.0  # seconds for a reload of 8 workers to complete
RELOAD_LEAD = 1.0  # seconds of load before the reload signal, and after the reload
KILL_SETTLE = 1.0  # seconds between one replacement and the next kill
#: Descriptors kept free besides a burst's connections (wrk's own, the runner's).
FD_MARGIN = 1024
#: Memory a start of N workers is allowed: N times this (a spawned aiohttp worker is ~30 MiB
#: PSS, ~60 MiB RSS; twice that as headroom), plus GROWTH_SPARE_MIB for everything else.
GROWTH_MIB_PER_WORKER = 128
GROWTH_SPARE_MIB = 1024


@contextlib.contextmanager
def serving(
    server: Server, workers: int, logs: Path, tag: str, *, stop_timeout: float = 15.0
) -> Iterator[Running]:
    """``server`` started with ``workers`` workers on a free port, answering, its workers up."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        ctx = Context(port=free_port(), workers=workers, tmp=Path(tmp))
        log_path = logs / f"{server.name}.{tag}.log"
        with started(server, ctx, log_path, stop_timeout=stop_timeout) as running:
            running.wait_first_answer(time.monotonic() + READY_DEADLINE)
            running.wait_workers(time.monotonic() + READY_DEADLINE)
            yield running


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return round(statistics.median(found), 4) if found else None


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def _answer_pids(answers: list[Answer]) -> set[int]:
    return {a.pid for a in answers if a.pid is not None}


def _wait_serving(watch: PidWatch, since: float, count: int, deadline: float) -> float:
    """Seconds from ``since`` until ``count`` distinct pids answered; RuntimeError if never."""
    found = wait_until(lambda: distinct_after(watch.answers(since), since, count), deadline)
    if found is None:
        seen = len(_answer_pids(watch.answers(since)))
        raise RuntimeError(f"{seen} of {count} workers answered before the deadline")
    return found


def _row(server: Server) -> dict[str, Any]:
    return {"name": server.name, "family": server.family, "describe": server.describe}


def _each(
    servers: list[Server], what: str, measure: Callable[[Server], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``measure`` of every server, one after the other; an error is kept in its row."""
    rows = []
    for server in servers:
        say(f"{what}: {server.name}")
        try:
            rows.append(measure(server))
            if "skipped" in rows[-1]:
                say(f"  skipped: {rows[-1]['skipped']}")
        except Exception as err:
            rows.append({**_row(server), "error": f"{err}"})
            say(f"  error: {err}")
    return rows


def _rounds(
    servers: list[Server],
    rounds: int,
    what: str,
    once: Callable[[Server, int], list[dict[str, Any]]],
    key: str,
    skip: Callable[[Server], str | None] = lambda server: None,
) -> list[dict[str, Any]]:
    """``rounds`` rounds over ``servers``, in their order reversed every other round (no row
    always runs first, and the machine's drift weighs on the rows of a round alike); each
    round ``once(server, number)`` starts the server afresh. Its results go to the row's
    ``key`` list, each marked with its round; an error is kept and the rounds go on."""
    rows = {s.name: _row(s) for s in servers}
    for server in servers:
        why = skip(server)
        if why:
            rows[server.name]["skipped"] = why
        else:
            rows[server.name][key] = []
    for number in range(rounds):
        for server in servers if number % 2 == 0 else servers[::-1]:
            row = rows[server.name]
            if "skipped" in row:
                if number == 0:
                    say(f"{what}: {server.name} skipped: {row['skipped']}")
                continue
            say(f"{what} (round {number + 1}/{rounds}): {server.name}")
            try:
                row[key] += [{"round": number + 1, **found} for found in once(server, number)]
            except Exception as err:
                row.setdefault("errors", []).append(f"round {number + 1}: {err}")
                say(f"  error: {err}")
    for row in rows.values():
        if row.get("errors") and not row.get(key):
            row["error"] = "; ".join(row["errors"])  # nothing measured at all
    return list(rows.values())


# -- burst ------------------------------------------------------------------------------------


def burst_sizes(settings: Settings, fd_limit: int) -> tuple[list[int], list[str]]:
    """The burst sizes this file limit allows, and a note for each one it does not."""
    sizes, notes = [], []
    for size in settings.burst_connections:
        if size + FD_MARGIN <= fd_limit:
            sizes.append(size)
        else:
            notes.append(f"burst of {size:,} skipped: the open-file limit is {fd_limit:,}")
    return sizes, notes


def burst(
    servers: list[Server], settings: Settings, logs: Path, sizes: list[int]
) -> list[dict[str, Any]]:
    """``burst_rounds`` rounds over the servers; in each, every server is started once and
    loaded by a burst of each size in turn (wrk opens them all at once)."""

    def once(server: Server, number: int) -> list[dict[str, Any]]:
        runs = []
        with serving(server, settings.workers, logs, f"burst{number + 1}") as running:
            for size in sizes:
                runs.append(_burst_run(running, settings, size))
        # aiocluster's primary logs how many connections each worker took as it stops (rr).
        spread = re.findall(r"connections per worker: (.*)", running.log_tail(lines=50))
        for run in runs:
            run["spread"] = spread[-1] if spread else None
        return runs

    return _rounds(servers, settings.burst_rounds, "burst", once, "runs")


def _burst_run(running: Running, settings: Settings, size: int) -> dict[str, Any]:
    """One burst of ``size`` connections at once against a serving server."""
    quiet = wait_quiet(settings)
    before, overflows = CpuSample.take(running), listen_overflows()
    result = wrk(
        running.ctx.port,
        settings.burst_mode,
        settings.burst_duration,
        settings,
        connections=size,
        threads=settings.burst_threads,
    )
    after, overflows = CpuSample.take(running), listen_overflows() - overflows
    errors = result["errors"]
    run = {
        "connections": size,
        "mode": settings.burst_mode,
        "rps": round(result["rps"], 1),
        "requests": result["requests"],
        "timeouts": errors["timeout"],
        # Connect, read and write errors; timeouts are counted apart.
        "socket_errors": errors["connect"] + errors["read"] + errors["write"],
        "non_2xx": result["non_2xx"],
        "errors": errors,
        "p50_ms": result["latency_us"]["p50"] / 1000,
        "p90_ms": result["latency_us"]["p90"] / 1000,
        "p99_ms": result["latency_us"]["p99"] / 1000,
        "max_ms": result["latency_us"]["max"] / 1000,
        "cpu": before.until(after),
        "cpu_us_per_request": before.per_request(after, result["requests"]),
        "listen_overflows": overflows,
        "before": quiet,
        "still_answers": http_status(running.ctx.port, timeout=5.0) == 200,
    }
    say(
        f"  {size:>6,} connections ({settings.burst_mode}): {run['rps']:>9,.0f} req/s  "
        f"timeouts {run['timeouts']}  socket errors {run['socket_errors']}  p50 "
        f"{run['p50_ms']:.1f} ms  p99 {run['p99_ms']:.1f} ms  primary "
        f"{run['cpu_us_per_request']['primary_us']:.1f} us/request  accept-queue overflows "
        f"{overflows} (machine-wide)"
    )
    return run


# -- replacement after SIGKILL ----------------------------------------------------------------


def replace(servers: list[Server], settings: Settings, logs: Path) -> list[dict[str, Any]]:
    """SIGKILL one worker at a time while the server answers probes; time its replacement."""

    def measure(server: Server) -> dict[str, Any]:
        row = _row(server)
        if not server.replaces_workers:
            return {**row, "skipped": server.replace_note or "does not replace dead workers"}
        count = settings.workers
        kills: list[dict[str, Any]] = []
        with (
            serving(server, count, logs, "replace") as running,
            PidWatch(running.ctx.port, clients=4) as watch,
        ):
            began = time.monotonic()
            _wait_serving(watch, began, count, began + READY_DEADLINE)
            for _ in range(settings.replace_kills):
                before = {p.pid for p in running.workers()} | _answer_pids(watch.answers(began))
                victim = min(p.pid for p in running.workers())
                killed = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                deadline = killed + REPLACE_DEADLINE

                new = wait_until(functools.partial(_first_new, watch, killed, before), deadline)
                back = wait_until(
                    functools.partial(_answering_without, watch, killed, count, victim), deadline
                )
                answers = watch.answers(killed)
                kill = {
                    "victim": victim,
                    "first_new_answer_s": None if new is None else round(new, 4),
                    "all_answering_s": None if back is None else round(back, 4),
                    "probes": len(answers),
                    "failed_probes": sum(a.pid is None for a in answers),
                }
                kills.append(kill)
                say(
                    f"  kill {victim}: a new worker answers after {_ms(new)}, {count} answer "
                    f"after {_ms(back)}; {kill['failed_probes']} of {kill['probes']} probes failed"
                )
                if back is None:
                    break  # not replaced: the next kill would measure nothing
                time.sleep(KILL_SETTLE)
                began = time.monotonic()
        return {
            **row,
            "workers": count,
            "kills": kills,
            "first_new_answer_median_s": _median([k["first_new_answer_s"] for k in kills]),
            "all_answering_median_s": _median([k["all_answering_s"] for k in kills]),
        }

    return _each(servers, "replace", measure)


def _first_new(watch: PidWatch, since: float, before: set[int]) -> float | None:
    """Seconds from ``since`` to the first answer from a pid not in ``before``."""
    for answer in watch.answers(since):
        if answer.pid is not None and answer.pid not in before:
            return answer.at - since
    return None


def _answering_without(watch: PidWatch, since: float, count: int, victim: int) -> float | None:
    """Seconds from ``since`` until ``count`` distinct pids other than ``victim`` answered."""
    return distinct_after(watch.answers(since), since, count, exclude={victim})


# -- reload duration --------------------------------------------------------------------------


def reload_time(servers: list[Server], settings: Settings, logs: Path) -> list[dict[str, Any]]:
    """``reload_time_rounds`` rounds over the servers; in each, every server is started with
    ``reload_time_workers`` workers and reloaded once under keep-alive load, timed until the
    reload is complete."""
    count = settings.reload_time_workers

    def skip(server: Server) -> str | None:
        if server.reload_signal is None:
            return server.reload_note or "no reload mechanism"
        return None

    def once(server: Server, number: int) -> list[dict[str, Any]]:
        sig = server.reload_signal
        assert sig is not None  # skip() left the others out
        with (
            serving(server, count, logs, f"reload-time{number + 1}") as running,
            PidWatch(running.ctx.port, clients=4) as watch,
        ):
            began = time.monotonic()
            _wait_serving(watch, began, count, began + READY_DEADLINE)
            return [_one_reload(running, watch, sig, count, settings)]

    rows = _rounds(servers, settings.reload_time_rounds, "reload-time", once, "reloads", skip)
    for server, row in zip(servers, rows, strict=True):
        if "skipped" not in row:
            assert server.reload_signal is not None
            row["workers"] = count
            row["signal"] = server.reload_signal.name
            row["duration_median_s"] = _median([r["duration_s"] for r in row["reloads"]])
    return rows


def _one_reload(
    running: Running, watch: PidWatch, sig: signal.Signals, count: int, settings: Settings
) -> dict[str, Any]:
    """One reload under wrk's keep-alive load: when it completed, and what failed meanwhile.

    Complete means: no old worker process runs any more (exited and reaped), ``count``
    workers exist and all are new, and ``count`` distinct new pids have answered since the
    signal. The duration is the first poll (every 10 ms) at which all of that holds.
    """
    old = running.workers()
    before = {p.pid for p in old}
    bound = RELOAD_DEADLINE + 2 * RELOAD_LEAD
    with BackgroundLoad(running.ctx.port, bound, settings) as load:
        time.sleep(RELOAD_LEAD)
        signalled = time.monotonic()
        running.signal(sig)
        exited: list[float | None] = [None]  # when the last old worker was seen gone

        def complete() -> float | None:
            if exited[0] is None and not any(is_running(p) for p in old):
                exited[0] = time.monotonic() - signalled
            now = {p.pid for p in running.workers()}
            if exited[0] is None or len(now) < count or now & before:
                return None
            serving = distinct_after(watch.answers(signalled), signalled, count, exclude=before)
            return None if serving is None else time.monotonic() - signalled

        duration = wait_until(complete, signalled + RELOAD_DEADLINE)
        new = distinct_after(watch.answers(signalled), signalled, 1, exclude=before)
        serving = distinct_after(watch.answers(signalled), signalled, count, exclude=before)
        time.sleep(RELOAD_LEAD)
    result = load.result
    answers = watch.answers(signalled)
    reload = {
        "duration_s": None if duration is None else round(duration, 3),
        "old_exited_s": None if exited[0] is None else round(exited[0], 3),
        "first_new_answer_s": None if new is None else round(new, 3),
        "all_new_answering_s": None if serving is None else round(serving, 3),
        "requests": result["requests"],
        "failed": result["socket_errors"] + result["non_2xx"],
        "errors": result["errors"],
        "probes": len(answers),
        "failed_probes": sum(a.pid is None for a in answers),
    }
    say(
        f"  {sig.name}: complete after {_ms(duration)} (old exited {_ms(exited[0])}, "
        f"{count} new answering {_ms(serving)}); failed {reload['failed']} of "
        f"{reload['requests']:,} requests, {reload['failed_probes']} of {reload['probes']} probes"
    )
    return reload


# -- start-up growth --------------------------------------------------------------------------


def growth_counts(settings: Settings) -> tuple[list[int], list[str]]:
    """The worker counts this machine's memory allows, and a note for each it does not."""
    available = _mem_available_mib()
    counts, notes = [], []
    for count in settings.growth_workers:
        need = count * GROWTH_MIB_PER_WORKER + GROWTH_SPARE_MIB
        if available is None or need <= available:
            counts.append(count)
        else:
            notes.append(
                f"start-up growth at {count} workers skipped: it is allowed {need:,} MiB "
                f"({GROWTH_MIB_PER_WORKER} a worker + {GROWTH_SPARE_MIB}), "
                f"{available:,} MiB are available"
            )
    return counts, notes


def _mem_available_mib() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


def startup_growth(
    servers: list[Server], settings: Settings, logs: Path, counts: list[int]
) -> list[dict[str, Any]]:
    """Time from exec to N distinct pids answering, for each N in ``counts``.

    One warm-up start of every server first (at 2 workers, not counted: a cold page cache),
    then ``growth_passes`` passes; in each, for each N, every server is started once, in the
    run order reversed every other start, so that the starts compared are seconds apart.
    """
    rows = {s.name: {**_row(s), "warmup_s": None, "by_workers": {}} for s in servers}
    for server in servers:
        with contextlib.suppress(Exception):
            rows[server.name]["warmup_s"] = _timed_start(server, 2, logs, "growth-warmup")[
                "answering_s"
            ]
    flip = False
    for number in range(settings.growth_passes):
        for count in counts:
            order = servers[::-1] if flip else servers
            flip = not flip
            said = []
            for server in order:
                entry = rows[server.name]["by_workers"].setdefault(
                    str(count), {"answering_s": [], "first_answer_s": [], "processes_s": []}
                )
                try:
                    start = _timed_start(server, count, logs, f"growth{number + 1}-{count}")
                except Exception as err:
                    entry.setdefault("errors", []).append(f"{err}")
                    start = {"answering_s": None, "first_answer_s": None, "processes_s": None}
                    said.append(f"{server.name} failed: {err}")
                else:
                    said.append(f"{server.name} {_ms(start['answering_s'])}")
                for key, value in start.items():
                    entry[key].append(value)
            say(f"start-up growth, pass {number + 1}, {count} workers: " + ", ".join(said))
    for row in rows.values():
        for entry in row["by_workers"].values():
            entry["answering_median_s"] = _median(entry["answering_s"])
    return list(rows.values())


def _timed_start(server: Server, count: int, logs: Path, tag: str) -> dict[str, float | None]:
    """One start of ``server`` with ``count`` workers: seconds from exec to the first answer,
    to ``count`` worker processes, and to ``count`` distinct pids answering."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        ctx = Context(port=free_port(), workers=count, tmp=Path(tmp))
        # The probes begin right after the exec: until the server listens they are refused,
        # and are tried again every 5 ms. They end before the server is stopped.
        with (
            started(server, ctx, logs / f"{server.name}.{tag}.log") as running,
            PidWatch(ctx.port, clients=min(16, max(4, count))) as watch,
        ):
            since = running.started
            processes: list[float | None] = [None]

            def check() -> float | None:
                if not running.alive():
                    raise RuntimeError(f"exited with {running.proc.returncode}")
                if processes[0] is None and len(running.workers()) >= count:
                    processes[0] = time.monotonic() - since
                return distinct_after(watch.answers(since), since, count)

            answering = wait_until(check, since + READY_DEADLINE, poll=0.02)
            if answering is None:
                seen = len(_answer_pids(watch.answers(since)))
                raise RuntimeError(f"{seen} of {count} workers answered in {READY_DEADLINE:g} s")
            first = distinct_after(watch.answers(since), since, 1)
        return {
            "answering_s": round(answering, 4),
            "first_answer_s": None if first is None else round(first, 4),
            "processes_s": None if processes[0] is None else round(processes[0], 4),
        }
