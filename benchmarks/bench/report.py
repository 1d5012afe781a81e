"""Turn a results JSON from run.py into a Markdown table and a PNG chart beside it.

    python benchmarks/report.py benchmarks/results/quick.json

The figures that count are the ratios against peers measured in the same run (same machine,
same moment, same load generator); absolute requests/s say more about the machine.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .servers import FLOOR

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


def _fmt_cost(row: Row) -> str:
    """CPU µs per request of the primary and of the workers, per mode ("—" in older results)."""
    parts = []
    for mode in ("keepalive", "close"):
        cost = (row.get(mode) or {}).get("cpu_us_per_request_median")
        parts.append(f"{cost['primary_us']:.1f} / {cost['workers_us']:.1f}" if cost else "—")
    return "; ".join(parts)


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
    """Failed / requests of each round's reload (``a, b, c / n, m, k``), or the one's."""
    reloads = row.get("reloads") or ([row["reload"]] if row.get("reload") else [])
    if not reloads:
        return "—"
    if any("skipped" in reload for reload in reloads):
        return "n/a"
    if any("error" in reload for reload in reloads):
        return "error"
    failed = ", ".join(str(reload["failed"]) for reload in reloads)
    requests = ", ".join(f"{reload['requests']:,}" for reload in reloads)
    return f"{failed} / {requests}"


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


def _rps_by_round(row: Row, mode: str) -> list[float]:
    """Requests/s of each round, in round order (older results: sorted, as they kept them)."""
    if row.get("per_round"):
        return [r[mode]["rps"] for r in row["per_round"] if r.get(mode)]
    return list(row[mode].get("rps_all", [row[mode]["rps"]]))


def cpu_table(rows: list[Row]) -> str:
    """Where the CPU went during the measured runs: the noise check of a shared machine."""
    lines = [
        "| server | req per server CPU-s (ka / close) "
        "| cores server/wrk/irq/other/steal (ka; close) "
        "| CPU µs/request, primary / workers, median of rounds (ka; close) "
        "| req/s of each round, in order (ka; close) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row.get("keepalive"):
            continue
        rounds = "; ".join(
            ", ".join(f"{v:,.0f}" for v in _rps_by_round(row, mode))
            for mode in ("keepalive", "close")
            if row.get(mode)
        )
        lines.append(
            f"| {row['name']} | {_fmt_per_cpu(row, 'keepalive')} / {_fmt_per_cpu(row, 'close')} "
            f"| {_fmt_cpu(row)} | {_fmt_cost(row)} | {rounds} |"
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


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


@dataclasses.dataclass(frozen=True)
class Target:
    """One ratio the issue sets a target for: left / right, in a load mode or at start."""

    left: str
    right: str
    mode: str  # "keepalive", "close", or "start" (first answer)
    target: str
    passes: Callable[[float], bool]
    label: str = ""  # what to call the pair, if not "left / right"

    @property
    def what(self) -> str:
        pair = self.label or f"{self.left} / {self.right}"
        return f"first answer {pair}" if self.mode == "start" else f"{pair}, {self.mode}"


@dataclasses.dataclass(frozen=True)
class Ratio:
    """A target's ratio: the median of the pairs, their range, and the context of the runs."""

    pairs: list[float]
    paired: bool  # False: one ratio of two per-server medians (results from before pairing)
    per_cpu: list[float] = dataclasses.field(default_factory=list)
    other: float | None = None  # most cores that something else took, in any run used
    steal: float | None = None  # most cores the hypervisor stole, in any run used

    @property
    def value(self) -> float | None:
        return statistics.median(self.pairs) if self.pairs else None


def _round_data(row: Row, mode: str) -> dict[int, dict[str, Any]]:
    return {r["round"]: r[mode] for r in row.get("per_round", []) if r.get(mode)}


def evaluate(rows: dict[str, Row], target: Target) -> Ratio:
    """The ratio of ``target`` taken within each round (each pass of starts), where the results
    have rounds; else, for older results, between the two servers' medians."""
    left, right = rows.get(target.left), rows.get(target.right)
    if left is None or right is None:
        return Ratio([], paired=False)
    if target.mode == "start":
        mine, theirs = left.get("first_answer_by_pass"), right.get("first_answer_by_pass")
        if mine is None or theirs is None:
            single = _ratio(left.get("first_answer_median_s"), right.get("first_answer_median_s"))
            return Ratio([single] if single is not None else [], paired=False)
        starts = [a / b for a, b in zip(mine, theirs, strict=False) if a is not None and b]
        return Ratio(starts, paired=True)
    mine_by_round, theirs_by_round = _round_data(left, target.mode), _round_data(right, target.mode)
    if not mine_by_round or not theirs_by_round:
        single = _ratio(_rps(rows, target.left, target.mode), _rps(rows, target.right, target.mode))
        if single is None:
            return Ratio([], paired=False)
        both = [left[target.mode], right[target.mode]]
        cpu_single = _ratio(
            both[0].get("requests_per_server_cpu_s"), both[1].get("requests_per_server_cpu_s")
        )
        others = [run["cpu"]["other_cores"] for run in both if run.get("cpu")]
        return Ratio(
            [single],
            paired=False,
            per_cpu=[cpu_single] if cpu_single is not None else [],
            other=max(others) if others else None,
        )
    pairs: list[float] = []
    per_cpu: list[float] = []
    runs: list[dict[str, Any]] = []
    for number in sorted(set(mine_by_round) & set(theirs_by_round)):
        a, b = mine_by_round[number], theirs_by_round[number]
        ratio = _ratio(a["rps"], b["rps"])
        if ratio is None:
            continue
        pairs.append(ratio)
        runs += [a, b]
        cpu_ratio = _ratio(a.get("requests_per_server_cpu_s"), b.get("requests_per_server_cpu_s"))
        if cpu_ratio is not None:
            per_cpu.append(cpu_ratio)
    others = [run["other_cores"] for run in runs if run.get("other_cores") is not None]
    steals = [run["steal_cores"] for run in runs if run.get("steal_cores") is not None]
    return Ratio(
        pairs,
        paired=True,
        per_cpu=per_cpu,
        other=max(others) if others else None,
        steal=max(steals) if steals else None,
    )


def checks(rows: dict[str, Row]) -> list[Target]:
    """Every target the issue sets, for the rows these results have."""
    out: list[Target] = []
    for name in sorted(n for n in rows if n.startswith("aiocluster-aiohttp")):
        for mode in ("keepalive", "close"):
            out.append(Target(name, "gunicorn-aiohttp", mode, "≥ 1.05", _at_least(1.05)))
    for name in sorted(n for n in rows if n.startswith("aiocluster-protocol")):
        for mode in ("keepalive", "close"):
            nodes = [
                (n, v)
                for n in ("node-cluster", "node-cluster-rr")
                if (v := _rps(rows, n, mode)) is not None
            ]
            if nodes:
                # The faster of the two by their medians; the ratio is then taken per round.
                best, _ = max(nodes, key=lambda item: item[1])
                label = f"{name} / {best} (the faster Node)"
                out.append(Target(name, best, mode, "≥ 1.3", _at_least(1.3), label))
            out.append(Target(name, "nginx", mode, "close to 1", _at_least(0.9)))
    # Issue 14: the same ASGI app, the same protocol implementation as uvicorn's.
    for name in sorted(n for n in rows if n.startswith("aiocluster-asgi")):
        for mode in ("keepalive", "close"):
            out.append(Target(name, "uvicorn-asgi", mode, "≥ 1.0", _at_least(1.0)))
            out.append(Target(name, "gunicorn-asgi", mode, "≥ 1.0", _at_least(1.0)))
    rr_rows = sorted(
        n
        for n in rows
        if n.startswith("aiocluster-") and n.endswith("-rr") and not n.startswith("aiocluster-asgi")
    )
    for name in rr_rows:
        out.append(Target(name, "node-cluster-rr", "close", "≥ 1.5", _at_least(1.5)))
    if not rr_rows:
        out.append(Target("aiocluster rr", "node-cluster-rr", "close", "≥ 1.5", _at_least(1.5)))
    starters = ["aiocluster-aiohttp", "aiocluster-protocol"]
    starters += [n for n in sorted(rows) if n.startswith("aiocluster-aiohttp-spawn")]
    for name in starters:
        out.append(Target(name, "gunicorn-aiohttp", "start", "≤ 0.8", _at_most(0.8)))
    return out


def _fmt_ratio(ratio: Ratio, target: Target) -> str:
    """The cells after the name: median, range, target, met, per CPU-s, other / steal."""
    value = ratio.value
    if value is None:
        return f"— | — | {target.target} | not measured | | |"
    met = "yes" if target.passes(value) else "no"
    spread = "—"
    if ratio.paired:  # how many rounds met it, out of the rounds where both sides ran
        met += f" ({sum(target.passes(r) for r in ratio.pairs)}/{len(ratio.pairs)})"
        if len(ratio.pairs) > 1:
            spread = f"{min(ratio.pairs):.2f}-{max(ratio.pairs):.2f}"
    per_cpu = f"{statistics.median(ratio.per_cpu):.2f}" if ratio.per_cpu else ""
    other = "" if ratio.other is None else f"{ratio.other:.2f}"
    if ratio.steal is not None:
        other += f" / {ratio.steal:.2f}"
    return f"{value:.2f} | {spread} | {target.target} | {met} | {per_cpu} | {other} |"


def targets_table(rows: dict[str, Row], pairs: bool = True) -> str:
    """The targets; ``pairs``: the results keep rounds apart (else one ratio of medians)."""
    value, met = ("median of rounds", "met (rounds)") if pairs else ("value", "met")
    lines = [
        f"| ratio (same run) | {value} | range | target | {met} | per server CPU-s "
        "| other / steal cores (max) |",
        "|---|---:|---:|---:|:-:|---:|---:|",
    ]
    for target in checks(rows):
        lines.append(f"| {target.what} | {_fmt_ratio(evaluate(rows, target), target)}")
    return "\n".join(lines) + "\n"


def floor_lines(rows: dict[str, Row]) -> list[str]:
    """How far each aiohttp row's first answer is above the floor's, pass by pass."""
    floor = rows.get(FLOOR, {}).get("first_answer_by_pass")
    if not floor:
        return []
    lines = [
        f"\nAbove the floor ({FLOOR}: a fresh interpreter imports aiohttp.web and answers on "
        "a plain socket, no server; median of its starts "
        f"{_fmt_start(rows[FLOOR])} ms): each aiohttp row's first answer less the floor's of the "
        "same pass, median and range over the passes, ms:\n",
    ]
    for name, row in rows.items():
        mine = row.get("first_answer_by_pass")
        if "aiohttp" not in name or not mine:
            continue  # the floor is the aiohttp app's: the other apps import other things
        gaps = [(a - b) * 1000 for a, b in zip(mine, floor, strict=False) if a and b]
        if gaps:
            lines.append(
                f"- {name}: {statistics.median(gaps):+.0f} ({min(gaps):+.0f} to {max(gaps):+.0f})\n"
            )
    return ["".join(lines)] if len(lines) > 1 else []


def paired(results: dict[str, Any]) -> bool:
    """Whether these results keep each round apart (and so ratios are taken per round)."""
    return any("per_round" in row for row in results["servers"])


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
    """The whole report: the machine, then a section for each measure the results have."""
    parts = [
        f"# Benchmark results ({results['label']} run, {results['started']})\n",
        f"Machine: {machine_line(results)}.\n",
    ]
    if results["servers"]:
        parts += throughput_sections(results)
    parts += event_sections(results)
    if results.get("notes"):
        parts.append("\n## Notes\n")
        parts.append("".join(f"- {note}\n" for note in results["notes"]))
        for row in results["servers"]:
            reload = row.get("reload") or {}
            if "skipped" in reload:
                parts.append(f"- {row['name']} reload: {reload['skipped']}\n")
    return "\n".join(parts)


def throughput_sections(results: dict[str, Any]) -> list[str]:
    """The default measures' part: the main table, CPU, and the targets."""
    s = results["settings"]
    rows = {row["name"]: row for row in results["servers"]}
    pairs = paired(results)
    return [
        f"Each server: {s['workers']} workers on 127.0.0.1; wrk -t{s['wrk_threads']} "
        f"-c{s['connections']}, {s['warmup']:g} s warmup + {s['duration']:g} s measured per "
        f"mode, in each of {s['rounds']} round(s) over all servers (req/s and latency: the "
        "round with the median req/s); the load generator shares the "
        f"{results['machine']['nproc']} cores with the server. Balance: each worker's share "
        "of answers during the warmup runs (with connection-per-request, its share of "
        f"connections). First answer: median of {s['starts']} start(s), process start to "
        "first HTTP 200"
        + (", after one warm-up start of every server that is not counted" if pairs else "")
        + ". PSS: average per worker, primary/master in brackets, + aiocluster's zygote where "
        "it has one (fork start method; not counted as a worker). Reload: keep-alive load for "
        f"{s['reload_duration']:g} s with the reload signal a third of the way in, failed "
        "requests / requests of each round's reload.\n",
        table(results["servers"]),
        *floor_lines(rows),
        "\nCPU during the measured runs, in cores (server = primary + workers; irq = "
        "interrupts and softirqs, where loopback TCP partly runs; other = everything else on "
        "the machine, which is near 0 only when nothing else runs; steal = time the hypervisor "
        "gave this VM's CPUs to others, /proc/stat's steal column, a busy host):\n",
        cpu_table(results["servers"]),
        "\n## Targets\n",
        (
            "Each ratio is taken within a round, between the two servers' runs of that round "
            "(run close together: each aiocluster row runs beside its peer, and the order is "
            "reversed every other round), and for first answers between the two servers' "
            "starts of the same pass; the median over rounds is the value, the range shows "
            "how far single rounds strayed, and met counts the rounds that meet the target. "
            if pairs
            else "Ratios between the two servers' medians (these results predate ratios "
            "taken within each round). "
        )
        + "Beside them: the same ratio per server CPU-second, and the most CPU that something "
        "else on the machine took (other), or the hypervisor stole (steal), during any of the "
        "runs used (over ~0.2 cores, a ratio is noise-prone).\n",
        targets_table(rows, pairs),
    ]


# -- the measures of events ---------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:,.0f}"


def _each_ms(values: list[float | None]) -> str:
    return ", ".join(_ms(v) for v in values)


def burst_table(rows: list[Row]) -> str:
    """One line per server and burst size."""
    lines = [
        "| server | round | connections | req/s | timeouts | socket errors | non-2xx "
        "| p50 / p99 ms | primary µs/request | accept-queue overflows | other / steal cores "
        "| answers after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | error: {row['error']} |||||||||||")
        for run in row.get("runs", []):
            cpu = run.get("cpu", {})
            cost = run.get("cpu_us_per_request")
            overflows = run.get("listen_overflows")
            lines.append(
                f"| {row['name']} | {run.get('round', 1)} | {run['connections']:,} "
                f"| {run['rps']:,.0f} "
                f"| {run['timeouts']:,} | {run['socket_errors']:,} | {run['non_2xx']:,} "
                f"| {run['p50_ms']:,.1f} / {run['p99_ms']:,.1f} "
                f"| {'—' if cost is None else format(cost['primary_us'], '.1f')} "
                f"| {'—' if overflows is None else format(overflows, ',')} "
                f"| {cpu.get('other_cores', 0):.2f} / {cpu.get('steal_cores', 0):.2f} "
                f"| {'yes' if run['still_answers'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def replace_table(rows: list[Row]) -> str:
    """Per server: the median and each kill's times, and the probes that failed."""
    lines = [
        "| server | a new worker answers, ms (median; each kill) "
        "| N answering again, ms (median; each kill) | failed probes / probes |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        if (why := _not_measured(row)) is not None:
            lines.append(f"| {row['name']} | {why} |||")
            continue
        kills = row["kills"]
        failed = sum(k["failed_probes"] for k in kills)
        probes = sum(k["probes"] for k in kills)
        lines.append(
            f"| {row['name']} | {_ms(row['first_new_answer_median_s'])} "
            f"({_each_ms([k['first_new_answer_s'] for k in kills])}) "
            f"| {_ms(row['all_answering_median_s'])} "
            f"({_each_ms([k['all_answering_s'] for k in kills])}) | {failed} / {probes:,} |"
        )
    return "\n".join(lines) + "\n"


def reload_time_table(rows: list[Row]) -> str:
    """Per server: each reload's duration and parts, and the failed requests of the load."""
    lines = [
        "| server | workers | signal | complete, ms (median; each) | old exited, ms "
        "| all new answering, ms | failed / requests (each) | failed probes |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if (why := _not_measured(row)) is not None:
            lines.append(f"| {row['name']} | | {why} ||||||")
            continue
        reloads = row["reloads"]
        failed = ", ".join(str(r["failed"]) for r in reloads)
        requests = ", ".join(f"{r['requests']:,}" for r in reloads)
        lines.append(
            f"| {row['name']} | {row['workers']} | {row['signal']} "
            f"| {_ms(row['duration_median_s'])} ({_each_ms([r['duration_s'] for r in reloads])}) "
            f"| {_each_ms([r['old_exited_s'] for r in reloads])} "
            f"| {_each_ms([r['all_new_answering_s'] for r in reloads])} "
            f"| {failed} / {requests} "
            f"| {sum(r['failed_probes'] for r in reloads)} |"
        )
    return "\n".join(lines) + "\n"


def growth_table(rows: list[Row], counts: list[int]) -> str:
    """Median ms from exec to N distinct pids answering, a column per N."""
    head = " | ".join(f"N = {n}" for n in counts)
    lines = [
        f"| server | {head} |",
        "|---|" + "---:|" * len(counts),
    ]
    for row in rows:
        cells = []
        for n in counts:
            entry = row["by_workers"].get(str(n), {})
            cell = _ms(entry.get("answering_median_s"))
            if entry.get("errors"):
                cell += f" ({len(entry['errors'])} failed: {entry['errors'][0]})"
            cells.append(cell)
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _not_measured(row: Row) -> str | None:
    """Why ``row`` has no figures (skipped, or its error), or None if it has them."""
    if "skipped" in row:
        return str(row["skipped"])
    if "error" in row:
        return f"error: {row['error']}"
    return None


def _by_name(rows: list[Row]) -> dict[str, Row]:
    return {row["name"]: row for row in rows if _not_measured(row) is None}


def _by_round(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Runs keyed by their round (results from before rounds: one run a row, round 1)."""
    return {run.get("round", number + 1): run for number, run in enumerate(runs)}


def _per_round(
    left: dict[int, dict[str, Any]], right: dict[int, dict[str, Any]], key: str
) -> list[float]:
    """``left[key] / right[key]`` within each round both ran (their runs minutes apart at most)."""
    out = []
    for number in sorted(set(left) & set(right)):
        ratio = _ratio(left[number].get(key), right[number].get(key))
        if ratio is not None:
            out.append(ratio)
    return out


def _each_round(ratios: list[float]) -> str:
    if len(ratios) < 2:
        return ""
    return f", median of rounds ({', '.join(f'{r:.2f}' for r in ratios)})"


def event_targets(results: dict[str, Any]) -> list[str]:
    """Issue 16's targets on the measures of events, as lines ``target: value (met?)``."""
    out: list[str] = []

    def line(what: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        if value is None:
            shown = "not measured"
        else:
            shown = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}{unit}"
        verdict = "" if ok is None else (" — met" if ok else " — **not met**")
        out.append(f"- {what}: {shown}{verdict}")

    burst = _by_name(results.get("burst", []))
    for size in results.get("burst_sizes", []):

        def runs(name: str, size: int = size) -> dict[int, dict[str, Any]]:
            row = burst.get(name)
            found = [r for r in row["runs"] if r["connections"] == size] if row else []
            return {r.get("round", 1): r for r in found}

        shared, rr = runs("aiocluster-aiohttp"), runs("aiocluster-aiohttp-rr")
        reuseport, gunicorn = runs("aiocluster-aiohttp-reuseport"), runs("gunicorn-aiohttp")
        for name, got in (("shared", shared), ("rr", rr), ("reuseport", reuseport)):
            if got:
                # Met only if it held in every round.
                worst = max(r["timeouts"] for r in got.values())
                each = ", ".join(str(r["timeouts"]) for r in got.values())
                line(f"burst {size:,}, {name}: timeouts = 0 (each round: {each})", worst, not worst)
        pairs = (
            ("rr p99 / shared p99 ≤ 1.5", rr, shared, "p99_ms", _at_most(1.5)),
            ("shared req/s / gunicorn ≥ 1.0", shared, gunicorn, "rps", _at_least(1.0)),
            ("reuseport req/s / gunicorn ≥ 1.0", reuseport, gunicorn, "rps", _at_least(1.0)),
            ("shared p99 / gunicorn p99 ≤ 1.0", shared, gunicorn, "p99_ms", _at_most(1.0)),
            ("reuseport p99 / gunicorn p99 ≤ 1.0", reuseport, gunicorn, "p99_ms", _at_most(1.0)),
        )
        for what, left, right, key, passes in pairs:
            ratios = _per_round(left, right, key)
            if ratios:
                value = statistics.median(ratios)
                line(f"burst {size:,}: {what}{_each_round(ratios)}", value, passes(value))
    reloads = _by_name(results.get("reload_time", []))
    mine, theirs = reloads.get("aiocluster-aiohttp"), reloads.get("gunicorn-aiohttp")
    if mine and theirs:
        ratios = _per_round(_by_round(mine["reloads"]), _by_round(theirs["reloads"]), "duration_s")
        if ratios:
            ratio = statistics.median(ratios)
            what = f"reload of {mine['workers']} workers / gunicorn's HUP ≤ 0.5"
            line(what + _each_round(ratios), ratio, ratio <= 0.5)
    if mine:
        failed = sum(r["failed"] for r in mine["reloads"])
        line("reload: failed requests = 0 (aiocluster-aiohttp)", failed, failed == 0)
    growth = {row["name"]: row for row in results.get("startup_growth", [])}
    for n in results.get("growth_workers", []):
        mine_n = growth.get("aiocluster-aiohttp", {}).get("by_workers", {}).get(str(n), {})
        theirs_n = growth.get("gunicorn-aiohttp", {}).get("by_workers", {}).get(str(n), {})
        a, b = mine_n.get("answering_median_s"), theirs_n.get("answering_median_s")
        if a and b:
            line(f"start-up to {n} answering: aiocluster-aiohttp / gunicorn-aiohttp", a / b, None)
    return out


def _burst_mode(settings: dict[str, Any]) -> str:
    if settings.get("burst_mode") == "close":
        return "a new connection per request (close.lua)"
    return "keep-alive"


def event_sections(results: dict[str, Any]) -> list[str]:
    """A section for each measure of events the results have (``--measure``)."""
    s = results["settings"]
    parts: list[str] = []
    if "burst" in results:
        parts += [
            "\n## Burst of connections\n",
            f"`wrk -t{s.get('burst_threads', 2)} -cN -d{s.get('burst_duration', 10):g}s "
            f"--timeout 5s`, {_burst_mode(s)}: all N connections opened at once against a "
            f"server with {s['workers']} workers, each size in turn on the same start; "
            f"{s.get('burst_rounds', 1)} round(s), each a fresh start of every row. Timeouts: "
            "requests without an answer in 5 s; socket errors: connect, read and write "
            'errors; latency over the answered requests; "answers after": a new connection '
            "is answered once the burst is over; primary µs/request: the primary's (the "
            "master's) own CPU over the requests answered; accept-queue overflows: the "
            "machine's TcpExt ListenOverflows during the run (machine-wide).\n",
            burst_table(results["burst"]),
        ]
    if "replace" in results:
        parts += [
            "\n## Worker replacement after SIGKILL\n",
            f"{s['workers']} workers answering probes (4 clients, a new connection per "
            "request); one worker SIGKILLed at a time, "
            f"{s.get('replace_kills', '?')} times: ms from the kill to the first answer "
            "from a new pid, and until N distinct pids (not the killed one) have answered.\n",
            replace_table(results["replace"]),
        ]
    if "reload_time" in results:
        parts += [
            "\n## Reload duration\n",
            f"{s.get('reload_time_workers', 8)} workers, keep-alive load (`wrk "
            f"-t{s['wrk_threads']} -c{s['connections']}`) and probes running, one reload per "
            f"start in each of {s.get('reload_time_rounds', '?')} round(s); ms from the "
            "reload signal until every old worker has exited and N distinct new pids have "
            "answered (the later of the two columns after it, polled every 10 ms). Failed: "
            "wrk's socket errors + non-2xx over the whole run.\n",
            reload_time_table(results["reload_time"]),
        ]
    if "startup_growth" in results:
        counts = results.get("growth_workers", [])
        parts += [
            "\n## Start-up growth\n",
            "ms from exec to N distinct pids answering (probes on new connections from the "
            f"exec on), median of {s.get('growth_passes', '?')} start(s) per N after one "
            "warm-up start per server.\n",
            growth_table(results["startup_growth"], counts),
        ]
    targets = event_targets(results)
    if targets:
        parts += ["\n## Issue 16's targets, as measured\n", "\n".join(targets) + "\n"]
    return parts


COLORS = {"aiocluster": "#1f77b4", "peer": "#7f7f7f", "ceiling": "#2ca02c"}

#: A chart panel: its title and what draws it on a matplotlib Axes.
Panel = tuple[str, Callable[[Any], None]]


def _bars(names: list[str], values: list[float], families: list[str]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        ax.barh(names, values, color=[COLORS.get(f, "#999999") for f in families])
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        ax.margins(x=0.15)

    return draw


def _row_bars(rows: list[Row], value: Callable[[Row], float]) -> Callable[[Any], None]:
    return _bars([r["name"] for r in rows], [value(r) for r in rows], [r["family"] for r in rows])


def throughput_panels(results: dict[str, Any]) -> list[Panel]:
    """The default measures' four panels (none if the run had no rounds)."""
    rows = [r for r in results["servers"] if r.get("keepalive")]
    if not rows:
        return []
    return [
        ("keep-alive, requests/s", _row_bars(rows, lambda r: r["keepalive"]["rps"])),
        ("connection per request, requests/s", _row_bars(rows, lambda r: r["close"]["rps"])),
        (
            "start to first answer, ms (lower is better)",
            _row_bars(rows, lambda r: (r.get("first_answer_median_s") or 0) * 1000),
        ),
        (
            "PSS per worker, MiB (lower is better)",
            _row_bars(rows, lambda r: (r.get("memory", {}).get("worker_pss_avg_kib") or 0) / 1024),
        ),
    ]


def event_panels(results: dict[str, Any]) -> list[Panel]:
    """A panel or two for each measure of events the results have."""
    panels: list[Panel] = []
    runs = [
        (f"{row['name']} @{run['connections']:,} r{run.get('round', 1)}", run, row["family"])
        for row in results.get("burst", [])
        for run in row.get("runs", [])
    ]
    if runs:
        names, families = [n for n, _, _ in runs], [f for _, _, f in runs]
        panels.append(("burst: requests/s", _bars(names, [r["rps"] for _, r, _ in runs], families)))
        panels.append(
            (
                "burst: p99 ms (lower is better)",
                _bars(names, [r["p99_ms"] for _, r, _ in runs], families),
            )
        )
        timeouts = [r["timeouts"] for _, r, _ in runs]
        if any(timeouts):  # all 0: the table says so, a panel of empty bars would not
            panels.append(("burst: timeouts (lower is better)", _bars(names, timeouts, families)))
    replaced = [r for r in results.get("replace", []) if r.get("first_new_answer_median_s")]
    if replaced:
        panels.append(
            (
                "SIGKILL to a new worker answering, ms (lower is better)",
                _row_bars(replaced, lambda r: r["first_new_answer_median_s"] * 1000),
            )
        )
    reloaded = [r for r in results.get("reload_time", []) if r.get("duration_median_s")]
    if reloaded:
        workers = reloaded[0]["workers"]
        panels.append(
            (
                f"reload of {workers} workers, ms (lower is better)",
                _row_bars(reloaded, lambda r: r["duration_median_s"] * 1000),
            )
        )
    growth = results.get("startup_growth", [])
    counts = results.get("growth_workers", [])
    if growth and counts:

        def draw(ax: Any) -> None:
            for row in growth:
                points = [
                    (n, row["by_workers"].get(str(n), {}).get("answering_median_s")) for n in counts
                ]
                xs = [n for n, v in points if v]
                ys = [v * 1000 for _, v in points if v]
                style = "-" if row["family"] == "aiocluster" else "--"
                ax.plot(xs, ys, style, marker="o", label=row["name"])
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(n) for n in counts])
            ax.set_xlabel("workers")
            ax.legend(fontsize=8)

        panels.append(("exec to N workers answering, ms (lower is better)", draw))
    return panels


def chart(results: dict[str, Any], path: Path) -> bool:
    """The PNG of what the results measured, two panels a line; False if nothing to draw."""
    panels = throughput_panels(results) + event_panels(results)
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = (len(panels) + 1) // 2
    bars = max(
        [len(results["servers"])]
        + [sum(len(r.get("runs", [])) for r in results.get("burst", []))]
        + [len(results.get(k, [])) for k in ("replace", "reload_time")]
    )
    fig, axes = plt.subplots(lines, 2, figsize=(14, lines * (0.22 * bars + 2.5)), squeeze=False)
    for ax, (title, draw) in zip(axes.flat, panels, strict=False):
        draw(ax)
        ax.set_title(title)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    m = results["machine"]
    fig.suptitle(
        f"aiocluster vs peers — {results['label']} run, {results['settings']['workers']} "
        f"workers, {m['nproc']} cores, Python {m['python']}, Linux {m['kernel']}"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(json_path: Path) -> list[Path]:
    results = json.loads(json_path.read_text())
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results))
    written = [md_path]
    try:
        png_path = json_path.with_suffix(".png")
        if chart(results, png_path):
            written.append(png_path)
    except ImportError:
        print("matplotlib missing: no chart (python benchmarks/run.py --setup)", file=sys.stderr)
    return written


def main(paths: list[Path]) -> int:
    """Write the report of each results JSON (default: results/quick.json)."""
    for path in paths or [Path(__file__).resolve().parent.parent / "results" / "quick.json"]:
        for written in write_report(path):
            print(f"wrote {written}")
    return 0
