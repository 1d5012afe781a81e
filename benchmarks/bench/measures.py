"""The default measures: timed starts, and rounds of throughput, memory and reload failures.

``time_starts`` times every server from exec to its first answer, in passes; ``bench_server``
runs one round of one server: keep-alive and connection-per-request load (with the balance
over workers and the CPU around it), its memory, and the failed requests of a reload under
load. ``merge_rounds`` makes the results row of a server from its rounds.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import MODES, Context, Settings, say
from .load import BackgroundLoad, CpuSample, balance, wait_quiet, wrk
from .process import Running, free_port, http_status, pss_kib, started
from .servers import Server


def memory(running: Running) -> dict[str, Any]:
    """PSS of the workers (their average is the figure), of the primary, and of a zygote."""
    workers, zygotes = running.split_children()
    worker_pss = [k for k in (pss_kib(p.pid) for p in workers) if k is not None]
    primary = pss_kib(running.proc.pid)
    zygote_pss = [k for k in (pss_kib(p.pid) for p in zygotes) if k is not None]
    return {
        "primary_pss_kib": primary,
        "zygote_pss_kib": sum(zygote_pss) if zygote_pss else None,
        "zygotes_found": len(zygotes),
        "worker_pss_kib": worker_pss,
        "worker_pss_avg_kib": round(statistics.mean(worker_pss)) if worker_pss else None,
        "workers_found": len(workers),
    }


def measure_reload(running: Running, settings: Settings) -> dict[str, Any]:
    """Failed requests while the server replaces its workers under keep-alive load.

    wrk starts (bounded by -d at reload_duration + 30 s), a third of reload_duration later the
    server gets its reload signal; once every old worker is gone and N new ones exist (some
    servers respawn one worker at a time, seconds apart) and another third has passed, wrk is
    stopped with SIGINT, which makes it report. Failures are wrk's socket errors
    (connect/read/write/timeout) plus non-2xx answers. Note that wrk counts a keep-alive
    connection that the server closes between two requests as a read error; a real client would
    retry such an idempotent request, so these are an upper bound on what users would see.
    """
    sig = running.server.reload_signal
    if sig is None:
        return {"skipped": running.server.reload_note or "no reload mechanism"}
    third = settings.reload_duration / 3
    bound = settings.reload_duration + 30
    before = {p.pid for p in running.workers()}
    with BackgroundLoad(running.ctx.port, bound, settings) as load:
        time.sleep(third)
        signalled = time.monotonic()
        running.signal(sig)
        replaced_after = None
        deadline = signalled + bound - third - 2
        while time.monotonic() < deadline and load.running():
            now = {p.pid for p in running.workers()}
            if not (now & before) and len(now) >= running.ctx.workers:
                replaced_after = time.monotonic() - signalled
                break
            time.sleep(0.05)
        time.sleep(third)
    result = load.result
    return {
        "signal": sig.name,
        "requests": result["requests"],
        "failed": result["socket_errors"] + result["non_2xx"],
        "errors": result["errors"],
        "replaced_after_s": None if replaced_after is None else round(replaced_after, 2),
        "still_answers": http_status(running.ctx.port, timeout=5.0) == 200,
    }


# -- one server ---------------------------------------------------------------------------------


START_SETTLE = 0.2  # seconds between a timed start's first answer and its stop
START_STOP_TIMEOUT = 5.0  # granian, stopped while a worker boots, may ignore SIGTERM


def time_start(server: Server, settings: Settings, logs: Path, tag: str) -> float:
    """Start ``server``, time it from Popen to its first HTTP 200, and stop it.

    Before the stop, the runner waits for the workers (aiocluster: its ready line) and a
    moment more: a server stopped while its workers still boot may hang in its shutdown.
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        ctx = Context(port=free_port(), workers=settings.workers, tmp=Path(tmp))
        log_path = logs / f"{server.name}.{tag}.log"
        with started(server, ctx, log_path, stop_timeout=START_STOP_TIMEOUT) as running:
            seconds = running.wait_first_answer(time.monotonic() + 60)
            if server.family != "floor":  # the floor has no workers to wait for
                running.wait_workers(time.monotonic() + 30)
            time.sleep(START_SETTLE)
    return seconds


def time_starts(servers: list[Server], settings: Settings, logs: Path) -> dict[str, dict[str, Any]]:
    """First answer of each server: one warm-up start, then ``settings.starts`` timed ones.

    Each pass starts every server once, in the run order, reversed every other pass, so that
    the k-th starts of two servers are seconds apart and their ratio can be taken pair by pair.
    The warm-up pass (its time is kept but not counted) pays for a cold page cache: the first
    start of a program after a while reads its files from disk, the later ones do not.
    """
    found: dict[str, dict[str, Any]] = {
        s.name: {"warmup_start_s": None, "first_answer_by_pass": []} for s in servers
    }
    for number in range(settings.starts + 1):
        order = servers if number % 2 == 0 else servers[::-1]
        what = "warm-up start (not counted)" if number == 0 else f"timed start {number}"
        said = []
        for server in order:
            entry = found[server.name]
            seconds: float | None = None
            if "start_error" not in entry:
                try:
                    seconds = time_start(server, settings, logs, f"start{number}")
                    said.append(f"{server.name} {seconds * 1000:.0f}")
                except Exception as err:
                    entry["start_error"] = f"{err}"
                    said.append(f"{server.name} failed: {err}")
            if number == 0:
                entry["warmup_start_s"] = seconds
            else:
                entry["first_answer_by_pass"].append(seconds)
        say(f"{what}, ms: " + ", ".join(said))
    return found


def bench_server(
    server: Server, settings: Settings, logs: Path, *, number: int, position: int
) -> dict[str, Any]:
    """One round for one server: load in both modes, memory, then the reload."""
    row: dict[str, Any] = {"name": server.name, "family": server.family}
    row["describe"] = server.describe
    row["round"] = number + 1
    row["position"] = position
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"bench-{server.name}-") as tmp:
        ctx = Context(port=free_port(), workers=settings.workers, tmp=Path(tmp))
        row["argv"] = server.argv(ctx)
        log_path = logs / f"{server.name}.round{number + 1}.log"
        with started(server, ctx, log_path) as running:
            try:
                row["first_answer_in_round_s"] = running.wait_first_answer(time.monotonic() + 60)
                row["workers_found"] = running.wait_workers(time.monotonic() + 30)
                for mode in MODES:
                    quiet = wait_quiet(settings)
                    warm = wrk(ctx.port, mode, settings.warmup, settings, tally=True)
                    before = CpuSample.take(running)
                    measured = wrk(ctx.port, mode, settings.duration, settings)
                    after = CpuSample.take(running)
                    cpu = before.until(after)
                    row[mode] = {
                        "rps": round(measured["rps"], 1),
                        "p50_ms": measured["latency_us"]["p50"] / 1000,
                        "p90_ms": measured["latency_us"]["p90"] / 1000,
                        "p99_ms": measured["latency_us"]["p99"] / 1000,
                        "requests": measured["requests"],
                        "socket_errors": measured["socket_errors"],
                        "non_2xx": measured["non_2xx"],
                        "errors": measured["errors"],
                        "balance": balance(warm["pids"]),
                        "cpu": cpu,
                        "cpu_us_per_request": before.per_request(after, measured["requests"]),
                        "before": quiet,
                        "requests_per_server_cpu_s": round(measured["rps"] / cpu["server_cores"], 1)
                        if cpu["server_cores"]
                        else None,
                    }
                    say(
                        f"  {mode:9} {measured['rps']:>10,.0f} req/s  "
                        f"p50 {row[mode]['p50_ms']:.2f} ms  p99 {row[mode]['p99_ms']:.2f} ms  "
                        f"errors {measured['socket_errors']}+{measured['non_2xx']}  "
                        f"shares {row[mode]['balance']['shares']}  cores: server "
                        f"{cpu['server_cores']:.2f} wrk {cpu['wrk_cores']:.2f} "
                        f"irq {cpu['irq_cores']:.2f} other {cpu['other_cores']:.2f} "
                        f"steal {cpu['steal_cores']:.2f}; us/request: primary "
                        f"{row[mode]['cpu_us_per_request']['primary_us']:.1f} workers "
                        f"{row[mode]['cpu_us_per_request']['workers_us']:.1f}"
                    )
                row["memory"] = memory(running)
                if settings.reloads:
                    row["reload"] = measure_reload(running, settings)
            except Exception as err:
                row["error"] = f"{err}"
                row["log_tail"] = running.log_tail()
                say(f"  error: {err}\n{row['log_tail']}")
    row["elapsed_s"] = round(time.monotonic() - began, 2)
    return row


#: What each round keeps of a mode, for the ratios taken within a round (report.py).
ROUND_FIELDS = ("rps", "requests_per_server_cpu_s")
ROUND_CPU_FIELDS = ("server_cores", "other_cores", "steal_cores")


def merge_rounds(rounds: list[dict[str, Any]], starts: dict[str, Any]) -> dict[str, Any]:
    """One row from several rounds: per mode, the round with the median requests/s.

    ``per_round`` keeps each round's own figures in round order, so that report.py can take
    a ratio between two servers within each round; ``first_answer_by_pass`` keeps each timed
    start in pass order (None where it failed), for the same pairing of starts.
    """
    row = {k: v for k, v in rounds[0].items() if k not in ("round", "position", "elapsed_s")}
    row.pop("first_answer_in_round_s", None)
    row["rounds"] = len(rounds)
    for mode in MODES:
        runs = [r[mode] for r in rounds if r.get(mode)]
        if runs:
            runs.sort(key=lambda run: run["rps"])
            row[mode] = {**runs[len(runs) // 2], "rps_all": [run["rps"] for run in runs]}
            costs = [run["cpu_us_per_request"] for run in runs if "cpu_us_per_request" in run]
            if costs:
                # CPU per request drifts less than req/s: its own median over the rounds.
                row[mode]["cpu_us_per_request_median"] = {
                    k: round(statistics.median(c[k] for c in costs), 2) for k in costs[0]
                }
    per_round = []
    for r in rounds:
        entry: dict[str, Any] = {
            "round": r["round"],
            "position": r["position"],
            "elapsed_s": r.get("elapsed_s"),
        }
        if r.get("first_answer_in_round_s") is not None:
            entry["first_answer_s"] = round(r["first_answer_in_round_s"], 4)
        waited = [r[mode]["before"]["waited_s"] for mode in MODES if r.get(mode)]
        if waited:
            entry["quiet_waited_s"] = round(sum(waited), 1)
        for mode in MODES:
            if r.get(mode):
                data = {k: r[mode][k] for k in ROUND_FIELDS}
                data.update({k: r[mode]["cpu"][k] for k in ROUND_CPU_FIELDS})
                if "cpu_us_per_request" in r[mode]:
                    data["cpu_us_per_request"] = r[mode]["cpu_us_per_request"]
                entry[mode] = data
        if r.get("error"):
            entry["error"] = r["error"]
        per_round.append(entry)
    row["per_round"] = per_round
    add_starts(row, starts)
    memories = [r["memory"] for r in rounds if r.get("memory")]
    if memories:
        row["memory"] = memories[-1]
    reloads = [r["reload"] for r in rounds if r.get("reload")]
    if reloads:
        # The first round's (as results from before reloads ran every round have it), and
        # every round's: a target of 0 failures holds only if it holds in each.
        row["reload"] = reloads[0]
        row["reloads"] = reloads
    errors = [r["error"] for r in rounds if r.get("error")]
    if errors:
        row["error"] = "; ".join(errors)
    return row


def add_starts(row: dict[str, Any], starts: dict[str, Any]) -> None:
    """Put a server's timed starts (``time_starts``) into its results row."""
    by_pass = starts.get("first_answer_by_pass", [])
    timed = [s for s in by_pass if s is not None]
    row["first_answer_s"] = timed
    row["first_answer_median_s"] = statistics.median(timed) if timed else None
    row["first_answer_by_pass"] = by_pass
    row["warmup_start_s"] = starts.get("warmup_start_s")
    if starts.get("start_error"):
        row["start_error"] = starts["start_error"]


def run_rounds(
    ordered: list[Server], settings: Settings, logs: Path, into: dict[str, list[dict[str, Any]]]
) -> None:
    """``settings.rounds`` rounds over ``ordered``, each server's rounds kept in ``into`` as
    they finish (an interrupted run keeps the rounds it completed)."""
    for number in range(settings.rounds):
        # Reversed every other round: no server always runs first, and a drift of the
        # machine's speed over a round weighs on both sides of a ratio alike.
        order = ordered if number % 2 == 0 else ordered[::-1]
        for position, server in enumerate(order):
            say(f"{server.name} (round {number + 1}/{settings.rounds}): {server.describe}")
            row = bench_server(server, settings, logs, number=number, position=position)
            into.setdefault(server.name, []).append(row)


def server_rows(
    servers: list[Server],
    rounds: dict[str, list[dict[str, Any]]],
    starts: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """The results' ``servers``: one row per server measured by the rounds or the starts."""
    rows = []
    for server in servers:
        if server.name in rounds:
            rows.append(merge_rounds(rounds[server.name], starts.get(server.name, {})))
        elif server.name in starts:  # --measure starts without rounds
            row = {"name": server.name, "family": server.family, "describe": server.describe}
            add_starts(row, starts[server.name])
            rows.append(row)
    return rows
