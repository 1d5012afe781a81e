"""A burst of thousands of keep-alive connections at once: every aiocluster policy and gunicorn.

    python benchmarks/burst.py [--connections 5000] [--workers 2] [--rounds 3]
                               [--only aiocluster-rr gunicorn] [--mode keepalive|close]

Each round starts every server in turn (the order reversed every other round), waits until
its workers answer, then runs ``wrk -t2 -cC -dD --timeout 5s`` against it; wrk opens all C
connections at once. It prints requests/s, timeouts, other errors and p99 per server and
round, then the medians. The open-files limit is raised to its hard limit first (wrk and the
servers inherit it). With ``--mode close`` every request has its own connection
(``close.lua``), and the aiocluster primary's CPU per connection is printed too (utime+stime
from /proc before and after, divided by the requests).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from side_by_side import HERE, Server, wrk_json

SERVERS = ["aiocluster-shared", "aiocluster-rr", "aiocluster-reuseport", "gunicorn"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (the primary itself, not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int:
    """The machine's count of connections a full accept queue dropped (TcpExt ListenOverflows)."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names[0] == "TcpExt:":
            return int(values[names.index("ListenOverflows")])
    return 0


def one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    kind, _, policy = name.partition("-")
    with tempfile.TemporaryDirectory(prefix=f"burst-{name}-") as tmp:
        server = Server(kind, args.workers, policy or "shared", args.extra, Path(tmp))
        try:
            server.wait_ready(time.monotonic() + 60)
            script = HERE / ("close.lua" if args.mode == "close" else "keepalive.lua")
            argv = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s"]
            argv += ["--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{server.port}/"]
            before, overflows = cpu_seconds(server.proc.pid), listen_overflows()
            out = subprocess.run(
                argv, capture_output=True, text=True, timeout=args.duration + 60, check=False
            ).stdout
            used = cpu_seconds(server.proc.pid) - before
            overflows = listen_overflows() - overflows
        finally:
            server.stop()
        found = wrk_json(out)
        errors = dict(found["errors"])  # type: ignore[call-overload]
        requests = int(found["requests"])  # type: ignore[call-overload]
        row: dict[str, Any] = {
            "rps": requests / (int(found["duration_us"]) / 1e6),  # type: ignore[call-overload]
            "timeouts": errors.pop("timeout"),
            "errors": sum(errors.values()),
            "p99_ms": found["latency_us"]["p99"] / 1000,  # type: ignore[index]
            "overflows": overflows,
        }
        if kind == "aiocluster":
            row["primary_us_per_request"] = used / max(1, requests) * 1e6
            spread = re.findall(r"connections per worker: (.*)", server.log.read_text())
            row["spread"] = spread[-1] if spread else ""
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--mode", choices=["keepalive", "close"], default="keepalive")
    parser.add_argument("--only", nargs="+", choices=SERVERS, default=SERVERS)
    parser.add_argument("--extra", default="", help="more aiocluster run arguments")
    parser.add_argument("--json", type=Path, help="write every round here")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.connections + 1000:
        parser.error(f"the open-files hard limit is {hard}: too low for {args.connections}")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in args.only}
    for number in range(args.rounds):
        for name in args.only if number % 2 == 0 else args.only[::-1]:
            row = one(name, args)
            rounds[name].append(row)
            cpu = row.get("primary_us_per_request")
            print(
                f"round {number + 1} {name}: {row['rps']:.0f} req/s, {row['timeouts']} timeouts, "
                f"{row['errors']} other errors, p99 {row['p99_ms']:.0f} ms, "
                f"{row['overflows']} accept-queue overflows (machine-wide)"
                + (f", primary {cpu:.1f} us/request" if cpu is not None else "")
                + (f", spread {row['spread']}" if row.get("spread") else ""),
                flush=True,
            )
    for name, rows in rounds.items():

        def med(key: str, rows: list[dict[str, Any]] = rows) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

        line = f"{name}: req/s {med('rps')}, timeouts {[r['timeouts'] for r in rows]}, "
        line += f"p99 ms {med('p99_ms')}"
        if name.startswith("aiocluster"):
            line += f", primary us/request {med('primary_us_per_request')}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
