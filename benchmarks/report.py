"""Turn a results JSON from run.py into a Markdown table and a PNG chart beside it.

    python benchmarks/report.py benchmarks/results/quick.json

The figures that count are the ratios against peers measured in the same run (same machine,
same moment, same load generator); absolute requests/s say more about the machine.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _fmt_rps(row: Row, mode: str) -> str:
    data = row.get(mode)
    return f"{data['rps']:,.0f}" if data else "—"


def _fmt_lat(row: Row, mode: str) -> str:
    data = row.get(mode)
    return f"{data['p50_ms']:.2f} / {data['p99_ms']:.2f}" if data else "—"


def _fmt_cpu(row: Row) -> str:
    parts = []
    for mode in ("keepalive", "close"):
        data = row.get(mode)
        if data and data.get("cpu"):
            cpu = data["cpu"]
            # Results from before steal was recorded counted it in "other": shown as "?".
            steal = cpu.get("steal_cores")
            parts.append(
                f"{cpu['server_cores']:.2f}/{cpu['wrk_cores']:.2f}/"
                f"{cpu.get('irq_cores', 0):.2f}/{cpu['other_cores']:.2f}/"
                + (f"{steal:.2f}" if steal is not None else "?")
            )
    return "; ".join(parts) if parts else "—"


def _fmt_per_cpu(row: Row, mode: str) -> str:
    data = row.get(mode)
    value = data.get("requests_per_server_cpu_s") if data else None
    return f"{value:,.0f}" if value else "—"


def _fmt_errors(row: Row) -> str:
    parts = []
    for mode in ("keepalive", "close"):
        data = row.get(mode)
        if data:
            parts.append(str(data["socket_errors"] + data["non_2xx"]))
    return " / ".join(parts) if parts else "—"


def _fmt_balance(row: Row, mode: str) -> str:
    data = row.get(mode)
    if not data or not data["balance"]["shares"]:
        return "—"
    return "/".join(f"{s * 100:.0f}" for s in data["balance"]["shares"])


def _fmt_start(row: Row) -> str:
    value = row.get("first_answer_median_s")
    return f"{value * 1000:.0f}" if value is not None else "—"


def _fmt_mem(row: Row) -> str:
    mem = row.get("memory")
    if not mem or mem.get("worker_pss_avg_kib") is None:
        return "—"
    primary = mem.get("primary_pss_kib")
    zygote = mem.get("zygote_pss_kib")
    worker = f"{mem['worker_pss_avg_kib'] / 1024:.1f}"
    if primary is None:
        return worker
    beside = f"{primary / 1024:.1f}" + (f" + {zygote / 1024:.1f}" if zygote is not None else "")
    return f"{worker} ({beside})"


def _fmt_reload(row: Row) -> str:
    reload = row.get("reload")
    if not reload:
        return "—"
    if "skipped" in reload:
        return "n/a"
    if "error" in reload:
        return "error"
    return f"{reload['failed']} / {reload['requests']:,}"


def table(rows: list[Row]) -> str:
    head = (
        "| server | keep-alive req/s | p50 / p99 ms | conn-per-request req/s | p50 / p99 ms "
        "| failed (ka / close) | balance % (ka; close) | first answer ms "
        "| PSS MiB/worker (primary + zygote) | failed in reload / requests |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for row in rows:
        if "error" in row and not row.get("keepalive"):
            lines.append(f"| {row['name']} | error: {row['error']} |||||||||")
            continue
        lines.append(
            f"| {row['name']} | {_fmt_rps(row, 'keepalive')} | {_fmt_lat(row, 'keepalive')} "
            f"| {_fmt_rps(row, 'close')} | {_fmt_lat(row, 'close')} | {_fmt_errors(row)} "
            f"| {_fmt_balance(row, 'keepalive')}; {_fmt_balance(row, 'close')} "
            f"| {_fmt_start(row)} | {_fmt_mem(row)} | {_fmt_reload(row)} |"
        )
    return head + "\n".join(lines) + "\n"


def cpu_table(rows: list[Row]) -> str:
    """Where the CPU went during the measured runs: the noise check of a shared machine."""
    lines = [
        "| server | req per server CPU-s (ka / close) "
        "| cores server/wrk/irq/other/steal (ka; close) "
        "| req/s of each round (ka; close) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        if not row.get("keepalive"):
            continue
        rounds = "; ".join(
            ", ".join(f"{v:,.0f}" for v in row[mode].get("rps_all", [row[mode]["rps"]]))
            for mode in ("keepalive", "close")
            if row.get(mode)
        )
        lines.append(
            f"| {row['name']} | {_fmt_per_cpu(row, 'keepalive')} / {_fmt_per_cpu(row, 'close')} "
            f"| {_fmt_cpu(row)} | {rounds} |"
        )
    return "\n".join(lines) + "\n"


# -- targets ------------------------------------------------------------------------------------


def _rps(rows: dict[str, Row], name: str, mode: str) -> float | None:
    row = rows.get(name)
    if not row or not row.get(mode):
        return None
    return float(row[mode]["rps"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


Check = tuple[str, float | None, str, Callable[[float], bool]]


def _per_cpu(rows: dict[str, Row], name: str, mode: str) -> float | None:
    row = rows.get(name)
    value = row.get(mode, {}).get("requests_per_server_cpu_s") if row else None
    return float(value) if value else None


def _other(rows: dict[str, Row], name: str, mode: str) -> float | None:
    row = rows.get(name)
    cpu = row.get(mode, {}).get("cpu") if row else None
    return float(cpu["other_cores"]) if cpu else None


def context(rows: dict[str, Row], what: str) -> str:
    """For a throughput ratio 'A / B, mode': A/B per server CPU-s, and the busiest neighbour."""
    try:
        pair, mode = what.rsplit(", ", 1)
        left, right = (part.split(" ")[0] for part in pair.split(" / "))
    except ValueError:
        return ""
    if mode not in ("keepalive", "close") or left not in rows or right not in rows:
        return ""
    per_cpu = _ratio(_per_cpu(rows, left, mode), _per_cpu(rows, right, mode))
    others = [o for o in (_other(rows, left, mode), _other(rows, right, mode)) if o is not None]
    text = f"{per_cpu:.2f}" if per_cpu is not None else "—"
    if others:
        text += f" | {max(others):.2f}"
    return text


def checks(rows: dict[str, Row]) -> list[Check]:
    """(what, ratio, target text, passes) for every target the issue sets."""
    out: list[Check] = []
    at_least = lambda x: lambda r: r >= x  # noqa: E731
    for name in sorted(n for n in rows if n.startswith("aiocluster-aiohttp")):
        for mode in ("keepalive", "close"):
            out.append(
                (
                    f"{name} / gunicorn-aiohttp, {mode}",
                    _ratio(_rps(rows, name, mode), _rps(rows, "gunicorn-aiohttp", mode)),
                    "≥ 1.05",
                    at_least(1.05),
                )
            )
    for name in sorted(n for n in rows if n.startswith("aiocluster-protocol")):
        for mode in ("keepalive", "close"):
            nodes = [
                (n, v)
                for n in ("node-cluster", "node-cluster-rr")
                if (v := _rps(rows, n, mode)) is not None
            ]
            if nodes:
                best, value = max(nodes, key=lambda item: item[1])
                out.append(
                    (
                        f"{name} / {best} (the faster Node), {mode}",
                        _ratio(_rps(rows, name, mode), value),
                        "≥ 1.3",
                        at_least(1.3),
                    )
                )
            out.append(
                (
                    f"{name} / nginx, {mode}",
                    _ratio(_rps(rows, name, mode), _rps(rows, "nginx", mode)),
                    "close to 1",
                    at_least(0.9),
                )
            )
    rr_rows = sorted(n for n in rows if n.startswith("aiocluster-") and n.endswith("-rr"))
    for name in rr_rows:
        out.append(
            (
                f"{name} / node-cluster-rr, close",
                _ratio(_rps(rows, name, "close"), _rps(rows, "node-cluster-rr", "close")),
                "≥ 1.5",
                at_least(1.5),
            )
        )
    if not rr_rows:
        out.append(("aiocluster rr / node-cluster-rr, close", None, "≥ 1.5", at_least(1.5)))
    for name in ("aiocluster-aiohttp", "aiocluster-protocol"):
        mine = rows.get(name, {}).get("first_answer_median_s")
        theirs = rows.get("gunicorn-aiohttp", {}).get("first_answer_median_s")
        out.append(
            (
                f"first answer {name} / gunicorn-aiohttp",
                _ratio(mine, theirs),
                "≤ 0.8",
                lambda r: r <= 0.8,
            )
        )
    return out


def targets_table(rows: dict[str, Row]) -> str:
    lines = [
        "| ratio (same run) | value | target | met | per server CPU-s | other cores (max) |",
        "|---|---:|---:|:-:|---:|---:|",
    ]
    for what, value, target, passes in checks(rows):
        extra = context(rows, what) or "|"
        if value is None:
            lines.append(f"| {what} | — | {target} | not measured | {extra} |")
        else:
            met = "yes" if passes(value) else "no"
            lines.append(f"| {what} | {value:.2f} | {target} | {met} | {extra} |")
    return "\n".join(lines) + "\n"


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    return (
        f"{m['nproc']} cores ({m['cpu'] or 'unknown CPU'}), {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}; aiocluster {v['aiocluster']} "
        f"(git {m['git']}), aiohttp {v['aiohttp']}, uvloop {v['uvloop']}, gunicorn "
        f"{v['gunicorn']}, uvicorn {v['uvicorn']}, httptools {v['httptools']}, granian "
        f"{v['granian']}, Node.js {v['node']}, {v['nginx']}, wrk {v['wrk']}"
    )


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    rows = {row["name"]: row for row in results["servers"]}
    parts = [
        f"# Benchmark results ({results['label']} run, {results['started']})\n",
        f"Machine: {machine_line(results)}.\n",
        f"Each server: {s['workers']} workers on 127.0.0.1; wrk -t{s['wrk_threads']} "
        f"-c{s['connections']}, {s['warmup']:g} s warmup + {s['duration']:g} s measured per "
        f"mode; the load generator shares the {results['machine']['nproc']} cores with the "
        "server. Balance: each worker's share of answers during the warmup runs (with "
        "connection-per-request, its share of connections). First answer: median of "
        f"{s['starts']} start(s), process start to first HTTP 200. PSS: average per worker, "
        "primary/master in brackets, + aiocluster's zygote where it has one (fork start "
        "method; not counted as a worker). Reload: keep-alive load for "
        f"{s['reload_duration']:g} s with the reload signal a third of the way in.\n",
        table(results["servers"]),
        "\nCPU during the measured runs, in cores (server = primary + workers; irq = "
        "interrupts and softirqs, where loopback TCP partly runs; other = everything else on "
        "the machine, which is near 0 only when nothing else runs; steal = time the hypervisor "
        "gave this VM's CPUs to others, /proc/stat's steal column, a busy host):\n",
        cpu_table(results["servers"]),
        "\n## Targets\n",
        "Requests/s ratios, with the same ratio per server CPU-second beside them, and the "
        "most CPU that something else on the machine took during either run (over ~0.2 "
        "cores, the ratio is noise-prone).\n",
        targets_table(rows),
    ]
    if results.get("notes"):
        parts.append("\n## Notes\n")
        parts.append("".join(f"- {note}\n" for note in results["notes"]))
        for row in results["servers"]:
            reload = row.get("reload") or {}
            if "skipped" in reload:
                parts.append(f"- {row['name']} reload: {reload['skipped']}\n")
    return "\n".join(parts)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["servers"] if r.get("keepalive")]
    names = [r["name"] for r in rows]
    colors = {"aiocluster": "#1f77b4", "peer": "#7f7f7f", "ceiling": "#2ca02c"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 0.45 * len(rows) + 5))
    panels = [
        ("keep-alive, requests/s", lambda r: r["keepalive"]["rps"]),
        ("connection per request, requests/s", lambda r: r["close"]["rps"]),
        (
            "start to first answer, ms (lower is better)",
            lambda r: (r.get("first_answer_median_s") or 0) * 1000,
        ),
        (
            "PSS per worker, MiB (lower is better)",
            lambda r: (r.get("memory", {}).get("worker_pss_avg_kib") or 0) / 1024,
        ),
    ]
    for ax, (title, value) in zip(axes.flat, panels, strict=True):
        values = [value(r) for r in rows]
        ax.barh(names, values, color=[colors.get(r["family"], "#999999") for r in rows])
        ax.invert_yaxis()
        ax.set_title(title)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        ax.margins(x=0.15)
    m = results["machine"]
    fig.suptitle(
        f"aiocluster vs peers — {results['label']} run, {results['settings']['workers']} "
        f"workers, {m['nproc']} cores, Python {m['python']}, Linux {m['kernel']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(json_path: Path) -> list[Path]:
    results = json.loads(json_path.read_text())
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results))
    written = [md_path]
    try:
        png_path = json_path.with_suffix(".png")
        chart(results, png_path)
        written.append(png_path)
    except ImportError:
        print("matplotlib missing: no chart (python benchmarks/run.py --setup)", file=sys.stderr)
    return written


if __name__ == "__main__":
    for arg in sys.argv[1:] or [str(Path(__file__).parent / "results" / "quick.json")]:
        for written in write_report(Path(arg)):
            print(f"wrote {written}")
