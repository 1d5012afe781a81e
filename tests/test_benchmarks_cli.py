"""The benchmark runner's command line works without a load: its package imports, ``--list``
prints the server table without wrk, bad options are refused, and the report renders.

Nothing here measures anything (benchmarks/ does, by hand); each run is a few seconds. The
runner is started as a user starts it, ``python benchmarks/run.py``, with BENCH_VENV set to
this interpreter's environment (so it does not re-execute itself elsewhere) and a PATH
without wrk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RUN = BENCHMARKS / "run.py"

pytestmark = pytest.mark.timeout(30)


def bench(tmp_path: Path, *args: str, cwd: Path = BENCHMARKS) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` as a user runs it, with an empty PATH (no wrk, no node)."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "BENCH_VENV": sys.prefix, "PATH": str(empty)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=25
    )


def render(tmp_path: Path, label: str, results: dict[str, object]) -> str:
    """The Markdown report.py writes for ``results`` (kept as LABEL.json)."""
    path = tmp_path / f"{label}.json"
    path.write_text(json.dumps(results))
    done = bench(tmp_path, str(BENCHMARKS / "report.py"), str(path))
    assert done.returncode == 0, done.stderr
    return (tmp_path / f"{label}.md").read_text()


def test_list_prints_the_server_table_without_wrk(tmp_path: Path) -> None:
    done = bench(tmp_path, str(RUN), "--list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    names = [line.split()[0] for line in done.stdout.splitlines() if not line.startswith("note")]
    # The policy rows come from `aiocluster run --help` of the venv: this one has aiocluster.
    for name in ("aiocluster-aiohttp", "aiocluster-aiohttp-rr", "gunicorn-aiohttp", "nginx"):
        assert name in names, done.stdout
    assert len(names) == len(set(names))
    assert "wrk" not in done.stderr


def test_every_measure_names_rows_of_the_table(tmp_path: Path) -> None:
    """A measure's default rows (scenarios.ROWS) are rows the table has: a typo would make a
    measure silently skip its peer."""
    code = (
        "import json; from bench import scenarios; from bench.servers import build_servers; "
        "rows, _ = build_servers(); "
        "print(json.dumps({'table': [r.name for r in rows], 'rows': scenarios.ROWS}))"
    )
    done = bench(tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for measure, names in found["rows"].items():
        missing = set(names) - set(found["table"])
        assert not missing, f"{measure}: {missing}"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--measure", "burst,bogus"], "unknown measure bogus"),
        (["--burst-connections", "5000,x"], "not a list of positive numbers"),
        (["--burst-mode", "pipelined"], "invalid choice: 'pipelined'"),
        (["--burst-rounds", "0"], "not a positive number: '0'"),
        (["--reload-time-rounds", "x"], "not a positive number: 'x'"),
        (["--reload-batch", "0,2"], "not a list of positive numbers"),
        (["--baseline", "/"], "/ holds no aiocluster package"),
        (["--aiocluster-args", "--backlog '4096"], "--aiocluster-args: No closing quotation"),
    ],
)
def test_bad_options_get_a_one_line_error(tmp_path: Path, args: list[str], error: str) -> None:
    done = bench(tmp_path, str(RUN), *args)
    assert done.returncode == 2
    assert error in done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_the_options_that_replaced_the_standalone_scripts(tmp_path: Path) -> None:
    """burst.py's --mode and --rounds, reload_time.py's --reload-batch variants, cpu_cost.py's
    --baseline and --server-args (and burst/reload_time's --extra) are run.py options now."""
    done = bench(tmp_path, str(RUN), "--help")
    assert done.returncode == 0, done.stderr
    for option in (
        "--burst-mode {keepalive,close}",
        "--burst-rounds",
        "--reload-time-rounds",
        "--reload-batch N[,N...]",
        "--aiocluster-args ARGS",
        "--baseline DIR",
    ):
        assert option in done.stdout, option


def test_baseline_and_aiocluster_args_make_rows_of_the_table(tmp_path: Path) -> None:
    """--baseline adds a baseline-NAME row beside every aiocluster row, running the other
    checkout's package; --aiocluster-args reaches every aiocluster row's command line."""
    checkout = BENCHMARKS.parent  # any folder holding an aiocluster package will do
    done = bench(
        tmp_path,
        str(RUN),
        "--list",
        "--baseline",
        str(checkout),
        "--aiocluster-args",
        "--backlog 4096",
        "--only",
        "*aiocluster-aiohttp-rr",
        "gunicorn-aiohttp",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert set(lines) == {
        "aiocluster-aiohttp-rr",
        "baseline-aiocluster-aiohttp-rr",
        "gunicorn-aiohttp",
    }
    assert "+ --backlog 4096" in lines["aiocluster-aiohttp-rr"]
    assert f"aiocluster from {checkout}" in lines["baseline-aiocluster-aiohttp-rr"]
    assert "--backlog" not in lines["gunicorn-aiohttp"]


def test_rows_for_the_measures_with_variants(tmp_path: Path) -> None:
    """The command lines behind the rows: a baseline row runs ``python -m aiocluster`` with the
    checkout on PYTHONPATH, --reload-batch adds a NAME-batchN row after each aiocluster row
    of reload-time, and a baseline row runs in the measures its own row runs in."""
    code = """if True:
        import json
        from pathlib import Path
        import run
        from bench.config import Context
        args = run.parse_args(["--baseline", "..", "--reload-batch", "1,8"])
        rows, _ = run.table_rows(args)
        ctx = Context(port=1234, workers=8, tmp=Path("."))
        mine = {r.name: r for r in rows}
        base = mine["baseline-aiocluster-aiohttp"]
        reload = run.rows_for("reload-time", run.run_order(rows), None)
        batches = run.batch_rows(reload, run.settings_from(args).reload_batches)
        print(json.dumps({
            "argv": base.argv(ctx), "env": base.env(ctx), "missing": base.missing(),
            "reload": [r.name for r in batches],
            "batch_argv": next(r for r in batches if r.name.endswith("-batch8")).argv(ctx),
        }))
    """
    done = bench(tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["argv"][1:5] == ["-m", "aiocluster", "run", "hello_aiohttp:app"]
    assert found["argv"][0].endswith("/bin/python")
    assert found["env"]["PYTHONPATH"] == str(BENCHMARKS.parent)
    assert found["missing"] is None
    reload = found["reload"]
    at = reload.index("aiocluster-aiohttp")
    assert reload[at : at + 3] == [
        "aiocluster-aiohttp",
        "aiocluster-aiohttp-batch1",
        "aiocluster-aiohttp-batch8",
    ]
    assert "baseline-aiocluster-aiohttp" in reload
    assert "gunicorn-aiohttp-batch1" not in reload
    assert found["batch_argv"][-2:] == ["--reload-batch", "8"]


def test_the_report_renders_every_measure(tmp_path: Path) -> None:
    """report.py turns results of the measures of events into their tables and targets."""
    run: dict[str, object] = {"connections": 5000, "rps": 1000.0, "requests": 5000}
    run |= {"timeouts": 3}
    run |= {"socket_errors": 0, "non_2xx": 0, "p50_ms": 1.0, "p99_ms": 9.0, "max_ms": 20.0}
    run |= {"still_answers": True, "round": 1, "mode": "keepalive", "listen_overflows": 7}
    run |= {"cpu_us_per_request": {"primary_us": 34.5, "workers_us": 80.0}}
    rr_runs = [run | {"p99_ms": 12.0}, run | {"round": 2, "p99_ms": 9.0, "timeouts": 0}]
    kill = {"victim": 1, "first_new_answer_s": 0.05, "all_answering_s": 0.06}
    kill |= {"probes": 40, "failed_probes": 0}
    reload = {"duration_s": 2.0, "old_exited_s": 2.0, "first_new_answer_s": 0.3}
    reload |= {"all_new_answering_s": 1.5, "requests": 9000, "failed": 0, "probes": 99}
    reload |= {"failed_probes": 0}

    def row(name: str, family: str = "aiocluster") -> dict[str, object]:
        return {"name": name, "family": family, "describe": name}

    results = {
        "label": "t",
        "started": "now",
        "settings": {"workers": 2, "wrk_threads": 1, "connections": 64, "replace_kills": 1},
        "machine": json.loads((BENCHMARKS / "results" / "quick.json").read_text())["machine"],
        "measures": ["burst", "replace", "reload-time", "startup-growth"],
        "notes": ["start-up growth at 32 workers skipped: a note"],
        "servers": [],
        "burst_sizes": [5000],
        "burst": [
            {**row("aiocluster-aiohttp"), "runs": [run, run | {"round": 2, "timeouts": 0}]},
            {**row("aiocluster-aiohttp-rr"), "runs": rr_runs},
        ],
        "replace": [
            {**row("aiocluster-aiohttp"), "workers": 2, "kills": [kill]}
            | {"first_new_answer_median_s": 0.05, "all_answering_median_s": 0.06},
            {**row("granian-asgi", "peer"), "skipped": "granian replaces no dead worker"},
        ],
        "reload_time": [
            {**row("aiocluster-aiohttp"), "workers": 8, "signal": "SIGHUP"}
            | {"reloads": [reload | {"round": 1}, reload | {"round": 2, "duration_s": 1.0}]}
            | {"duration_median_s": 1.5},
            {**row("gunicorn-aiohttp", "peer"), "workers": 8, "signal": "SIGHUP"}
            | {"reloads": [reload | {"failed": 40, "round": n, "duration_s": 5.0} for n in (1, 2)]}
            | {"duration_median_s": 5.0},
        ],
        "growth_workers": [1, 32],
        "startup_growth": [
            {**row("aiocluster-aiohttp"), "by_workers": {"1": {"answering_median_s": 0.3}}}
        ],
    }
    text = render(tmp_path, "t", results)
    assert "| aiocluster-aiohttp | 1 | 5,000 | 1,000 | 3 | 0 | 0 | 1.0 / 9.0 | 34.5 | 7 |" in text
    assert "| aiocluster-aiohttp | 2 | 5,000 | 1,000 | 0 |" in text
    assert "| aiocluster-aiohttp | 50 (50) | 60 (60) | 0 / 40 |" in text
    assert "granian replaces no dead worker" in text
    assert "| aiocluster-aiohttp | 8 | SIGHUP | 1,500 (2,000, 1,000) |" in text
    assert "| aiocluster-aiohttp | 300 | — |" in text
    assert "burst 5,000, shared: timeouts = 0 (each round: 3, 0): 3 — **not met**" in text
    # Ratios within each round: 12/9 and 9/9, median 1.17.
    assert "rr p99 / shared p99 ≤ 1.5, median of rounds (1.33, 1.00): 1.17 — met" in text
    assert "gunicorn's HUP ≤ 0.5, median of rounds (0.40, 0.20): 0.30 — met" in text
    assert "32 workers skipped" in text


def test_the_import_floor_answers_and_is_timed_by_starts_only(tmp_path: Path) -> None:
    """apps/import_floor.py answers a real GET with 200; the floor row runs in no measure of
    load (not even when --only names every row), and the report says how far each server's
    first answer is above it, start by start of a pass."""
    code = """if True:
        import json
        import run
        from bench.servers import FLOOR
        rows, _ = run.table_rows(run.parse_args([]))
        floor = [r for r in rows if r.name == FLOOR]
        print(json.dumps({
            "floor": [r.family for r in floor],
            "burst": [r.name for r in run.rows_for("burst", rows, ["*"])],
        }))
    """
    done = bench(tmp_path, "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["floor"] == ["floor"]
    assert "import-floor" not in found["burst"] and "gunicorn-aiohttp" in found["burst"]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    floor = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / "apps" / "import_floor.py"), "127.0.0.1", str(port)]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                    conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    assert conn.recv(100).startswith(b"HTTP/1.1 200 OK")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "import_floor.py never listened"
                time.sleep(0.01)  # it is importing aiohttp: no event to wait on from here
    finally:
        floor.kill()
        floor.wait(5)

    results = {
        "label": "t",
        "started": "now",
        "settings": {"workers": 2, "wrk_threads": 1, "connections": 64, "warmup": 1.0}
        | {"duration": 2.0, "rounds": 1, "starts": 3, "reload_duration": 3.0},
        "machine": json.loads((BENCHMARKS / "results" / "quick.json").read_text())["machine"],
        "measures": ["starts"],
        "notes": [],
        "servers": [
            {"name": n, "family": f, "describe": n, "first_answer_by_pass": p}
            | {"first_answer_s": p, "first_answer_median_s": sorted(p)[1]}
            for n, f, p in (
                ("import-floor", "floor", [0.200, 0.210, 0.190]),
                ("aiocluster-aiohttp", "aiocluster", [0.230, 0.220, 0.250]),
                ("gunicorn-aiohttp", "peer", [0.240, 0.235, 0.215]),
                ("aiocluster-protocol", "aiocluster", [0.100, 0.110, 0.120]),
            )
        ],
    }
    text = render(tmp_path, "s", results)
    assert "median of its starts 200 ms" in text
    # Per pass: 30, 10, 60 ms above the floor; gunicorn 40, 25, 25.
    assert "- aiocluster-aiohttp: +30 (+10 to +60)" in text
    assert "- gunicorn-aiohttp: +25 (+25 to +40)" in text
    # Below it, the bare protocol: it imports no aiohttp, and the floor is not its own.
    assert "- aiocluster-protocol" not in text
