"""``aiocluster status`` as a table, like ``pm2 list`` (pure formatting), and waiting for a stop."""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["format_bytes", "format_duration", "format_status", "wait_for_exit", "watch_status"]

COLUMNS = ("id", "slot", "pid", "state", "uptime", "restarts", "conns", "requests", "memory", "lag")


def format_duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 01m``, ``3d 04h``."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def format_bytes(n: float) -> str:
    """``812 KiB``, ``41.2 MiB``, ``1.50 GiB`` (``-`` when unknown)."""
    if n <= 0:
        return "-"
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


def format_status(
    name: str, pid: int, status: dict[str, Any], rates: dict[int, float] | None = None
) -> str:
    """The status reply of a primary as a header line and one table row per worker; with
    ``rates`` (worker id -> requests a second), a ``req/s`` column too."""
    version = status.get("version")
    code = f"aiocluster {version}" if version else ""
    if version and status.get("upgrades"):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["code_started"]))
        code += f" since {since} (upgrades {status['upgrades']})"
    lines = [
        f"cluster {name} (primary pid {pid}) · {status['listening']} of {status['size']} workers "
        f"listening · up {format_duration(status['uptime'])} · reloads {status['reloads']} · "
        f"restarts {status['restarts']}" + (" · STOPPING" if status.get("stopping") else ""),
    ]
    if code:
        lines[0] += f" · {code}"
    columns = (*COLUMNS, "req/s") if rates is not None else COLUMNS
    rows: list[tuple[str, ...]] = [columns]
    for w in status["workers"]:
        rate = () if rates is None else (f"{rates.get(w['id'], 0.0):.1f}",)
        rows.append(
            (
                str(w["id"]),
                str(w["slot"]),
                str(w["pid"]),
                str(w["state"]),
                format_duration(w["uptime"]),
                str(w["restarts"]),
                str(w["connections"]),
                str(w["requests"]),
                format_bytes(w["rss"]),
                f"{w['lag'] * 1000:.1f}ms",
                *rate,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        cells = [
            cell.ljust(width) if i == 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def watch_status(fetch: Callable[[], dict[str, Any]], interval: float) -> None:
    """Redraw ``fetch()``'s status every ``interval`` seconds until Ctrl-C (like ``top``):
    in place on a terminal, one table after another otherwise."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
    before: dict[int, float] = {}
    then = time.monotonic()
    try:
        while True:
            reply = fetch()
            now = time.monotonic()
            workers = reply["status"]["workers"]
            rates = {
                w["id"]: max(0.0, w["requests"] - before[w["id"]]) / (now - then)
                for w in workers
                if w["id"] in before and now > then
            }
            before = {w["id"]: float(w["requests"]) for w in workers}
            then = now
            table = format_status(reply["name"], reply["pid"], reply["status"], rates)
            sys.stdout.write(f"{clear}{table}\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return


def wait_for_exit(pid: int, timeout: float = 600.0) -> None:
    """Wait until process ``pid`` (not our child) has exited: a pidfd where the OS has one."""
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # macOS: no pidfd; a bounded poll
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
