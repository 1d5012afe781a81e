"""Benchmark runner: aiocluster against its peers, on loopback, driven by wrk.

    python benchmarks/run.py --setup        # make /work/venv-bench, install wrk and nginx
    python benchmarks/run.py --quick        # a few minutes
    python benchmarks/run.py                # the full run
    python benchmarks/run.py --list         # the server table, and what would be skipped
    python benchmarks/run.py --quick --measure burst,replace,reload-time,startup-growth

The default measures (``--measure starts,rounds``): first every server is started once untimed
(a warm-up start: the page cache), then started and timed to its first answer in a few passes
over all servers. Then come rounds over all servers, in an order that puts each aiocluster row
beside the peer it is compared with, reversed every other round: each server is started on a
free loopback port, warmed up (that warmup also tallies which worker answered, for the balance
figures), measured with keep-alive and with connection-per-request, its memory read, reloaded
under load (every round), then stopped, before the next one starts. The other measures (a
burst of connections, worker replacement, reload duration, start-up growth) are in
``bench/scenarios.py``. Results go to ``benchmarks/results/`` as JSON, with each round's
figures kept, and ``report.py`` turns them into a Markdown table and a PNG chart; it takes
each target ratio within a round, where the machine's drift weighs on both sides.

Only 127.0.0.1 is ever used. Every load run is bounded by ``wrk -d``, and every server started
is stopped and reaped, on errors and Ctrl-C too. The parts live in ``bench/`` (see there).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.config import HERE, QUICK_DURATION, VENV, Settings, say
from bench.install import install_checkout, reexec_in_venv, setup
from bench.load import raise_fd_limit
from bench.machine import machine
from bench.measures import run_rounds, server_rows, time_starts
from bench.process import RUNNING
from bench.servers import BASELINE, Server, baseline_row, build_servers, run_order, with_flags

#: Every measure, in the order a run takes them; the default is the first two.
MEASURES = ("starts", "rounds", "burst", "replace", "reload-time", "startup-growth")
DEFAULT_MEASURES = ("starts", "rounds")


def measure_list(text: str) -> tuple[str, ...]:
    """``--measure``'s value: names from MEASURES, comma-separated, or ``all``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return MEASURES
    unknown = [n for n in names if n not in MEASURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown measure {', '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(MEASURES)} or all"
        )
    return tuple(m for m in MEASURES if m in names)


def count_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive whole numbers (``5000,10000``)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"not a list of positive numbers: {text!r}")
    return values


def positive(text: str) -> int:
    """A positive whole number."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return value


def checkout_dir(text: str) -> Path:
    """``--baseline``'s value: a folder that holds an aiocluster package."""
    path = Path(text).expanduser().resolve()
    if not (path / "aiocluster" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text} holds no aiocluster package (aiocluster/)")
    return path


def aiocluster_flags(text: str) -> list[str]:
    """``--aiocluster-args``' value split as a shell would, or a one-line error."""
    try:
        return shlex.split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--aiocluster-args: {err}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (``--help`` lists every option with its default)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--setup", action="store_true", help="make the venv, install wrk/nginx")
    parser.add_argument("--quick", action="store_true", help="short runs: a few minutes in all")
    parser.add_argument(
        "--measure",
        type=measure_list,
        default=DEFAULT_MEASURES,
        help=f"measures to run, comma-separated: {', '.join(MEASURES)}, or all "
        f"(default: {','.join(DEFAULT_MEASURES)})",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers for every server (2)")
    parser.add_argument(
        "--duration",
        type=float,
        help=f"seconds per measured run (quick {QUICK_DURATION:g}, 10; whole seconds for wrk)",
    )
    parser.add_argument("--warmup", type=float, help="seconds of warmup per mode (quick 1, 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument(
        "--starts", type=int, help="timed starts per server, after one warm-up start (3)"
    )
    parser.add_argument(
        "--reload-duration", type=float, help="seconds of load around a reload (quick 3, 12)"
    )
    parser.add_argument("--rounds", type=int, help="rounds over all servers (3)")
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.2,
        help="before each mode, wait until the machine's busy cores drop under this (0.2)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, help="longest wait for that, seconds (quick 10, 30)"
    )
    parser.add_argument("--no-reloads", action="store_true", help="skip the reload runs")
    parser.add_argument(
        "--burst-connections",
        type=count_list,
        default=(5000, 10000),
        help="burst: connections opened at once, one run each (5000,10000; a size the "
        "open-file limit does not allow is skipped with a note)",
    )
    parser.add_argument(
        "--burst-duration", type=float, help="burst: seconds of each run (quick 5, 10)"
    )
    parser.add_argument(
        "--burst-threads", type=int, default=2, help="burst: wrk threads (2: wrk -t2)"
    )
    parser.add_argument(
        "--burst-mode",
        choices=("keepalive", "close"),
        default="keepalive",
        help="burst: keepalive (requests on the burst's connections) or close (a new "
        "connection per request, close.lua) (keepalive)",
    )
    parser.add_argument(
        "--burst-rounds",
        type=positive,
        default=1,
        help="burst: rounds, each a fresh start of every row, the order reversed every "
        "other round (1)",
    )
    parser.add_argument(
        "--replace-kills", type=int, help="replace: workers SIGKILLed, one by one (quick 3, 5)"
    )
    parser.add_argument(
        "--reload-time-workers", type=int, default=8, help="reload-time: workers (8)"
    )
    parser.add_argument(
        "--reload-time-rounds",
        type=positive,
        help="reload-time: rounds, each a fresh start and one reload of every row, the "
        "order reversed every other round (quick 1, 3)",
    )
    parser.add_argument(
        "--reload-batch",
        type=count_list,
        default=(),
        metavar="N[,N...]",
        help="reload-time: besides each aiocluster row, a row NAME-batchN run with "
        "`--reload-batch N`, one per value (none: only the default window)",
    )
    parser.add_argument(
        "--aiocluster-args",
        default="",
        metavar="ARGS",
        help="more `aiocluster run` options for every aiocluster row, one string "
        "(e.g. '--backlog 4096')",
    )
    parser.add_argument(
        "--baseline",
        type=checkout_dir,
        metavar="DIR",
        help="also run every aiocluster row with the aiocluster package of checkout DIR "
        "(rows baseline-NAME, each beside its own row): an A/B of two trees in one run",
    )
    parser.add_argument(
        "--growth-workers",
        type=count_list,
        default=(1, 2, 8, 32),
        help="startup-growth: worker counts (1,2,8,32; a count the memory does not allow is "
        "skipped with a note)",
    )
    parser.add_argument(
        "--growth-passes", type=int, help="startup-growth: timed starts per count (quick 1, 3)"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rows to run (globs allowed)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--label",
        help="name of the results (LABEL.json, .md, .png; default quick or full), e.g. "
        "asgi-quick for a run of --only some rows, which should not replace quick.json",
    )
    parser.add_argument("--list", action="store_true", help="print the server table and exit")
    args = parser.parse_args(argv)
    try:
        args.aiocluster_flags = aiocluster_flags(args.aiocluster_args)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings: the options given, else the quick or the full run's defaults."""
    quick = bool(args.quick)

    def pick(value: Any, fast: Any, full: Any) -> Any:
        return value if value is not None else (fast if quick else full)

    return Settings(
        workers=args.workers,
        duration=args.duration or (QUICK_DURATION if quick else 10.0),
        warmup=args.warmup or (1.0 if quick else 3.0),
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        starts=args.starts or 3,
        reload_duration=args.reload_duration or (3.0 if quick else 12.0),
        reloads=not args.no_reloads,
        rounds=args.rounds or 3,
        quiet_cores=args.quiet_cores,
        quiet_wait=pick(args.quiet_wait, 10.0, 30.0),
        quick=quick,
        out=args.out,
        measures=args.measure,
        burst_connections=args.burst_connections,
        burst_duration=pick(args.burst_duration, 5.0, 10.0),
        burst_threads=args.burst_threads,
        replace_kills=pick(args.replace_kills, 3, 5),
        reload_time_workers=args.reload_time_workers,
        reload_time_rounds=pick(args.reload_time_rounds, 1, 3),
        reload_batches=args.reload_batch,
        burst_mode=args.burst_mode,
        burst_rounds=args.burst_rounds,
        aiocluster_args=args.aiocluster_args,
        baseline=str(args.baseline or ""),
        growth_workers=args.growth_workers,
        growth_passes=pick(args.growth_passes, 1, 3),
    )


def table_rows(args: argparse.Namespace) -> tuple[list[Server], list[str]]:
    """The server table with ``--aiocluster-args`` on its aiocluster rows and, with
    ``--baseline``, a baseline row for each of them; and the notes on rows left out."""
    servers, notes = build_servers()
    if args.aiocluster_flags:
        servers = [
            with_flags(s, s.name, args.aiocluster_flags) if s.family == "aiocluster" else s
            for s in servers
        ]
    if args.baseline:
        servers += [baseline_row(s, args.baseline) for s in servers if s.family == "aiocluster"]
    return servers, notes


def rows_for(measure: str, servers: list[Server], only: list[str] | None) -> list[Server]:
    """The rows a measure of events runs: ``--only``'s if given, else its own (scenarios.ROWS)."""
    if only:
        return [s for s in servers if s.family != "floor"]  # timed by `starts` only
    own = scenarios.ROWS[measure]
    return [s for s in servers if s.name.removeprefix(BASELINE) in own]


def batch_rows(servers: list[Server], batches: tuple[int, ...]) -> list[Server]:
    """``servers`` with, after each aiocluster row, one row per ``--reload-batch`` value."""
    rows = []
    for server in servers:
        rows.append(server)
        if server.family == "aiocluster":
            rows += [
                with_flags(server, f"{server.name}-batch{n}", ["--reload-batch", str(n)])
                for n in batches
            ]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when done, 2 for what it lacks, 130 when interrupted."""
    args = parse_args(argv)
    if args.setup:
        return setup()
    reexec_in_venv(Path(__file__))
    settings = settings_from(args)
    installed = "" if args.list else install_checkout()
    servers, notes = table_rows(args)
    if args.only:
        servers = [s for s in servers if any(fnmatch.fnmatch(s.name, p) for p in args.only)]
    if args.list:
        for server in servers:
            why = server.missing()
            print(f"{server.name:28} {server.describe}" + (f"  [skip: {why}]" if why else ""))
        for note in notes:
            print(f"note: {note}")
        return 0
    if not shutil.which("wrk"):
        print(
            "wrk not found: install it from the distribution's packages\n"
            "  apt-get update && apt-get install -y wrk     (or: python benchmarks/run.py --setup)",
            file=sys.stderr,
        )
        return 2
    try:
        import psutil  # noqa: F401
    except ImportError:
        print(f"psutil missing: run `python benchmarks/run.py --setup` ({VENV})", file=sys.stderr)
        return 2

    # SIGTERM (and SIGHUP) end the run like Ctrl-C: every server is stopped on the way out.
    def interrupt(sig: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(sig).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    settings.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    info = machine()
    info["installed"] = installed
    # A burst of 10,000 connections needs as many descriptors in wrk and in the servers.
    soft, _ = raise_fd_limit()
    info["open_files_limit"] = soft
    label = args.label or ("quick" if settings.quick else "full")
    results: dict[str, Any] = {
        "label": label,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()
        },
        "machine": info,
        "measures": list(settings.measures),
        "notes": list(notes),
        "servers": [],
    }
    measures = ", ".join(settings.measures)
    say(f"{label} run, {settings.workers} workers each ({measures}); logs in {logs}")
    for note in notes:
        say(f"note: {note}")
    began = time.monotonic()
    interrupted = False
    rounds: dict[str, list[dict[str, Any]]] = {}
    starts: dict[str, dict[str, Any]] = {}
    runnable = []
    for server in servers:
        why = server.missing()
        if why:
            results["notes"].append(f"{server.name} skipped: {why}")
            say(f"{server.name}: skipped ({why})")
        else:
            runnable.append(server)
    ordered = run_order(runnable)
    results["run_order"] = [s.name for s in ordered]
    phases: dict[str, float] = {}
    results["phases_s"] = phases

    def phase(name: str, work: Callable[[], Any]) -> Any:
        at = time.monotonic()
        done = work()
        phases[name] = round(time.monotonic() - at, 1)
        return done

    def scenario(measure: str) -> list[Server]:
        return rows_for(measure, ordered, args.only)

    try:
        if "starts" in settings.measures:
            starts = phase("starts", lambda: time_starts(ordered, settings, logs))
        if "rounds" in settings.measures:
            loaded = [s for s in ordered if s.family != "floor"]  # the floor is no server
            phase("rounds", lambda: run_rounds(loaded, settings, logs, rounds))
        if "burst" in settings.measures:
            sizes, skipped = scenarios.burst_sizes(settings, soft)
            results["notes"] += skipped
            results["burst_sizes"] = sizes
            results["burst"] = phase(
                "burst", lambda: scenarios.burst(scenario("burst"), settings, logs, sizes)
            )
        if "replace" in settings.measures:
            results["replace"] = phase(
                "replace", lambda: scenarios.replace(scenario("replace"), settings, logs)
            )
        if "reload-time" in settings.measures:
            results["reload_time"] = phase(
                "reload-time",
                lambda: scenarios.reload_time(
                    batch_rows(scenario("reload-time"), settings.reload_batches), settings, logs
                ),
            )
        if "startup-growth" in settings.measures:
            counts, skipped = scenarios.growth_counts(settings)
            results["notes"] += skipped
            results["growth_workers"] = counts
            results["startup_growth"] = phase(
                "startup-growth",
                lambda: scenarios.startup_growth(
                    scenario("startup-growth"), settings, logs, counts
                ),
            )
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopping servers")
    finally:
        for running in list(RUNNING):
            running.stop()
    results["servers"] = server_rows(runnable, rounds, starts)
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    results["interrupted"] = interrupted
    path = settings.out / f"{label}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    say(f"wrote {path} ({results['elapsed_s']} s)")
    if not interrupted:
        from bench.report import write_report

        for written in write_report(path):
            say(f"wrote {written}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
